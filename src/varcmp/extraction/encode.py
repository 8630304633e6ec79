"""The encoders of a run (`load_encoders`) and what they encode: the captions (`encode_text`, with
`cut_captions` naming those longer than --max-words) and each decoded video's frames and audio
windows (`encode_videos`), written to the split as they finish."""

from __future__ import annotations

import os
import time

import click
import numpy as np

from ..cache.store import fault_point
from ..cache_schema import DONE, TEXT_CHUNK, CacheWriteError, VideoFeatures
from ..cli.markup import lit
from ..cli.progress import progress_bar
from ..media.plan import Plan
from .options import Options, Summary


def _device_name(opt: Options) -> str:
    """Under torchrun each rank of a node takes its own GPU (LOCAL_RANK) unless --device names one."""
    local = os.environ.get("LOCAL_RANK")
    if opt.distributed and local is not None and local.isdigit() and opt.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % torch.cuda.device_count()}"
    return opt.device


def load_encoders(opt: Options):
    """(CLIP, CLAP or None) on the run's device."""
    from ..encoders.frozen import ClapEncoder, ClipEncoder, resolve_device

    try:
        device = resolve_device(_device_name(opt))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    clip = ClipEncoder(opt.clip_model, device)
    return clip, (ClapEncoder(opt.clap_model, device) if opt.audio else None)


def cut_captions(clip, plan: Plan, opt: Options) -> list[str]:
    """A note naming the captions longer than --max-words tokens: they are encoded cut to it
    (as search cuts a query, and says so)."""
    cut = clip.cut([q.text for q in plan.queries], opt.max_words) if plan.queries else []
    if not cut:
        return []
    rows = ", ".join(str(plan.queries[i].row) for i in cut[:5]) + (" ..." if len(cut) > 5 else "")
    return [f"{len(cut)} of {len(plan.queries)} captions cut to {opt.max_words} tokens (--max-words, start and end "
            f"included): {opt.annotations.name} row{'s' if len(cut) > 1 else ''} {rows}"]


def encode_text(sw, clip, texts: list[str], max_words: int) -> int:
    """Encode and write the captions' chunks not yet done (a resumed run skips the rest); their count."""
    status = sw.text_status()
    chunks = [s for s in range(0, len(texts), TEXT_CHUNK) if not (status[s:s + TEXT_CHUNK] == DONE).all()]
    for s in chunks:
        words, mask, sentence = clip.encode_text(texts[s:s + TEXT_CHUNK], max_words)
        try:
            sw.write_text(s, words.numpy(), mask.numpy(), sentence.numpy())
        except CacheWriteError as e:
            raise CacheWriteError(f"{e} while saving captions {s}-{s + len(words) - 1}; make room (or make the store "
                                  "writable) and run the same command again to resume") from None
    return len(texts)


def encode_videos(opt: Options, sw, clip, clap, results, total: int, summary: Summary, console) -> None:
    """Encode and write each decoded video as it arrives (or record its failure), with a progress bar;
    counted in `summary`."""
    if not total:
        return
    start, handled = time.perf_counter(), 0
    with progress_bar(console, transient=False,
                      fields=("{task.fields[vps]:.2f} videos/s  {task.fields[fps]:.1f} frames/s",)) as progress:
        task = progress.add_task(f"extract {lit(opt.split)}", total=total, vps=0.0, fps=0.0)
        for res in results:
            try:
                if "error" in res:
                    sw.fail_video(res["index"], res["error"])
                else:
                    feats = _features(res, clip, clap, opt)
                    sw.write_video(res["index"], feats)
                    summary.frames += int(feats.frame_mask.sum())
                    summary.done += 1
                    if res["notes"]:
                        summary.noted.append((summary.plan.videos[res["index"]].path, res["notes"]))
            except CacheWriteError as e:
                path = summary.plan.videos[res["index"]].path
                raise CacheWriteError(f"{e} while saving {path!r}; the videos finished before are kept: make room "
                                      "(or make the store writable) and run the same command again to resume") from None
            handled += 1
            dt = max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, vps=handled / dt, fps=summary.frames / dt)
    summary.video_seconds = time.perf_counter() - start


def _features(res: dict, clip, clap, opt: Options) -> VideoFeatures:
    """One decoded video's CLIP frame and patch features (and CLAP windows), padded to the store's shape."""
    import torch

    pixels = res["pixels"]
    cls, patches = [], []
    for s in range(0, len(pixels), opt.batch_size):
        c, p = clip.encode_images(pixels[s:s + opt.batch_size])
        cls.append(c)
        patches.append(p)
        if s == 0:
            fault_point("forward")
    cls_t, patch_t = torch.cat(cls).numpy(), torch.cat(patches).numpy()
    k, n = len(cls_t), opt.frames
    frame_feat = np.zeros((n, cls_t.shape[1]), np.float32)
    patch_feat = np.zeros((n,) + patch_t.shape[1:], np.float32)
    frame_feat[:k], patch_feat[:k] = cls_t, patch_t
    frame_mask = np.zeros(n, bool)
    frame_mask[:k] = True
    frame_time = np.zeros(n, np.float32)
    frame_time[:k] = res["times"]
    feats = VideoFeatures(duration=res["duration"], fps=res["fps"], frame_time=frame_time, frame_mask=frame_mask,
                          frame_feat=frame_feat, patch_feat=patch_feat,
                          note="; ".join(text for _, text in res["notes"]))
    if clap is not None:
        na = opt.audio_segments
        audio_feat = np.zeros((na, clap.dim), np.float32)
        mask = res["audio_mask"]
        if mask.any():
            audio_feat[mask] = clap.encode_windows(res["audio"], opt.batch_size)
        feats.audio_feat, feats.audio_mask, feats.audio_time = audio_feat, mask, res["audio_spans"]
    return feats
