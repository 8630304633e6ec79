"""The videos of a folder, and writing test videos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .audio import AUDIO_RATE, audio_stream, mux_audio

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")


def within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it once every symbolic link of both is resolved
    (a link that loops or dangles is resolved as far as it goes)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def find_videos(root: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the video files under `root`, sorted. Symbolic links (to folders
    or files) are followed only when their target lies inside `root`; a folder reached a second
    time (a symlink loop, or two links to one folder) is skipped, and so is a folder that cannot
    be listed; each skip appends one line to `notes` (when given) naming the link or folder. The
    walk never hangs on a loop and never raises for one bad folder. A file symlink that loops or
    dangles (no target to read) is listed: reading it then fails with a one-line reason
    (MediaError), like any unreadable video."""
    root = Path(root)
    notes = [] if notes is None else notes
    seen: dict[tuple[int, int], str] = {}
    out = []

    def unlistable(e: OSError) -> None:
        where = _relative(e.filename, root) if e.filename is not None else "?"
        notes.append(f"{where}: cannot list folder ({e.strerror or e}), skipped")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        if not _first_visit(dirpath, root, seen, notes):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in sorted(dirnames) if _inside(Path(dirpath) / d, root, notes)]
        for f in filenames:
            if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".") and _inside(Path(dirpath) / f, root, notes):
                out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def _relative(p, root: Path) -> str:
    """How a note names `p`: relative to the root ("." for the root itself), else as it is."""
    try:
        r = Path(p).relative_to(root).as_posix()
    except ValueError:
        return str(p)
    return "." if r in ("", ".") else r


def _inside(p: Path, root: Path, notes: list[str]) -> bool:
    """False (and a note) for a symbolic link whose target lies outside the root."""
    if not os.path.islink(p) or not os.path.exists(p) or within(p, root):
        return True
    notes.append(f"{_relative(p, root)}: symbolic link to {os.path.realpath(p)}, outside the video root, skipped")
    return False


def _first_visit(dirpath: str, root: Path, seen: dict[tuple[int, int], str], notes: list[str]) -> bool:
    """Whether the walk reaches folder `dirpath` for the first time (by device and inode, recorded
    in `seen`). A folder that cannot be read, or is reached again (a symlink loop, or two links to
    one folder), is skipped with a note."""
    try:
        st = os.stat(dirpath)
    except OSError as e:
        notes.append(f"{_relative(dirpath, root)}: cannot read folder ({e.strerror or e}), skipped")
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        first, here = seen[key], _relative(dirpath, root)
        loop = first == "." or here.startswith(first + "/")
        why = "symlink loop back to" if loop else "same folder as"
        notes.append(f"{here}: {why} {first!r}, skipped")
        return False
    seen[key] = _relative(dirpath, root)
    return True


def write_video(path: str | os.PathLike, frames, fps: int = 10, audio: np.ndarray | None = None,
                audio_rate: int = AUDIO_RATE, gop: int | None = None) -> None:
    """Write RGB uint8 frames (and optional mono float audio) to an H.264/AAC mp4."""
    import av

    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if gop:
            v.codec_context.gop_size = gop
        a = audio_stream(c, audio_rate) if audio is not None else None
        for img in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            mux_audio(c, a, audio, audio_rate)
