"""Reading a cache: a split's columns, and its feature rows through `Split.read`, checked so that a damaged chunk
or a NaN is a one-line error naming the video (or caption)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..cache_schema import (DONE, FAILED, FINAL_KEY, ROOT_KEY, SCHEMA_VERSION, SPLIT_KEY, CacheError, CacheSpec,
                            DamagedCacheError, IncompleteCacheWarning, text_arrays, video_arrays)
from ..errors import first_line
from .store import open_store


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


def completeness_of(store, name: str) -> Completeness:
    status = np.asarray(store.array(f"{name}/videos/status")[:])
    pending = np.flatnonzero((status != DONE) & (status != FAILED))
    missing = list(store.read_str(f"{name}/videos/path")[pending]) if len(pending) else []
    c = Completeness(name, len(status), int((status == DONE).sum()), int((status == FAILED).sum()),
                     [str(m) for m in missing])
    if store.has(f"{name}/text/status"):
        t = np.asarray(store.array(f"{name}/text/status")[:])
        c.captions, c.captions_encoded = len(t), int((t == DONE).sum())
    return c


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
                raise DamagedCacheError(f"{describe(int(r))}: its {key} cannot be read ({first_line(e1)}); "
                                 f"{DAMAGED}") from None
        raise  # every row reads alone (e.g. out of memory): not a damaged chunk
    check_finite(out, rows, key, describe)
    return out


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
    """One split of a cache: its per-video columns, and its feature rows read through `read`."""

    cache: "Cache"
    name: str
    attrs: dict = field(default_factory=dict)
    _arrays: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # lazy handles, opened once

    def _a(self, key):
        if key not in self._arrays:
            self._arrays[key] = self.cache.store.array(f"{self.name}/{key}")
        return self._arrays[key]

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

    @property
    def has_frame_labels(self) -> bool:
        return self.cache.store.has(f"{self.name}/videos/frame_label")

    def frame_labels(self, rows) -> np.ndarray | None:
        """The stored per-frame labels of videos `rows`, [len(rows), N] int8 (1 anomalous, 0 normal,
        -1 unknown), or None when the split has none (see cache_schema)."""
        return np.asarray(read_rows(self._a("videos/frame_label"), rows)) if self.has_frame_labels else None

    def done_index(self) -> np.ndarray:
        return np.flatnonzero(self.status == DONE)

    @property
    def final(self) -> dict:
        """The record finalization wrote (`{}` when the split was never finalized)."""
        return dict(self.cache.store.get_attrs(self.name).get(FINAL_KEY) or {})

    def completeness(self) -> Completeness:
        """Where the extraction of this split stands, from its status arrays."""
        return completeness_of(self.cache.store, self.name)

    def array(self, key: str):
        """A lazy handle on `videos/<key>` or `text/<key>` (numpy slicing, reads on demand)."""
        return self._a(key)

    def read(self, keys: Sequence[str], rows, describe=None) -> dict[str, np.ndarray]:
        """The arrays `keys` (`videos/<name>` or `text/<name>`) at `rows` (any order, repeats
        allowed), by name. Checked: a chunk that cannot be read or a NaN / infinite value is a
        one-line DamagedCacheError naming the row by `describe(row)` (default: the video, or the
        caption, of the row). The one way features are read from a split."""
        rows = np.asarray(rows, dtype=np.int64)
        return {key.split("/")[-1]: read_checked(self._a(key), rows, key, describe or self._describer(key))
                for key in keys}

    def _describer(self, key: str):
        return self.describe_caption if key.startswith("text/") else self.describe_video

    def load_videos(self, index: Sequence[int] | np.ndarray | None = None, patches: bool = True,
                    audio: bool | None = None) -> VideoData:
        """Read the given videos (default: every done video) into memory."""
        idx = self.done_index() if index is None else np.asarray(index, dtype=np.int64)
        audio = self.has_audio if audio is None else audio
        if audio and not self.has_audio:
            raise CacheError(f"{self.cache.path}: split '{self.name}' holds no audio features (extract with --audio)")
        keys = (["frame_feat", "frame_mask", "frame_time"] + (["patch_feat"] if patches else [])
                + (["audio_feat", "audio_mask", "audio_time"] if audio else []))
        got = self.read([f"videos/{k}" for k in keys], idx)
        return VideoData(index=idx, paths=self.paths[idx], labels=self.labels[idx], categories=self.categories[idx],
                         **got)

    def describe_video(self, row: int) -> str:
        """How an error names video `row`: its path, row and split, and the store."""
        return f"{self.cache.path}: video {self.paths[row]} (row {row} of split '{self.name}')"

    def describe_caption(self, row: int) -> str:
        """How an error names caption `row`: its start, its video, its split, and the store."""
        text, video = self._s("text/text")[row], self.paths[int(np.asarray(self._a("text/video_index")[row]))]
        return f"{self.cache.path}: caption {row} ({str(text)[:40]!r}, video {video}) of split '{self.name}'"

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
            check_finite(getattr(t, key)[done], done, f"text/{key}", self.describe_caption)
        return t


class Cache:
    """A validated, read-only view of a cache."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache")
        try:
            self.store = open_store(self.path, "r")
        except Exception as e:  # noqa: BLE001 - any backend failure means "not a cache"
            raise CacheError(f"{self.path}: cannot be opened as a varcmp cache ({type(e).__name__}: {e})") from None
        meta = self.store.get_attrs("").get(ROOT_KEY)
        if not isinstance(meta, dict):
            raise CacheError(f"{self.path}: not a varcmp cache (no '{ROOT_KEY}' attributes)")
        check_version(self.path, meta)
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


def check_version(path: Path, meta: dict) -> None:
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        if isinstance(v, int) and v > SCHEMA_VERSION:
            raise CacheError(f"{path}: written with cache schema {v}, newer than this varcmp "
                             f"({__version__}, schema {SCHEMA_VERSION}); upgrade varcmp")
        raise CacheError(f"{path}: cache schema {v} is not supported (this varcmp reads schema "
                         f"{SCHEMA_VERSION}); extract again")


def same_encoders(a: dict, b: dict) -> bool:
    """Same frozen encoders, by configuration and weights (not by the name they were loaded under)."""
    def strip(enc):
        return {k: ({kk: vv for kk, vv in v.items() if kk != "name"} if isinstance(v, dict) else v)
                for k, v in (enc or {}).items()}
    return strip(a) == strip(b)
