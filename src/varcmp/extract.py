"""`varcmp-extract`: frozen CLIP (and CLAP) features of a folder of videos into a cache.

Worker processes decode and preprocess videos (PyAV, the checkpoint's own image
processor, CLAP's log-mel front end) while the main process runs the encoders
and writes each finished video's chunks, then its done flag. A killed run is
resumed by running the same command again.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import click
import numpy as np

from .annotations import AnnotationError, label_from_path, read_captions, safe_relative
from .cache_schema import (DONE, FAILED, LOCK_NAME, TEXT_CHUNK, CacheError, CacheSpec, CacheWriter, QueryEntry, VideoEntry,
                           VideoFeatures, is_hdf5)
from .cli import OneLineErrors
from .media import AUDIO_EXTENSIONS, AUDIO_RATE, MediaError, audio_windows, find_videos, read_audio, read_frames

# --------------------------------------------------------------------------
# What to extract


@dataclass
class Plan:
    videos: list[VideoEntry]
    queries: list[QueryEntry] | None
    rejected: list[str] = field(default_factory=list)  # caption rows refused (one line each)
    missing: list[str] = field(default_factory=list)  # caption rows whose video is not there
    uncaptioned: int = 0  # videos (of the split) that no caption names


def make_plan(root: Path, annotations: Path | None, all_videos: bool = False) -> Plan:
    """The split's videos and queries. With a caption file the videos are those it names
    (plus every other video under the root with `all_videos`); without one, every video."""
    found = find_videos(root)
    if annotations is None:
        return Plan([_entry(p) for p in found], None)
    captions = read_captions(annotations)
    by_name: dict[str, list[str]] = {}
    for p in found:
        by_name.setdefault(PurePosixPath(p).name, []).append(p)
    found_set = set(found)
    plan = Plan([], [])
    index: dict[str, int] = {}
    where = annotations.name
    for c in captions:
        try:
            rel = safe_relative(c.video)
        except ValueError as e:
            plan.rejected.append(f"{where} row {c.row}: {e}")
            continue
        if not c.text:
            plan.rejected.append(f"{where} row {c.row}: empty caption for {rel!r}")
            continue
        if rel not in found_set:
            alt = by_name.get(PurePosixPath(rel).name, [])
            if len(alt) == 1:  # the release's folder layout differs from the user's
                rel = alt[0]
            else:
                why = "not found" if (root / rel).exists() is False else "not a video file"
                plan.missing.append(f"{where} row {c.row}: video {rel!r} {why} under {root}")
                continue
        if rel not in index:
            index[rel] = len(plan.videos)
            plan.videos.append(_entry(rel))
        plan.queries.append(QueryEntry(c.text, index[rel], c.row))
    if all_videos:
        for p in found:
            if p not in index:
                index[p] = len(plan.videos)
                plan.videos.append(_entry(p))
                plan.uncaptioned += 1
    return plan


def _entry(rel: str) -> VideoEntry:
    label, category = label_from_path(rel)
    return VideoEntry(rel, label, category)


def _looks_local(name: str) -> bool:
    """A local path rather than a hub id ('namespace/name')."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _audio_source(audio: str | None, root: Path, rel: str) -> str | None:
    """Where a video's audio comes from: the video itself, a file named by its stem, or nowhere."""
    if audio is None:
        return None
    if audio == "video":
        return str(root / rel)
    stem = PurePosixPath(rel).stem
    for ext in AUDIO_EXTENSIONS:
        for cand in (Path(audio) / PurePosixPath(rel).parent / (stem + ext), Path(audio) / (stem + ext)):
            if cand.is_file():
                return str(cand)
    return ""  # no file for this video


# --------------------------------------------------------------------------
# Worker side: decode + preprocess (no model weights here)

_W: dict = {}


