"""The feature cache: the one place that defines what `varcmp-extract` writes
and what training, evaluation and search read.

A cache is a Zarr directory (default) or an HDF5 file (`*.h5`, `*.hdf5`) with
the same layout::

    /                         attrs["varcmp"] = {schema_version, spec, encoders, preprocessing}
    /<split>/                 attrs["varcmp_split"] = {source, annotations, rejected, ...}
    /<split>/videos/path      str   [V]            relative to the video root (also the video id)
    /<split>/videos/label     int8  [V]            0 normal, 1 anomalous
    /<split>/videos/category  str   [V]
    /<split>/videos/status    int8  [V]            0 pending, 1 done, 2 failed   (chunk 1)
    /<split>/videos/error     str   [V]            why a video failed            (chunk 1)
    /<split>/videos/note      str   [V]            non-fatal remarks             (chunk 1)
    /<split>/videos/duration  f8    [V]            seconds
    /<split>/videos/fps       f4    [V]
    /<split>/videos/frame_time f4   [V, N]         seconds of each sampled frame
    /<split>/videos/frame_mask bool [V, N]
    /<split>/videos/frame_feat f2   [V, N, C]      projected [CLS] per frame
    /<split>/videos/patch_feat f2   [V, N, P, C]   projected patch tokens
    /<split>/videos/audio_feat f2   [V, Na, Ca]    CLAP window embeddings   (audio caches)
    /<split>/videos/audio_mask bool [V, Na]                                 (audio caches)
    /<split>/videos/audio_time f4   [V, Na, 2]     window start/end seconds (audio caches)
    /<split>/text/text        str   [Q]                                     (caption caches)
    /<split>/text/video_index int32 [Q]            row of /videos it describes
    /<split>/text/row         int32 [Q]            row in the annotation file
    /<split>/text/status      int8  [Q]            0 pending, 1 done (chunked like the features)
    /<split>/text/word_feat   f2    [Q, L, C]
    /<split>/text/word_mask   bool  [Q, L]
    /<split>/text/sentence    f2    [Q, C]

Every per-video array has one chunk per video, so that parallel writers never
share a chunk, and `status` is written after the data: a video counts as done
only once all of its data is on disk.

Completeness and finalization. A split is *complete* when every video in it is
done or failed (none is still pending) and every caption is encoded; this is
read from the `status` arrays, which are the truth. `CacheWriter.finalize` checks
that and, for a complete split, records the counts in the split's attributes::

    /<split>/                 attrs["varcmp_final"] = {complete: true, videos, done, failed,
                                                       not_extracted: 0, captions, captions_encoded}

then writes Zarr's consolidated metadata (one read opens the store). A run that
has work to do sets `{complete: false}` first, so the record never describes a
split that is being written. Readers (`Cache.split`) trust a `complete: true`
record and otherwise check the status arrays: a split with videos still pending
or captions not encoded gives an `IncompleteCacheWarning` naming the missing
videos (or a CacheError with `incomplete="error"`); the extracted videos can
still be read.

Writes that fail in the operating system (disk full, read-only file system,
file size limit) raise `CacheWriteError`, a CacheError whose one-line message
names the store. Nothing half-written is ever counted: the done flag comes last.

Test-only fault hook: with the environment variable `VARCMP_FAULT=POINT:N` (several
comma-separated; `POINT:N@R` only where the environment's `RANK` is R, 0 if unset), the process
kills itself with SIGKILL the N-th time it reaches POINT. Points: `mid-data`
(a video's frame arrays written, its patch tokens not yet), `after-data` (all of a
video's data written, its done flag not yet), `finalize` (a split's final record
written, the consolidated metadata not yet) and, in `varcmp.extract`, `forward`
(a video's first CLIP forward done, nothing of it written yet). It exists so that
tests can kill a run at an exact point (tests/test_extract_faults.py); never set it
otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .media import within

SCHEMA_VERSION = 1

PENDING, DONE, FAILED = 0, 1, 2
TEXT_CHUNK = 64

ROOT_KEY = "varcmp"
LOCK_NAME = ".varcmp.lock"  # inside a Zarr store: serialises metadata changes of writers (see extract)
RUN_LOCK_NAME = ".varcmp.run.lock"  # inside a Zarr store: held by every writer for its whole run (see extract)
LOCK_NAMES = (LOCK_NAME, RUN_LOCK_NAME)
SPLIT_KEY = "varcmp_split"
FINAL_KEY = "varcmp_final"  # split attribute written by CacheWriter.finalize
FAULT_ENV = "VARCMP_FAULT"  # test-only fault hook, see the module docstring


class CacheError(Exception):
    """A cache that cannot be used; the message is one line naming the store."""


class CacheWriteError(CacheError):
    """The operating system refused a write to the store (disk full, read-only, ...)."""


class DamagedCacheError(CacheError):
    """Stored features that cannot be decoded (a corrupt chunk) or are NaN / infinite; the
    message names the video (or caption) and the store."""


class IncompleteCacheWarning(UserWarning):
    """A split is read whose extraction has not finished (videos pending or captions not encoded)."""


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only: SIGKILL this process at the N-th arrival at point `name` when `VARCMP_FAULT`
    asks for it (see the module docstring). Does nothing when the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _FAULT_COUNTS[name] = n = _FAULT_COUNTS.get(name, 0) + 1
    for item in spec.split(","):
        point, _, rest = item.strip().partition(":")
        count, _, rank = rest.partition("@")
        if point == name and count.strip().isdigit() and int(count) == n and (
                not rank or os.environ.get("RANK", "0") == rank.strip()):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _writing(path: Path, what: str = "write to the store"):
    """Turn an operating-system error of a write into a one-line CacheWriteError naming the store."""
    try:
        yield
    except CacheError:
        raise
    except OSError as e:
        raise CacheWriteError(f"{path}: cannot {what} ({e.strerror or e})") from None


@dataclass(frozen=True)
class CacheSpec:
    """The dimensions every array of a cache agrees on."""

    num_frames: int = 32
    num_patches: int = 49
    dim: int = 512
    max_words: int = 32
    audio_segments: int = 0  # 0: no audio in this cache
    audio_dim: int = 512

    @property
    def has_audio(self) -> bool:
        return self.audio_segments > 0


@dataclass
class VideoEntry:
    path: str  # relative to the video root, POSIX separators
    label: int = 1
    category: str = ""


@dataclass
class QueryEntry:
    text: str
    video_index: int
    row: int = -1


@dataclass
class VideoFeatures:
    """Everything stored for one successfully extracted video."""

    duration: float
    fps: float
    frame_time: np.ndarray  # [N]
    frame_mask: np.ndarray  # [N] bool
    frame_feat: np.ndarray  # [N, C]
    patch_feat: np.ndarray  # [N, P, C]
    audio_feat: np.ndarray | None = None  # [Na, Ca]
    audio_mask: np.ndarray | None = None  # [Na]
    audio_time: np.ndarray | None = None  # [Na, 2]
    note: str = ""


@dataclass
class Completeness:
    """Where the extraction of one split stands, read from its status arrays."""

    split: str
    videos: int
    done: int
    failed: int
    missing: list[str]  # paths of the videos neither done nor failed (not extracted yet)
    captions: int = 0
    captions_encoded: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing and self.captions_encoded == self.captions

    def record(self) -> dict:
        """The split attribute `varcmp_final` that finalization writes."""
        return {"complete": self.complete, "videos": self.videos, "done": self.done, "failed": self.failed,
                "not_extracted": len(self.missing), "captions": self.captions,
                "captions_encoded": self.captions_encoded}

    def describe(self, path, limit: int = 3) -> str:
        """One line: what is missing (or that nothing is)."""
        parts = []
        if self.missing:
            names = ", ".join(self.missing[:limit]) + (", ..." if len(self.missing) > limit else "")
            parts.append(f"{len(self.missing)} of {self.videos} videos not extracted ({names})")
        if self.captions_encoded < self.captions:
            parts.append(f"{self.captions - self.captions_encoded} of {self.captions} captions not encoded")
        if not parts:
            return f"{path}: split '{self.split}' is complete ({self.done} videos extracted, {self.failed} failed)"
        return f"{path}: split '{self.split}' is incomplete: " + "; ".join(parts)


def _completeness(store, name: str) -> Completeness:
    status = np.asarray(store.array(f"{name}/videos/status")[:])
    pending = np.flatnonzero((status != DONE) & (status != FAILED))
    missing = list(store.read_str(f"{name}/videos/path")[pending]) if len(pending) else []
    c = Completeness(name, len(status), int((status == DONE).sum()), int((status == FAILED).sum()),
                     [str(m) for m in missing])
    if store.has(f"{name}/text/status"):
        t = np.asarray(store.array(f"{name}/text/status")[:])
        c.captions, c.captions_encoded = len(t), int((t == DONE).sum())
    return c


def video_arrays(spec: CacheSpec, n: int) -> dict[str, tuple[tuple, str, tuple, Any]]:
    """name -> (shape, dtype, chunks, fill) of the per-video arrays."""
    N, P, C = spec.num_frames, spec.num_patches, spec.dim
    a = {
        "path": ((n,), "str", (max(n, 1),), ""),
        "label": ((n,), "int8", (max(n, 1),), 0),
        "category": ((n,), "str", (max(n, 1),), ""),
        "status": ((n,), "int8", (1,), PENDING),
        "error": ((n,), "str", (1,), ""),
        "note": ((n,), "str", (1,), ""),
        "duration": ((n,), "float64", (1,), 0.0),
        "fps": ((n,), "float32", (1,), 0.0),
        "frame_time": ((n, N), "float32", (1, N), 0.0),
        "frame_mask": ((n, N), "bool", (1, N), False),
        "frame_feat": ((n, N, C), "float16", (1, N, C), 0.0),
        "patch_feat": ((n, N, P, C), "float16", (1, N, P, C), 0.0),
    }
    if spec.has_audio:
        Na, Ca = spec.audio_segments, spec.audio_dim
        a["audio_feat"] = ((n, Na, Ca), "float16", (1, Na, Ca), 0.0)
        a["audio_mask"] = ((n, Na), "bool", (1, Na), False)
        a["audio_time"] = ((n, Na, 2), "float32", (1, Na, 2), 0.0)
    return a


def text_arrays(spec: CacheSpec, q: int) -> dict[str, tuple[tuple, str, tuple, Any]]:
    L, C = spec.max_words, spec.dim
    k = TEXT_CHUNK
    return {
        "text": ((q,), "str", (max(q, 1),), ""),
        "video_index": ((q,), "int32", (max(q, 1),), -1),
        "row": ((q,), "int32", (max(q, 1),), -1),
        "status": ((q,), "int8", (k,), PENDING),
        "word_feat": ((q, L, C), "float16", (k, L, C), 0.0),
        "word_mask": ((q, L), "bool", (k, L), False),
        "sentence": ((q, C), "float16", (k, C), 0.0),
    }


# --------------------------------------------------------------------------
# Backends: the same small interface over a Zarr group and an HDF5 file.


def is_hdf5(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


class _ZarrStore:
    def __init__(self, path: Path, mode: str):
        import zarr

        self.path = path
        self.writable = mode != "r"
        if mode == "r":
            self.root = zarr.open_group(str(path), mode="r")
        else:  # writers look at the store itself: consolidated metadata would hide new arrays
            self.root = zarr.open_group(str(path), mode="a", use_consolidated=False)

    def has(self, key: str) -> bool:
        try:
            self.root[key]
            return True
        except KeyError:
            return False

    def create_array(self, key, shape, dtype, chunks, fill):
        dt = str if dtype == "str" else dtype
        return self.root.create_array(key, shape=shape, dtype=dt, chunks=chunks, fill_value=fill, overwrite=True)

    def array(self, key):
        return self.root[key]

    def read_str(self, key, index=slice(None)) -> np.ndarray:
        return np.asarray(self.root[key][index]).astype(object)

    def get_attrs(self, key: str) -> dict:
        node = self.root if key == "" else self.root[key]
        return dict(node.attrs)

    def set_attrs(self, key: str, attrs: dict) -> None:
        node = self.root if key == "" else self.root.require_group(key)
        node.attrs.update(attrs)

    def groups(self, key: str = "") -> list[str]:
        import warnings

        node = self.root if key == "" else self.root[key]
        with warnings.catch_warnings():  # the writers' lock file, or a .partial file of a killed write
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            return sorted(node.group_keys())

    def delete(self, key: str) -> None:
        if self.has(key):
            del self.root[key]

    def consolidate(self) -> None:
        import warnings

        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _H5Store:
    def __init__(self, path: Path, mode: str):
        import h5py

        self.path = path
        self.writable = mode != "r"
        self.f = h5py.File(path, "r" if mode == "r" else "a")

    def has(self, key):
        return key in self.f

    def create_array(self, key, shape, dtype, chunks, fill):
        import h5py

        if key in self.f:
            del self.f[key]
        chunks = tuple(min(c, s) for c, s in zip(chunks, shape)) if all(shape) else None  # HDF5: chunk <= shape
        if dtype == "str":
            return self.f.create_dataset(key, shape=shape, dtype=h5py.string_dtype(), chunks=chunks)
        return self.f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fill)

    def array(self, key):
        return self.f[key]

    def read_str(self, key, index=slice(None)) -> np.ndarray:
        return np.asarray(self.f[key].asstr()[index], dtype=object)

    def get_attrs(self, key):
        node = self.f if key == "" else self.f[key]
        raw = node.attrs.get("json")
        return json.loads(raw) if raw else {}

    def set_attrs(self, key, attrs):
        node = self.f if key == "" else self.f.require_group(key)
        cur = self.get_attrs(key) if key == "" or key in self.f else {}
        cur.update(attrs)
        node.attrs["json"] = json.dumps(cur)

    def groups(self, key=""):
        import h5py

        node = self.f if key == "" else self.f[key]
        return sorted(k for k, v in node.items() if isinstance(v, h5py.Group))

    def delete(self, key):
        if key in self.f:
            del self.f[key]

    def consolidate(self):
        self.f.flush()

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def _open_store(path: Path, mode: str):
    if is_hdf5(path):
        return _H5Store(path, mode)
    return _ZarrStore(path, mode)


def finish_pending_io(timeout: float = 5.0) -> None:
    """Let the reads and writes that an interrupted call (Ctrl-C) left running on zarr's I/O
    thread end, cancelling those not done within `timeout` seconds. Without this, the interpreter
    closes that loop at exit and asyncio prints "Task was destroyed but it is pending!" for each."""
    import asyncio
    import sys

    sync = sys.modules.get("zarr.core.sync")  # zarr's own loop; absent: no store was ever opened
    loop = sync.loop[0] if sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def settle():
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout + 1)
    except Exception:  # noqa: BLE001 - the process is stopping anyway: never a traceback from here
        pass


# --------------------------------------------------------------------------
# Writer


class CacheWriter:
    """Create a cache (or open one to add to it) and write splits into it."""

    def __init__(self, path, spec: CacheSpec, encoders: dict, preprocessing: dict, overwrite: bool = False):
        self.path = Path(path)
        self.spec = spec
        with _writing(self.path):
            if overwrite:
                remove_store(self.path)
            probe_target(self.path)
            self.store = _open_store(self.path, "a")
            meta = json.loads(json.dumps({  # as it will read back (tuples become lists)
                "schema_version": SCHEMA_VERSION,
                "varcmp_version": __version__,
                "spec": asdict(spec),
                "encoders": encoders,
                "preprocessing": preprocessing,
            }))
            old = self.store.get_attrs("").get(ROOT_KEY)
            if old is None:
                self.store.set_attrs("", {ROOT_KEY: meta})
            else:
                _check_compatible(self.path, old, meta)

    @classmethod
    def open(cls, path) -> "CacheWriter":
        """An existing cache, opened to finalize it (its spec is the stored one)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        if _is_empty(self.path):
            raise CacheError(f"{self.path}: no such cache")
        probe_target(self.path)
        with _writing(self.path, "open the store for writing"):
            self.store = _open_store(self.path, "a")
        self.spec = CacheSpec(**self.store.get_attrs("")[ROOT_KEY]["spec"])
        return self

    def splits(self) -> list[str]:
        return [g for g in self.store.groups() if self.store.has(f"{g}/videos/status")]

    def split(self, name: str, videos: Sequence[VideoEntry], queries: Sequence[QueryEntry] | None = None,
              attrs: dict | None = None) -> "SplitWriter":
        """Create split `name`, or reopen it when it exists with the same videos and queries."""
        _check_split_name(self.path, name)
        with _writing(self.path):
            return self._split(name, videos, queries, attrs)

    def _split(self, name, videos, queries, attrs) -> "SplitWriter":
        if self.store.has(f"{name}/videos/path"):
            sw = SplitWriter(self.store, self.path, name, self.spec)
            sw._check_same(videos, queries)
            if attrs:
                self.store.set_attrs(name, {SPLIT_KEY: {**self.store.get_attrs(name).get(SPLIT_KEY, {}), **attrs}})
            return sw
        self.store.delete(name)
        for key, (shape, dtype, chunks, fill) in video_arrays(self.spec, len(videos)).items():
            self.store.create_array(f"{name}/videos/{key}", shape, dtype, chunks, fill)
        arr = self.store.array
        if videos:
            arr(f"{name}/videos/path")[:] = np.array([v.path for v in videos], dtype=object if is_hdf5(self.path) else str)
            arr(f"{name}/videos/label")[:] = np.array([v.label for v in videos], dtype=np.int8)
            arr(f"{name}/videos/category")[:] = np.array([v.category for v in videos], dtype=object if is_hdf5(self.path) else str)
        if queries is not None:
            for key, (shape, dtype, chunks, fill) in text_arrays(self.spec, len(queries)).items():
                self.store.create_array(f"{name}/text/{key}", shape, dtype, chunks, fill)
            if queries:
                arr(f"{name}/text/text")[:] = np.array([q.text for q in queries], dtype=object if is_hdf5(self.path) else str)
                arr(f"{name}/text/video_index")[:] = np.array([q.video_index for q in queries], dtype=np.int32)
                arr(f"{name}/text/row")[:] = np.array([q.row for q in queries], dtype=np.int32)
        self.store.set_attrs(name, {SPLIT_KEY: dict(attrs or {})})
        self.store.consolidate()
        return SplitWriter(self.store, self.path, name, self.spec)

    def finalize(self, names: Sequence[str] | None = None) -> list[Completeness]:
        """Check the given splits (default: every split); record each complete one as final
        (`varcmp_final`, see the module docstring); then write the consolidated metadata.
        An incomplete split is left as it is. Returns the state of each split."""
        names = self.splits() if names is None else list(names)
        out = []
        with _writing(self.path):
            for name in names:
                c = _completeness(self.store, name)
                if c.complete and self.store.get_attrs(name).get(FINAL_KEY) != c.record():
                    self.store.set_attrs(name, {FINAL_KEY: c.record()})
                out.append(c)
            fault_point("finalize")
            self.store.consolidate()
        return out

    def consolidate(self) -> None:
        with _writing(self.path):
            self.store.consolidate()

    def close(self) -> None:
        self.store.close()

    def finish(self) -> None:
        self.consolidate()
        self.store.close()



