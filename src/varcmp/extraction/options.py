"""What one extraction run is asked to do (`Options`), what it did (`Summary`), and the exit code
that follows from it when the shards do not agree on one (`exit_code_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cache.reader import Completeness
from ..media.plan import Plan


@dataclass
class Options:
    """The settings of one run (the command's options)."""

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
    distributed: bool = False  # shards from torchrun's RANK / WORLD_SIZE (set by the CLI, not by API users)
    redo: tuple[str, ...] = ()  # videos (paths relative to the root) to extract again although done


@dataclass
class Summary:
    """What a run did, for its report and exit code."""

    total: int = 0  # videos in this shard
    already: int = 0  # done before this run
    done: int = 0  # extracted by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this shard
    noted: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # (path, [(kind, text)]), this run
    failed_elsewhere: list[tuple[str, str]] = field(default_factory=list)  # other shards', when this one finalized
    frames: int = 0
    queries: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    video_seconds: float = 0.0  # the video loop alone (decode, encode, write)
    interrupted: bool = False
    plan: Plan | None = None
    final: Completeness | None = None  # the split's state when this process finalized it
    remaining: int = 0  # videos of the split not yet extracted when this process ended (not finalized)
    note: str = ""  # one line about finalization for the report
    exit_code: int | None = None  # decided by the run itself when shards agree on it (torchrun)


def exit_code_of(summary: Summary) -> int:
    """130 when interrupted, 1 when videos failed or caption rows were refused, else 0."""
    if summary.interrupted:
        return 130
    plan = summary.plan
    return 1 if (summary.failed or summary.failed_elsewhere or plan.rejected or plan.missing) else 0