def _init_pool_worker(*args) -> None:
    """A decoding process: one thread, Ctrl-C left to the main process, then the shared state."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        _init_worker(*args)
    except Exception as e:  # noqa: BLE001 - reported per job instead of a worker traceback
        _W["broken"] = str(e)


def _init_worker(clip_name: str, clap_name: str | None, num_frames: int, audio_segments: int) -> None:
    from .encoders import load_audio_feature_extractor, load_image_processor, quiet_transformers

    quiet_transformers()
    _W.update(processor=load_image_processor(clip_name), num_frames=num_frames, audio_segments=audio_segments,
              extractor=load_audio_feature_extractor(clap_name) if clap_name else None)


def _prepare(job: tuple[int, str, str | None]) -> dict:
    """Decode and preprocess one video; never raises (errors come back as `error`)."""
    from .encoders import preprocess_audio, preprocess_images

    i, path, audio_path = job
    if "broken" in _W:
        return {"index": i, "error": f"decoding worker could not start: {_W['broken']}"}
    try:
        fr = read_frames(path, _W["num_frames"])
        out = {"index": i, "pixels": preprocess_images(_W["processor"], fr.images), "times": fr.times,
               "duration": fr.duration, "fps": fr.fps, "total": fr.total_frames, "notes": []}
        if len(fr.images) < _W["num_frames"]:
            out["notes"].append(f"{len(fr.images)} frames (fewer than {_W['num_frames']}): rest masked")
        if _W["extractor"] is not None:
            if audio_path == "":
                samples, offset = None, 0.0
                out["notes"].append("no audio file")
            else:
                try:
                    got = read_audio(audio_path, AUDIO_RATE)
                except MediaError as e:
                    got = None
                    out["notes"].append(f"audio unreadable ({e})")
                samples, offset = got if got is not None else (None, 0.0)
            win = audio_windows(samples, offset, fr.duration, _W["audio_segments"], AUDIO_RATE)
            if win.note and not any(n.startswith("audio unreadable") or n == "no audio file" for n in out["notes"]):
                out["notes"].append(win.note)
            out["audio"] = preprocess_audio(_W["extractor"], win.windows, AUDIO_RATE)
            out["audio_mask"], out["audio_spans"] = win.mask, win.spans
        return out
    except MediaError as e:
        return {"index": i, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a bad file must not kill the batch job
        return {"index": i, "error": f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


# --------------------------------------------------------------------------
# Main side


@dataclass
class Options:
    root: Path
    out: Path
    annotations: Path | None = None
    split: str = "train"
    clip_model: str = "openai/clip-vit-base-patch32"
    clap_model: str = "laion/clap-htsat-fused"
    audio: str | None = None  # None, "video", or a directory
    frames: int = 32
    max_words: int = 32
    audio_segments: int = 32
    batch_size: int = 64
    device: str = "auto"
    workers: int = 1
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    all_videos: bool = False


@dataclass
class Summary:
    total: int = 0  # videos in this shard
    already: int = 0  # done before this run
    done: int = 0  # extracted by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this shard
    frames: int = 0
    queries: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    video_seconds: float = 0.0  # the video loop alone (decode, encode, write)
    interrupted: bool = False
    plan: Plan | None = None


@contextmanager
def _lock(out: Path, exclusive_run: bool):
    """Serialise store creation between shards; a single-shard run holds the lock throughout,
    so two runs never write the same store at once."""
    import fcntl

    lock_path = out / LOCK_NAME if not is_hdf5(out) else out.with_name(out.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path, "a+")
    try:
        if exclusive_run:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CacheError(f"{out}: another varcmp-extract is writing to this store") from None
        else:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def run(opt: Options, console=None) -> Summary:
    """Extract one split (or one shard of it). Raises CacheError / AnnotationError / RuntimeError /
    click.UsageError for problems of the whole run; per-video problems are recorded and returned."""
    from rich.console import Console

    from .encoders import quiet_transformers

    quiet_transformers()
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    if not (0 <= opt.shard_index < opt.num_shards):
        raise click.UsageError(f"--shard-index must be in [0, {opt.num_shards})")
    sharded = opt.num_shards > 1
    if sharded and is_hdf5(opt.out):
        raise click.UsageError("HDF5 output is written by one process; use a Zarr store (--out NAME.zarr) with shards")
    if sharded and opt.overwrite:
        raise click.UsageError("--overwrite cannot be combined with shards; delete the store before starting them")
    if opt.audio and opt.audio != "video" and not Path(opt.audio).is_dir():
        raise click.UsageError(f"--audio {opt.audio}: expected 'video' or a directory of audio files")
    for flag, name in (("--clip-model", opt.clip_model), ("--clap-model", opt.clap_model if opt.audio else None)):
        if name and _looks_local(name) and not Path(name).expanduser().is_dir():
            raise click.UsageError(f"{flag} {name}: no such directory (give a local model directory or a hub id)")
    plan = make_plan(opt.root, opt.annotations, opt.all_videos)
    if not plan.videos:
        raise click.UsageError(f"{opt.root}: no videos to extract" + (" (no caption names an existing video)" if opt.annotations else ""))

    summary = Summary(plan=plan)
    with ExitStack() as stack:
        # decoding workers start first: they load their preprocessors while this process loads the encoders
        init = (opt.clip_model, opt.clap_model if opt.audio else None, opt.frames, opt.audio_segments)
        pool = stack.enter_context(_decoders(opt.workers, init))
        _extract(opt, plan, pool, summary, stack, console)
    summary.seconds = time.perf_counter() - t0
    return summary


def _extract(opt: Options, plan: Plan, pool, summary: Summary, stack: ExitStack, console) -> None:
    from .encoders import ClapEncoder, ClipEncoder, resolve_device

    sharded = opt.num_shards > 1
    try:
        device = resolve_device(opt.device)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    clip = ClipEncoder(opt.clip_model, device)
    clap = ClapEncoder(opt.clap_model, device) if opt.audio else None
    spec = CacheSpec(num_frames=opt.frames, num_patches=clip.num_patches, dim=clip.dim, max_words=opt.max_words,
                     audio_segments=opt.audio_segments if clap else 0, audio_dim=clap.dim if clap else 512)
    encoders = {"clip": clip.info(), "clap": clap.info() if clap else None}
    preprocessing = {
        "frames": "centres of N equal segments of the video; the frame on screen at each; fewer frames -> mask",
        "image_processor": {k: v for k, v in clip.processor.to_dict().items() if not k.startswith("_")},
        "text": f"CLIP tokenizer, {opt.max_words} tokens incl. start/end, words = text_projection(last_hidden_state)",
        "audio": (f"mono {AUDIO_RATE} Hz; {opt.audio_segments} windows centred on the frame times, "
                  "clamp(duration/N_a, 1 s, 10 s) long; CLAP get_audio_features, is_longer=False") if clap else None,
    }
    split_attrs = {"root": str(opt.root.resolve()), "annotations": str(opt.annotations) if opt.annotations else None,
                   "audio": opt.audio, "rejected": plan.rejected, "missing": plan.missing}

    if not sharded:  # one writer at a time, for the whole run
        stack.enter_context(_lock(opt.out, exclusive_run=True))
    with _lock(opt.out, exclusive_run=False) if sharded else nullcontext():
        if opt.overwrite:
            _clear(opt.out)
        writer = CacheWriter(opt.out, spec, encoders, preprocessing)
        sw = writer.split(opt.split, plan.videos, plan.queries, split_attrs)
    mine = np.arange(opt.shard_index, len(plan.videos), opt.num_shards)
    try:
        status = sw.video_status()
        todo = [int(i) for i in mine if status[i] != DONE]
        summary.total, summary.already = len(mine), len(mine) - len(todo)
        paths = [plan.videos[i].path for i in todo]
        jobs = [(i, str(opt.root / p), _audio_source(opt.audio, opt.root, p)) for i, p in zip(todo, paths)]
        results = _decoded(jobs, pool, opt.workers)  # decoding starts now, text encoding overlaps it
        if opt.shard_index == 0 and plan.queries:
            summary.queries = _encode_text(sw, clip, [q.text for q in plan.queries], opt.max_words)
        _encode_videos(opt, sw, clip, clap, results, len(jobs), summary, console)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        status = sw.video_status()
        errors = sw.store.read_str(f"{opt.split}/videos/error")
        summary.failed = [(plan.videos[i].path, errors[i]) for i in mine if status[i] == FAILED]
        with _lock(opt.out, exclusive_run=False) if sharded else nullcontext():
            writer.finish()  # consolidates metadata


def _clear(out: Path) -> None:
    import shutil

    if is_hdf5(out):
        if out.exists():
            out.unlink()
        return
    if out.is_dir():
        for child in out.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _encode_text(sw, clip, texts: list[str], max_words: int) -> int:
    status = sw.text_status()
    chunks = [s for s in range(0, len(texts), TEXT_CHUNK) if not (status[s:s + TEXT_CHUNK] == DONE).all()]
    for s in chunks:
        words, mask, sentence = clip.encode_text(texts[s:s + TEXT_CHUNK], max_words)
        sw.write_text(s, words.numpy(), mask.numpy(), sentence.numpy())
    return len(texts)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[vps]:.2f} videos/s  {task.fields[fps]:.1f} frames/s"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False)


@contextmanager
def _decoders(workers: int, init: tuple):
    """A pool of decoding processes, started at once (None with workers=0: decode in-process)."""
    if workers <= 0:
        _init_worker(*init)
        yield None
        return
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker, initargs=init)
    for _ in range(workers):
        pool.submit(int)  # processes start on first submit: start them now
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decoded(jobs: list, pool, workers: int):
    """Decoded videos in roughly submission order, at most 2 x workers + 1 in flight. Jobs are
    submitted as soon as this is called (not when first iterated)."""
    if pool is None:
        return (_prepare(j) for j in jobs)
    it = iter(jobs)
    running = {pool.submit(_prepare, j) for j in _take(it, 2 * workers + 1)}

    def results():
        nonlocal running
        while running:
            try:
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                running |= {pool.submit(_prepare, j) for j in _take(it, len(done))}
                for res in sorted((f.result() for f in done), key=lambda r: r["index"]):
                    yield res
            except cf.process.BrokenProcessPool:
                raise RuntimeError("a decoding worker died (out of memory?); finished videos are saved, "
                                   "run the same command again to resume") from None
    return results()


def _encode_videos(opt: Options, sw, clip, clap, results, total: int, summary: Summary, console) -> None:
    if not total:
        return
    start, handled = time.perf_counter(), 0
    with _progress(console) as progress:
        task = progress.add_task(f"extract {opt.split}", total=total, vps=0.0, fps=0.0)
        for res in results:
            if "error" in res:
                sw.fail_video(res["index"], res["error"])
            else:
                feats = _features(res, clip, clap, opt)
                sw.write_video(res["index"], feats)
                summary.frames += int(feats.frame_mask.sum())
                summary.done += 1
            handled += 1
            dt = max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, vps=handled / dt, fps=summary.frames / dt)
    summary.video_seconds = time.perf_counter() - start


def _take(it, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _features(res: dict, clip, clap, opt: Options) -> VideoFeatures:
    import torch

    pixels = res["pixels"]
    cls, patches = [], []
    for s in range(0, len(pixels), opt.batch_size):
        c, p = clip.encode_images(pixels[s:s + opt.batch_size])
        cls.append(c)
        patches.append(p)
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
                          frame_feat=frame_feat, patch_feat=patch_feat, note="; ".join(res["notes"]))
    if clap is not None:
        na = opt.audio_segments
        audio_feat = np.zeros((na, clap.dim), np.float32)
        mask = res["audio_mask"]
        if mask.any():
            emb = torch.cat([clap.encode(res["audio"][s:s + opt.batch_size])
                             for s in range(0, len(res["audio"]), opt.batch_size)]).numpy()
            audio_feat[mask] = emb
        feats.audio_feat, feats.audio_mask, feats.audio_time = audio_feat, mask, res["audio_spans"]
    return feats


# --------------------------------------------------------------------------
# CLI


def report(summary: Summary, opt: Options, console) -> int:
    """Print the summary table and one line per problem; return the exit code."""
    from rich.table import Table

    plan = summary.plan
    t = Table(title=f"varcmp-extract: {opt.out} [{opt.split}]" + (
        f" shard {opt.shard_index + 1}/{opt.num_shards}" if opt.num_shards > 1 else ""))
    for col in ("videos", "before", "new", "failed", "frames", "captions", "time", "frames/s"):
        t.add_column(col, justify="right")
    t.add_row(str(summary.total), str(summary.already), str(summary.done), str(len(summary.failed)),
              str(summary.frames), str(summary.queries), f"{summary.seconds:.1f} s",
              f"{summary.frames / max(summary.seconds, 1e-9):.1f}")
    console.print(t)
    for path, why in summary.failed:
        console.print(f"[red]failed[/red] {path}: {why}", highlight=False, soft_wrap=True)
    for line in plan.rejected:
        console.print(f"[red]rejected[/red] {line}", highlight=False, soft_wrap=True)
    for line in plan.missing:
        console.print(f"[yellow]missing[/yellow] {line}", highlight=False, soft_wrap=True)
    if plan.uncaptioned:
        console.print(f"{plan.uncaptioned} videos have no caption (kept as distractors)")
    if summary.interrupted:
        console.print("[yellow]interrupted[/yellow]: finished videos are saved; run the same command again to resume")
        return 130
    return 1 if (summary.failed or plan.rejected or plan.missing) else 0


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("videos", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Cache to write or add to: a Zarr directory, or NAME.h5 for HDF5.")
@click.option("--annotations", "-a", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Caption file (.xlsx in the UCFCrime-AR layout, .csv or .jsonl with video,text).")
@click.option("--split", default="train", help="Name of the split this run extracts (one store holds several).")
@click.option("--audio", default=None, metavar="video|DIR",
              help="Audio queries: 'video' uses each video's own track; DIR holds files named by video stem.")
@click.option("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP hub id or local directory.")
@click.option("--clap-model", default="laion/clap-htsat-fused", help="CLAP hub id or local directory (with --audio).")
@click.option("--frames", default=32, type=click.IntRange(1, 1024), help="Frames sampled per video (N_v).")
@click.option("--max-words", default=32, type=click.IntRange(3, 77), help="Text tokens per caption, start/end included.")
@click.option("--audio-segments", default=32, type=click.IntRange(1, 256), help="Audio windows per video (N_a).")
@click.option("--batch-size", default=64, type=click.IntRange(1), help="Frames (or audio windows) per encoder forward.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("--workers", default=max(1, min(8, (os.cpu_count() or 2) // 2)), type=click.IntRange(0),
              help="Decoding processes (0: decode in the main process).")
@click.option("--all-videos", is_flag=True, help="With --annotations, also extract videos no caption names (distractors).")
@click.option("--overwrite", is_flag=True, help="Start the store over instead of resuming.")
@click.option("--num-shards", default=1, type=click.IntRange(1), help="Split the videos among this many processes.")
@click.option("--shard-index", default=0, type=click.IntRange(0), help="Which shard this process extracts.")
def main(videos, out, annotations, split, audio, clip_model, clap_model, frames, max_words, audio_segments,
         batch_size, device, workers, all_videos, overwrite, num_shards, shard_index):
    """Extract frozen CLIP (and CLAP) features of the videos under VIDEOS into a cache.

    \b
    Examples:
      varcmp-extract videos/ --out cache.zarr --annotations ucf_crime_test.xlsx --split test
      varcmp-extract videos/ --out cache.zarr --audio video --split test
      varcmp-extract videos/ --out cache.zarr --clip-model /models/clip-vit-base-patch32

    Re-running the same command resumes: finished videos are kept, failed ones are retried.
    Shards: run N processes with --num-shards N --shard-index i (e.g. i=$SLURM_ARRAY_TASK_ID).
    """
    from rich.console import Console

    console = Console(stderr=True)
    opt = Options(root=videos, out=out, annotations=annotations, split=split, clip_model=clip_model,
                  clap_model=clap_model, audio=audio, frames=frames, max_words=max_words,
                  audio_segments=audio_segments, batch_size=batch_size, device=device, workers=workers,
                  overwrite=overwrite, num_shards=num_shards, shard_index=shard_index, all_videos=all_videos)
    try:
        summary = run(opt, console)
    except (CacheError, AnnotationError, RuntimeError, click.UsageError) as e:
        console.print(f"[red]error[/red]: {e.format_message() if isinstance(e, click.UsageError) else e}",
                      highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(report(summary, opt, console))


if __name__ == "__main__":
    main()