# ----------------------------------------------------------------------------- checked reads

def read_rows(arr, rows) -> np.ndarray:
    """arr[rows] of a lazy Zarr / HDF5 array (or numpy), any order, repeats allowed."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(arr, np.ndarray):
        return arr[rows]
    uniq, inv = np.unique(rows, return_inverse=True)
    if len(uniq) == 0:
        out = np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
    elif len(uniq) == arr.shape[0]:
        out = np.asarray(arr[:])
    elif hasattr(arr, "get_orthogonal_selection"):
        out = np.asarray(arr.get_orthogonal_selection((uniq,)))
    else:  # h5py: one row at a time is faster than its fancy indexing
        out = np.stack([np.asarray(arr[int(i)]) for i in uniq])
    return out if np.array_equal(uniq, rows) else out[inv.reshape(-1)]


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


DAMAGED = ("the cache is damaged there: extract that video again (the same varcmp-extract command with --redo "
           "and the video's path), or restore the cache from a copy")


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """[n] bool: row i of `a` holds only finite values. One float64 sum per row (a NaN or an
    infinity makes the sum non-finite; +inf and -inf together give NaN), no temporary the size
    of `a`: cheap enough for every read."""
    if a.dtype.kind not in "fc" or len(a) == 0:
        return np.ones(len(a), dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(a.reshape(len(a), -1).sum(axis=1, dtype=np.float64))


def check_finite(a: np.ndarray, rows: np.ndarray, key: str, describe) -> None:
    """DamagedCacheError naming the first row of `rows` whose data in `a` is NaN or infinite."""
    ok = _finite_rows(a)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise DamagedCacheError(f"{describe(int(np.asarray(rows)[bad[0]]))}: its {key} holds NaN or infinite values"
                         f"{more}; {DAMAGED}")


def read_checked(arr, rows, key: str, describe) -> np.ndarray:
    """read_rows, with one-line DamagedCacheErrors naming the video (describe(row) -> text) whose data
    cannot be read (a corrupt chunk: decompression fails) or is NaN / infinite."""
    rows = np.asarray(rows, dtype=np.int64)
    try:
        out = read_rows(arr, rows)
    except Exception:  # noqa: BLE001 - any backend failure: find the row, else re-raise
        for r in np.unique(rows):
            try:
                np.asarray(arr[int(r)])
            except Exception as e1:  # noqa: BLE001
                raise DamagedCacheError(f"{describe(int(r))}: its {key} cannot be read ({_first_line(e1)}); "
                                 f"{DAMAGED}") from None
        raise  # every row reads alone (e.g. out of memory): not a damaged chunk
    check_finite(out, rows, key, describe)
    return out


class SplitWriter:
    def __init__(self, store, path: Path, name: str, spec: CacheSpec):
        self.store, self.path, self.name, self.spec = store, path, name, spec

    def _a(self, key):
        return self.store.array(f"{self.name}/{key}")

    def _check_same(self, videos, queries):
        old = list(self.store.read_str(f"{self.name}/videos/path"))
        new = [v.path for v in videos]
        if old != new:
            raise CacheError(
                f"{self.path}: split '{self.name}' was extracted from a different list of videos "
                f"({len(old)} stored, {len(new)} now); use --overwrite to start over or another --split")
        has_text = self.store.has(f"{self.name}/text/text")
        if (queries is not None) != has_text or (
                queries is not None and list(self.store.read_str(f"{self.name}/text/text")) != [q.text for q in queries]):
            raise CacheError(
                f"{self.path}: split '{self.name}' was extracted with other captions; "
                "use --overwrite to start over or another --split")

    @property
    def num_videos(self) -> int:
        return self._a("videos/status").shape[0]

    def video_status(self) -> np.ndarray:
        return np.asarray(self._a("videos/status")[:])

    def text_status(self) -> np.ndarray | None:
        if not self.store.has(f"{self.name}/text/status"):
            return None
        return np.asarray(self._a("text/status")[:])

    def write_video(self, i: int, feats: VideoFeatures) -> None:
        """Write one video's data, then its done flag (the order makes a kill safe)."""
        a = self._a
        with _writing(self.path):
            a("videos/duration")[i] = feats.duration
            a("videos/fps")[i] = feats.fps
            a("videos/frame_time")[i] = feats.frame_time
            a("videos/frame_mask")[i] = feats.frame_mask
            a("videos/frame_feat")[i] = feats.frame_feat.astype(np.float16)
            fault_point("mid-data")
            a("videos/patch_feat")[i] = feats.patch_feat.astype(np.float16)
            if self.spec.has_audio and feats.audio_feat is not None:
                a("videos/audio_feat")[i] = feats.audio_feat.astype(np.float16)
                a("videos/audio_mask")[i] = feats.audio_mask
                a("videos/audio_time")[i] = feats.audio_time
            a("videos/note")[i] = feats.note
            a("videos/error")[i] = ""
            self.store.flush()
            fault_point("after-data")
            a("videos/status")[i] = DONE
            self.store.flush()

    def reset_video(self, i: int) -> None:
        """Video i is pending again (to be extracted anew); its data is overwritten when it is."""
        with _writing(self.path):
            self._a("videos/status")[i] = PENDING
            self.store.flush()

    def fail_video(self, i: int, reason: str) -> None:
        with _writing(self.path):
            self._a("videos/error")[i] = reason
            self.store.flush()
            self._a("videos/status")[i] = FAILED
            self.store.flush()

    def write_text(self, start: int, word_feat: np.ndarray, word_mask: np.ndarray, sentence: np.ndarray) -> None:
        """Write queries [start, start+len) (a whole number of chunks), then their done flags."""
        stop = start + len(word_feat)
        with _writing(self.path):
            self._a("text/word_feat")[start:stop] = word_feat.astype(np.float16)
            self._a("text/word_mask")[start:stop] = word_mask
            self._a("text/sentence")[start:stop] = sentence.astype(np.float16)
            self.store.flush()
            self._a("text/status")[start:stop] = DONE
            self.store.flush()

    def update_attrs(self, attrs: dict) -> None:
        cur = self.store.get_attrs(self.name).get(SPLIT_KEY, {})
        with _writing(self.path):
            self.store.set_attrs(self.name, {SPLIT_KEY: {**cur, **attrs}})

    def completeness(self) -> Completeness:
        return _completeness(self.store, self.name)

    def mark_unfinished(self) -> None:
        """Before a run writes to this split: it is not final until finalized again."""
        with _writing(self.path):
            self.store.set_attrs(self.name, {FINAL_KEY: {"complete": False}})


