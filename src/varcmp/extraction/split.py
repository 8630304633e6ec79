"""The store side of a run before it encodes: what the store records of it, the split made or
checked with --redo applied (`open_split`), and what --overwrite never deletes (`inputs_of`)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click
import numpy as np

from ..cache.locks import Locks
from ..cache.writer import CacheWriter, remove_store
from ..cache_schema import DONE, CacheSpec
from ..media.audio import AUDIO_MIX, AUDIO_RATE
from ..media.plan import Plan, looks_local
from .options import Options


def _reset(sw, plan: Plan, opt: Options, mine: np.ndarray) -> None:
    """--redo: the named videos (of this shard) are pending again, so this run extracts them anew
    (e.g. after a damaged chunk); their old data stays until the new data is written."""
    if not opt.redo:
        return
    row = {v.path: i for i, v in enumerate(plan.videos)}
    ours = set(int(i) for i in mine)
    for name in opt.redo:
        key = PurePosixPath(str(name).replace("\\", "/")).as_posix()
        if key not in row:
            raise click.UsageError(f"--redo {name}: not a video of split '{opt.split}' (give its path relative to "
                                   f"{opt.root}, as the error that named it did)")
        if row[key] in ours:
            sw.reset_video(row[key])


def inputs_of(opt: Options) -> list[Path]:
    """What an extraction reads, which --overwrite never deletes: the video root, the caption
    file, the audio folder and local model folders."""
    audio = opt.audio if opt.audio != "video" else None
    models = [Path(m).expanduser() for m in (opt.clip_model, opt.clap_model) if m and looks_local(m)]
    return [Path(p) for p in (opt.root, opt.annotations, audio) if p] + models


def _records(opt: Options, plan: Plan, clip, clap) -> tuple[CacheSpec, dict, dict, dict]:
    """What the store records of this run: its spec, encoders and preprocessing, and the split's attributes."""
    spec = CacheSpec(num_frames=opt.frames, num_patches=clip.num_patches, dim=clip.dim, max_words=opt.max_words,
                     audio_segments=opt.audio_segments if clap else 0, audio_dim=clap.dim if clap else 512)
    encoders = {"clip": clip.info(), "clap": clap.info() if clap else None}
    preprocessing = {
        "frames": "centres of N equal segments of the video (first frame to the end of the last); the frame on "
                  "screen at each, upright (display rotation applied); fewer frames -> mask",
        "image_processor": {k: v for k, v in clip.processor.to_dict().items() if not k.startswith("_")},
        "text": (f"captions cleaned as OpenAI's CLIP tokenizer does (ftfy, HTML entities), CLIP tokenizer, "
                 f"{opt.max_words} tokens incl. start/end, words = text_projection(last_hidden_state)"),
        "audio": (f"{AUDIO_MIX}, {AUDIO_RATE} Hz; {opt.audio_segments} windows centred on the frame times, "
                  "clamp(duration/N_a, 1 s, 10 s) long; CLAP get_audio_features, is_longer=False") if clap else None,
    }
    split_attrs = {"root": str(opt.root.resolve()), "annotations": str(opt.annotations) if opt.annotations else None,
                   "audio": opt.audio, "rejected": plan.rejected, "missing": plan.missing,
                   "plan_notes": plan.notes}
    return spec, encoders, preprocessing, split_attrs


def open_split(opt: Options, plan: Plan, clip, clap, mine: np.ndarray, locks: Locks):
    """(writer, split writer, this shard's videos still to extract), under the metadata lock: the
    store made or checked, the split made or checked, --redo applied, the split unfinalized when
    this run writes to it."""
    spec, encoders, preprocessing, split_attrs = _records(opt, plan, clip, clap)
    with locks.meta():
        if opt.overwrite:
            remove_store(opt.out, keep=inputs_of(opt))
        writer = CacheWriter(opt.out, spec, encoders, preprocessing)
        try:
            sw = writer.split(opt.split, plan.videos, plan.queries, split_attrs)
            _reset(sw, plan, opt, mine)
            status = sw.video_status()
            todo = [int(i) for i in mine if status[i] != DONE]
            text_status = sw.text_status()
            if todo or (opt.shard_index == 0 and text_status is not None and (text_status != DONE).any()):
                sw.mark_unfinished()  # no longer final: this run writes to it
            writer.consolidate()
        except BaseException:
            writer.close()
            raise
    return writer, sw, todo
