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
    /<split>/videos/frame_label int8 [V, N]        per sampled frame: 1 anomalous, 0 normal, -1 unknown
                                                   (optional: only where the source knows, e.g. varcmp-synth)
    /<split>/text/text        str   [Q]                                     (caption caches)
    /<split>/text/video_index int32 [Q]            row of /videos it describes
    /<split>/text/row         int32 [Q]            row in the annotation file
    /<split>/text/status      int8  [Q]            0 pending, 1 done (chunked like the features)
    /<split>/text/word_feat   f2    [Q, L, C]
    /<split>/text/word_mask   bool  [Q, L]
    /<split>/text/sentence    f2    [Q, C]

`frame_label` is optional and needs no new schema version: a store without it (every store
varcmp-extract writes; videos carry no frame annotations) reads as "no frame labels", and readers
that predate it ignore it. It serves the anomaly head's frame-level AUC in `varcmp-eval`, which can
also take them from UCF-Crime's temporal annotation file (`retrieval.frame_labels`).

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
written, the consolidated metadata not yet) and, in `varcmp.extraction.encode`, `forward`
(a video's first CLIP forward done, nothing of it written yet). It exists so that
tests can kill a run at an exact point (tests/test_extract_faults.py); never set it
otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import VarcmpError

SCHEMA_VERSION = 1

PENDING, DONE, FAILED = 0, 1, 2
UNKNOWN_FRAME = -1  # frame_label of a frame whose label is not known
TEXT_CHUNK = 64

ROOT_KEY = "varcmp"
LOCK_NAME = ".varcmp.lock"  # inside a Zarr store: serialises metadata changes of writers (see extract)
RUN_LOCK_NAME = ".varcmp.run.lock"  # inside a Zarr store: held by every writer for its whole run (see extract)
LOCK_NAMES = (LOCK_NAME, RUN_LOCK_NAME)
SPLIT_KEY = "varcmp_split"
FINAL_KEY = "varcmp_final"  # split attribute written by CacheWriter.finalize


class CacheError(VarcmpError):
    """A cache that cannot be used; the message is one line naming the store."""


class CacheWriteError(CacheError):
    """The operating system refused a write to the store (disk full, read-only, ...)."""


class DamagedCacheError(CacheError):
    """Stored features that cannot be decoded (a corrupt chunk) or are NaN / infinite; the
    message names the video (or caption) and the store."""


class IncompleteCacheWarning(UserWarning):
    """A split is read whose extraction has not finished (videos pending or captions not encoded)."""


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
    frame_label: np.ndarray | None = None  # [N] int: 1 anomalous, 0 normal (stores made with frame labels)


def video_arrays(spec: CacheSpec, n: int, frame_labels: bool = False) -> dict[str, tuple[tuple, str, tuple, Any]]:
    """name -> (shape, dtype, chunks, fill) of the per-video arrays (`frame_labels`: with the
    optional frame_label array)."""
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
    if frame_labels:
        a["frame_label"] = ((n, N), "int8", (1, N), UNKNOWN_FRAME)
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