# --------------------------------------------------------------------------
# Reader


@dataclass
class VideoData:
    """Loaded per-video arrays of one split (rows follow `index`)."""

    index: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    categories: np.ndarray
    frame_feat: np.ndarray
    frame_mask: np.ndarray
    frame_time: np.ndarray
    patch_feat: np.ndarray | None = None
    audio_feat: np.ndarray | None = None
    audio_mask: np.ndarray | None = None
    audio_time: np.ndarray | None = None


@dataclass
class TextData:
    text: np.ndarray
    video_index: np.ndarray
    word_feat: np.ndarray
    word_mask: np.ndarray
    sentence: np.ndarray
    done: np.ndarray


@dataclass
class Split:
    cache: "Cache"
    name: str
    attrs: dict = field(default_factory=dict)

    def _a(self, key):
        return self.cache.store.array(f"{self.name}/{key}")

    def _s(self, key, index=slice(None)):
        return self.cache.store.read_str(f"{self.name}/{key}", index)

    @property
    def num_videos(self) -> int:
        return int(self._a("videos/status").shape[0])

    @property
    def paths(self) -> np.ndarray:
        return self._s("videos/path")

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._a("videos/label")[:])

    @property
    def categories(self) -> np.ndarray:
        return self._s("videos/category")

    @property
    def status(self) -> np.ndarray:
        return np.asarray(self._a("videos/status")[:])

    @property
    def errors(self) -> np.ndarray:
        return self._s("videos/error")

    @property
    def notes(self) -> np.ndarray:
        return self._s("videos/note")

    @property
    def durations(self) -> np.ndarray:
        return np.asarray(self._a("videos/duration")[:])

    @property
    def has_text(self) -> bool:
        return self.cache.store.has(f"{self.name}/text/text")

    @property
    def has_audio(self) -> bool:
        return self.cache.spec.has_audio

    def done_index(self) -> np.ndarray:
        return np.flatnonzero(self.status == DONE)

    @property
    def final(self) -> dict:
        """The record finalization wrote (`{}` when the split was never finalized)."""
        return dict(self.cache.store.get_attrs(self.name).get(FINAL_KEY) or {})

    def completeness(self) -> Completeness:
        """Where the extraction of this split stands, from its status arrays."""
        return _completeness(self.cache.store, self.name)

    def array(self, key: str):
        """A lazy handle on `videos/<key>` or `text/<key>` (numpy slicing, reads on demand)."""
        return self._a(key)

    def load_videos(self, index: Sequence[int] | np.ndarray | None = None, patches: bool = True,
                    audio: bool | None = None) -> VideoData:
        """Read the given videos (default: every done video) into memory."""
        idx = self.done_index() if index is None else np.asarray(index, dtype=np.int64)
        audio = self.has_audio if audio is None else audio
        if audio and not self.has_audio:
            raise CacheError(f"{self.cache.path}: split '{self.name}' holds no audio features (extract with --audio)")

        def rows(key):
            return read_checked(self._a(f"videos/{key}"), idx, f"videos/{key}", self.describe_video)

        paths, cats = self.paths, self.categories
        return VideoData(
            index=idx,
            paths=paths[idx],
            labels=self.labels[idx],
            categories=cats[idx],
            frame_feat=rows("frame_feat"),
            frame_mask=rows("frame_mask"),
            frame_time=rows("frame_time"),
            patch_feat=rows("patch_feat") if patches else None,
            audio_feat=rows("audio_feat") if audio else None,
            audio_mask=rows("audio_mask") if audio else None,
            audio_time=rows("audio_time") if audio else None,
        )

    def describe_video(self, row: int) -> str:
        """How an error names video `row`: its path, row and split, and the store."""
        return f"{self.cache.path}: video {self.paths[row]} (row {row} of split '{self.name}')"

    def load_text(self) -> TextData:
        if not self.has_text:
            raise CacheError(f"{self.cache.path}: split '{self.name}' holds no captions (extract with --annotations)")
        t = TextData(
            text=self._s("text/text"),
            video_index=np.asarray(self._a("text/video_index")[:]),
            word_feat=np.asarray(self._a("text/word_feat")[:]),
            word_mask=np.asarray(self._a("text/word_mask")[:]),
            sentence=np.asarray(self._a("text/sentence")[:]),
            done=np.asarray(self._a("text/status")[:]) == DONE,
        )
        done = np.flatnonzero(t.done)
        for key in ("word_feat", "sentence"):
            check_finite(getattr(t, key)[done], done, f"text/{key}",
                         lambda q: f"{self.cache.path}: caption {q} ({str(t.text[q])[:40]!r}, video "
                                   f"{self.paths[t.video_index[q]]}) of split '{self.name}'")
        return t


