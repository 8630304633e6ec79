"""What to extract: the videos under the root, matched to their captions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..cache_schema import QueryEntry, VideoEntry
from .audio import AUDIO_EXTENSIONS
from .captions import label_from_path, read_captions, safe_relative
from .files import find_videos, within

# --------------------------------------------------------------------------
# What to extract


@dataclass
class Plan:
    videos: list[VideoEntry]
    queries: list[QueryEntry] | None
    rejected: list[str] = field(default_factory=list)  # caption rows refused (one line each)
    missing: list[str] = field(default_factory=list)  # caption rows whose video is not there
    uncaptioned: int = 0  # videos (of the split) that no caption names
    notes: list[str] = field(default_factory=list)  # skipped folders, dropped repeated caption rows


def make_plan(root: Path, annotations: Path | None, all_videos: bool = False) -> Plan:
    """The split's videos and queries. With a caption file the videos are those it names
    (plus every other video under the root with `all_videos`); without one, every video."""
    notes: list[str] = []
    found = find_videos(root, notes)
    if annotations is None:
        return Plan([_entry(p) for p in found], None, notes=notes)
    captions = read_captions(annotations, notes)
    by_name: dict[str, list[str]] = {}
    for p in found:
        by_name.setdefault(PurePosixPath(p).name, []).append(p)
    found_set = set(found)
    plan = Plan([], [], notes=notes)
    index: dict[str, int] = {}
    for c in captions:
        rel = _caption_video(c, root, annotations.name, found_set, by_name, plan)
        if rel is None:
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


def _caption_video(c, root: Path, where: str, found: set[str], by_name: dict[str, list[str]], plan: Plan) -> str | None:
    """The video under `root` that caption row `c` (of file `where`) names, or None when the row
    is refused (a line in plan.rejected) or its video is not there (plan.missing). A path that is
    not found names the one video of its file name under the root, if there is exactly one (a
    line in plan.notes)."""
    if c.problem:
        plan.rejected.append(f"{where} row {c.row}: {c.problem}")
        return None
    try:
        rel = safe_relative(c.video, root)
    except ValueError as e:
        plan.rejected.append(f"{where} row {c.row}: {e}")
        return None
    if not c.text:
        plan.rejected.append(f"{where} row {c.row}: empty caption for {rel!r}")
        return None
    if rel in found:
        return rel
    name = PurePosixPath(rel).name
    alt = by_name.get(name, [])
    if len(alt) == 1:  # the release's folder layout differs from the user's: say which file is used
        plan.notes.append(f"{where} row {c.row}: video {rel!r} not found; used {alt[0]!r}, the only video "
                          f"named {name!r} under {root}")
        return alt[0]
    if alt:
        shown = ", ".join(map(repr, alt[:5])) + (f" and {len(alt) - 5} more" if len(alt) > 5 else "")
        plan.rejected.append(f"{where} row {c.row}: video {rel!r} not found, and {len(alt)} videos are named "
                             f"{name!r} ({shown}); write its path relative to {root}")
        return None
    why = "not found" if (root / rel).exists() is False else "not a video file"
    plan.missing.append(f"{where} row {c.row}: video {rel!r} {why} under {root}")
    return None


def _entry(rel: str) -> VideoEntry:
    label, category = label_from_path(rel)
    return VideoEntry(rel, label, category)


def looks_local(name: str) -> bool:
    """A local path rather than a hub id ('namespace/name')."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def audio_source(audio: str | None, root: Path, rel: str, notes: list[str]) -> str | None:
    """Where a video's audio comes from: the video itself, a file named by its stem, or nowhere.
    A file of the --audio folder that is a link to outside it is skipped (a line in `notes`)."""
    if audio is None:
        return None
    if audio == "video":
        return str(root / rel)
    stem = PurePosixPath(rel).stem
    for ext in AUDIO_EXTENSIONS:
        for cand in (Path(audio) / PurePosixPath(rel).parent / (stem + ext), Path(audio) / (stem + ext)):
            if not cand.is_file():
                continue
            if within(cand, audio):
                return str(cand)
            notes.append(f"--audio {cand}: symbolic link to {os.path.realpath(cand)}, outside {audio}, skipped")
    return ""  # no file for this video
