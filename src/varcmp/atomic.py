"""Crash-safe files: written to a temporary file, fsynced, renamed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_prefix(path: Path) -> str:
    """The name prefix of atomic_write's temp files for `path` (".NAME."): a process killed while
    writing leaves such a file, never a partial `path`; see stale_temp_files."""
    return f".{Path(path).name}."


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it over `path` and fsync the directory: a reader
    never sees a partial file, even after a crash or `kill -9` (the old file, or the new one,
    is there whole). On any error the temp file is removed and the error re-raised; only a
    process killed mid-write leaves its temp file (".NAME.*.tmp", never NAME itself)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions a plain open() gives (mkstemp's are 0600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # already renamed, or the directory refuses: the original error matters
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: Path, names) -> list[Path]:
    """Temp files that atomic_write left in `folder` for files named `names` (a writer killed
    mid-write). Only call this while no other process writes those files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = tuple(tmp_prefix(folder / n) for n in names)
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(prefixes) and p.name.endswith(TMP_SUFFIX) and p.is_file())