class Cache:
    """A validated, read-only view of a cache."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache")
        try:
            self.store = _open_store(self.path, "r")
        except Exception as e:  # noqa: BLE001 - any backend failure means "not a cache"
            raise CacheError(f"{self.path}: cannot be opened as a varcmp cache ({type(e).__name__}: {e})") from None
        meta = self.store.get_attrs("").get(ROOT_KEY)
        if not isinstance(meta, dict):
            raise CacheError(f"{self.path}: not a varcmp cache (no '{ROOT_KEY}' attributes)")
        _check_version(self.path, meta)
        self.meta = meta
        self.spec = CacheSpec(**meta["spec"])
        self.encoders: dict = meta.get("encoders", {})
        self.preprocessing: dict = meta.get("preprocessing", {})
        for name in self.splits:
            self._validate_split(name)

    @property
    def splits(self) -> list[str]:
        return [g for g in self.store.groups() if self.store.has(f"{g}/videos")]

    def split(self, name: str, incomplete: str = "warn") -> Split:
        """Split `name`. A split that is not finalized is checked: if videos are still pending or
        captions are not encoded, `incomplete` decides: "warn" (an IncompleteCacheWarning naming
        the missing videos; the extracted ones can be read), "error" (CacheError) or "ignore"."""
        if incomplete not in ("warn", "error", "ignore"):
            raise ValueError(f"incomplete={incomplete!r}: choose warn, error or ignore")
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise CacheError(f"{self.path}: no split '{name}' (splits: {have})")
        attrs = self.store.get_attrs(name)
        split = Split(self, name, attrs.get(SPLIT_KEY, {}))
        if incomplete != "ignore" and not (attrs.get(FINAL_KEY) or {}).get("complete"):
            c = split.completeness()
            if not c.complete:
                msg = (f"{c.describe(self.path)}; only the extracted videos are read. To finish it, run the same "
                       "varcmp-extract command again (with shards: every shard); "
                       f"'varcmp-extract --out {self.path} --finalize --split {name}' lists what is missing")
                if incomplete == "error":
                    raise CacheError(msg)
                warnings.warn(msg, IncompleteCacheWarning, stacklevel=2)
        return split

    def _validate_split(self, name: str) -> None:
        n = self.store.array(f"{name}/videos/status").shape[0] if self.store.has(f"{name}/videos/status") else None
        if n is None:
            raise CacheError(f"{self.path}: split '{name}' is missing array 'videos/status'")
        expected = {f"videos/{k}": v[0] for k, v in video_arrays(self.spec, n).items()}
        if self.store.has(f"{name}/text"):
            q = self.store.array(f"{name}/text/text").shape[0] if self.store.has(f"{name}/text/text") else 0
            expected.update({f"text/{k}": v[0] for k, v in text_arrays(self.spec, q).items()})
        for key, shape in expected.items():
            if not self.store.has(f"{name}/{key}"):
                raise CacheError(f"{self.path}: split '{name}' is missing array '{key}'")
            got = tuple(self.store.array(f"{name}/{key}").shape)
            if got != tuple(shape):
                raise CacheError(
                    f"{self.path}: array '{name}/{key}' has shape {got}, expected {tuple(shape)} "
                    f"from the cache's spec")

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path) -> Cache:
    """Open and validate a cache (Zarr directory or HDF5 file)."""
    return Cache(path)


# --------------------------------------------------------------------------


def _check_version(path: Path, meta: dict) -> None:
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        if isinstance(v, int) and v > SCHEMA_VERSION:
            raise CacheError(f"{path}: written with cache schema {v}, newer than this varcmp "
                             f"({__version__}, schema {SCHEMA_VERSION}); upgrade varcmp")
        raise CacheError(f"{path}: cache schema {v} is not supported (this varcmp reads schema "
                         f"{SCHEMA_VERSION}); extract again")


def _is_empty(path: Path) -> bool:
    """Nothing there yet (a directory holding only the writers' lock files counts as empty)."""
    if not path.exists():
        return True
    return path.is_dir() and all(p.name in LOCK_NAMES for p in path.iterdir())


def probe_target(path, replace: bool = False, keep: Sequence = ()) -> bool:
    """The rule for an output store, checked before anything is written to it or deleted: True
    when `path` holds a varcmp store, False when nothing is there yet (absent, or an empty
    folder). Anything else is refused (CacheError, one line), whatever the flags. With `replace`
    (the store is to be deleted) the store may not be, or hold, any of the paths in `keep` (what
    the command reads: the video root, a caption file, ...); without it the store is added to and
    must be of this schema version."""
    path = Path(path)
    if _is_empty(path):
        return False
    meta = _root_meta(path)
    if meta is None:
        raise CacheError(f"{path}: exists and is not a varcmp cache, so varcmp neither writes into it nor deletes "
                         "it; choose another output")
    if replace:
        for k in keep:
            if k is not None and within(k, path):
                raise CacheError(f"{path}: holds {k}, which this command reads, so it is not replaced; "
                                 "choose another output")
    else:
        _check_version(path, meta)
    return True


def remove_store(path, keep: Sequence = ()) -> None:
    """Delete the varcmp store at `path`, the one way varcmp deletes a store: only after
    `probe_target(path, replace=True, keep=keep)`, so nothing but a store of this tool is ever
    deleted. A Zarr store keeps its writers' lock files (a writer may hold them); a symbolic link
    inside it is removed, never followed."""
    path = Path(path)
    if not probe_target(path, replace=True, keep=keep):
        return
    with _writing(path, "delete the store"):
        if not path.is_dir():
            path.unlink()
            return
        for child in path.iterdir():
            if child.name in LOCK_NAMES:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _root_meta(path: Path) -> dict | None:
    """The root 'varcmp' attributes of the store at `path`, which the writer records before
    anything else: what makes a path recognisably a store of this tool (any schema version).
    None for anything else."""
    try:
        store = _open_store(path, "r")
    except Exception:  # noqa: BLE001 - whatever cannot be opened as a store is not one
        return None
    try:
        meta = store.get_attrs("").get(ROOT_KEY)
    except Exception:  # noqa: BLE001
        meta = None
    finally:
        store.close()
    return meta if isinstance(meta, dict) else None


def same_encoders(a: dict, b: dict) -> bool:
    """Same frozen encoders, by configuration and weights (not by the name they were loaded under)."""
    def strip(enc):
        return {k: ({kk: vv for kk, vv in v.items() if kk != "name"} if isinstance(v, dict) else v)
                for k, v in (enc or {}).items()}
    return strip(a) == strip(b)


def _check_compatible(path: Path, old: dict, new: dict) -> None:
    for key in ("spec", "encoders", "preprocessing"):
        same = same_encoders(old.get(key), new.get(key)) if key == "encoders" else old.get(key) == new.get(key)
        if not same:
            raise CacheError(
                f"{path}: was extracted with other {key} ({_diff(old.get(key), new.get(key))}); "
                "use another --out, or --overwrite to start over")


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)!r} stored, {b.get(k)!r} now" for k in keys[:3])
    return f"{a!r} stored, {b!r} now"


def _check_split_name(path: Path, name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CacheError(f"{path}: split name {name!r} must be letters, digits, '-', '_' or '.'")
