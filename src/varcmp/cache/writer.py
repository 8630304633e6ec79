"""Writing a cache: the store's root (CacheWriter) and one split's arrays (SplitWriter), resumable, data before done flags."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..cache_schema import (DONE, FAILED, FINAL_KEY, LOCK_NAMES, PENDING, ROOT_KEY, SCHEMA_VERSION, SPLIT_KEY,
                            CacheError, CacheSpec, QueryEntry, VideoEntry, VideoFeatures, text_arrays, video_arrays)
from ..media.files import within
from .reader import Completeness, check_version, completeness_of, same_encoders
from .store import fault_point, is_hdf5, open_store, writing

# --------------------------------------------------------------------------
# Writer


class CacheWriter:
    """Create a cache (or open one to add to it) and write splits into it."""

    def __init__(self, path, spec: CacheSpec, encoders: dict, preprocessing: dict, overwrite: bool = False):
        self.path = Path(path)
        self.spec = spec
        with writing(self.path):
            if overwrite:
                remove_store(self.path)
            probe_target(self.path)
            self.store = open_store(self.path, "a")
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
        with writing(self.path, "open the store for writing"):
            self.store = open_store(self.path, "a")
        self.spec = CacheSpec(**self.store.get_attrs("")[ROOT_KEY]["spec"])
        return self

    def splits(self) -> list[str]:
        return [g for g in self.store.groups() if self.store.has(f"{g}/videos/status")]

    def split(self, name: str, videos: Sequence[VideoEntry], queries: Sequence[QueryEntry] | None = None,
              attrs: dict | None = None, frame_labels: bool = False) -> "SplitWriter":
        """Create split `name` (`frame_labels`: with the optional per-frame labels), or reopen it
        when it exists with the same videos and queries."""
        _check_split_name(self.path, name)
        with writing(self.path):
            return self._split(name, videos, queries, attrs, frame_labels)

    def _split(self, name, videos, queries, attrs, frame_labels=False) -> "SplitWriter":
        if self.store.has(f"{name}/videos/path"):
            sw = SplitWriter(self.store, self.path, name, self.spec)
            sw._check_same(videos, queries)
            if attrs:
                self.store.set_attrs(name, {SPLIT_KEY: {**self.store.get_attrs(name).get(SPLIT_KEY, {}), **attrs}})
            return sw
        self.store.delete(name)
        for key, (shape, dtype, chunks, fill) in video_arrays(self.spec, len(videos), frame_labels).items():
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
        (`varcmp_final`, see `varcmp.cache_schema`); then write the consolidated metadata.
        An incomplete split is left as it is. Returns the state of each split."""
        names = self.splits() if names is None else list(names)
        out = []
        with writing(self.path):
            for name in names:
                c = completeness_of(self.store, name)
                if c.complete and self.store.get_attrs(name).get(FINAL_KEY) != c.record():
                    self.store.set_attrs(name, {FINAL_KEY: c.record()})
                out.append(c)
            fault_point("finalize")
            self.store.consolidate()
        return out

    def consolidate(self) -> None:
        with writing(self.path):
            self.store.consolidate()

    def close(self) -> None:
        self.store.close()

    def finish(self) -> None:
        self.consolidate()
        self.store.close()


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
        with writing(self.path):
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
            if feats.frame_label is not None:
                if not self.store.has(f"{self.name}/videos/frame_label"):
                    raise ValueError(f"split '{self.name}' was created without frame labels")
                a("videos/frame_label")[i] = np.asarray(feats.frame_label, dtype=np.int8)
            a("videos/note")[i] = feats.note
            a("videos/error")[i] = ""
            self.store.flush()
            fault_point("after-data")
            a("videos/status")[i] = DONE
            self.store.flush()

    def reset_video(self, i: int) -> None:
        """Video i is pending again (to be extracted anew); its data is overwritten when it is."""
        with writing(self.path):
            self._a("videos/status")[i] = PENDING
            self.store.flush()

    def fail_video(self, i: int, reason: str) -> None:
        with writing(self.path):
            self._a("videos/error")[i] = reason
            self.store.flush()
            self._a("videos/status")[i] = FAILED
            self.store.flush()

    def write_text(self, start: int, word_feat: np.ndarray, word_mask: np.ndarray, sentence: np.ndarray) -> None:
        """Write queries [start, start+len) (a whole number of chunks), then their done flags."""
        stop = start + len(word_feat)
        with writing(self.path):
            self._a("text/word_feat")[start:stop] = word_feat.astype(np.float16)
            self._a("text/word_mask")[start:stop] = word_mask
            self._a("text/sentence")[start:stop] = sentence.astype(np.float16)
            self.store.flush()
            self._a("text/status")[start:stop] = DONE
            self.store.flush()

    def completeness(self) -> Completeness:
        return completeness_of(self.store, self.name)

    def mark_unfinished(self) -> None:
        """Before a run writes to this split: it is not final until finalized again."""
        with writing(self.path):
            self.store.set_attrs(self.name, {FINAL_KEY: {"complete": False}})


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
        check_version(path, meta)
    return True


def remove_store(path, keep: Sequence = ()) -> None:
    """Delete the varcmp store at `path`, the one way varcmp deletes a store: only after
    `probe_target(path, replace=True, keep=keep)`, so nothing but a store of this tool is ever
    deleted. A Zarr store keeps its writers' lock files (a writer may hold them); a symbolic link
    inside it is removed, never followed."""
    path = Path(path)
    if not probe_target(path, replace=True, keep=keep):
        return
    with writing(path, "delete the store"):
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
        store = open_store(path, "r")
    except Exception:  # noqa: BLE001 - whatever cannot be opened as a store is not one
        return None
    try:
        meta = store.get_attrs("").get(ROOT_KEY)
    except Exception:  # noqa: BLE001
        meta = None
    finally:
        store.close()
    return meta if isinstance(meta, dict) else None


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
