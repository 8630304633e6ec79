"""The stored video index: everything of the video side that a query's score needs, encoded once
per (checkpoint, split) and stored with the cache, so that a query only encodes itself and scores.

Per video it holds the `VideoEmb` that `VarCMP.encode_videos` returns (the temporal encoder's e_v,
the frames, their weights after anomaly-biased weighting, the anomaly scores and the video's
prediction, and for the finer level the selected patches and their weights), the first-stage
vector of two-stage search (`VarCMP.video_vectors`, searched with an exact faiss inner-product
index built from it when the index is opened) and the frame times of the spans. Nothing here
computes any part of a score: the build calls the scoring engine's `encode_videos`, and search
and evaluation hand what `VideoIndex.embed` returns to `VarCMP.similarity` as they would a fresh
encoding. e_v, the frames and the patches are stored unit length (`VideoEmb.unit_length`: the
similarity normalises them before any product, so a query does not redo it) in 16 bits: e_v and
the frames as float16, the patches as bfloat16 (their bits in an int16 `.npy`), which the finer
level's products then run in (`token_wise`: four times faster than float32 on a CPU with
bfloat16 instructions, and no conversion of the largest array); the scores move by these roundings,
~1e-3 at most (tests/test_index.py). Every weight and mask is float32 / bool.

Layout: `.varcmp-search/SPLIT.KEY/` inside a Zarr store (which `varcmp-extract --overwrite`
clears with the rest) or `CACHE.varcmp-search/SPLIT.KEY/` next to an HDF5 file; KEY hashes the
checkpoint's weights and settings, the split's done videos (rows and paths) and the cache's
encoders and dims, so an index of other weights or another state of the split is never found
(and one of the same checkpoint path with another key is deleted). Inside: `chunk-NNNNN/` folders
of `CHUNK_VIDEOS` videos, one `.npy` per array, each written to a temporary folder and renamed
whole (a kill leaves a chunk complete or absent; the same command builds only the missing ones),
and `index.json`, written last. Opening memory-maps the chunks and re-encodes the first
`INDEX_CHECK` videos from the raw cache: an index that no longer matches them (features extracted
again under the same paths) is stale, and rebuilt. Test-only: `VARCMP_FAULT=index-chunk:N` (see
`varcmp.cache_schema`) kills the build with its N-th chunk written, not yet renamed."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import _fsync_dir, atomic_write
from ..cache.store import fault_point, is_hdf5
from ..cli.markup import lit
from ..model import QueryEmb, VarCMP, VideoEmb
from .scoring import ENCODE_BATCH, encode_videos
from .videos import CacheVideos

DEFAULT_CANDIDATES = 1000   # --candidates default: at least this many videos per query are reranked,
DEFAULT_POOL_SHARE = 0.02   # and at least this share of the split
INDEX_DIR = ".varcmp-search"
INDEX_FORMAT = 4            # 4: e_v, frames and patches stored unit length (VideoEmb.unit_length)
CHUNK_VIDEOS = 256          # videos per chunk folder (the unit of resume)
INDEX_CHECK = 4             # videos re-encoded from the raw cache when an index is opened
CHECK_ATOL = 5e-3           # how far a stored 16-bit part may be from a fresh encoding
HALF = ("video", "frames")  # stored as float16; the patches as bfloat16 bits; the other float arrays as float32
BF16 = ("patches",)
META = "index.json"


# --------------------------------------------------------------------------
# Building: encode a chunk of videos, store it whole


def _encode_chunk(model: VarCMP, source: CacheVideos, pos: np.ndarray, device,
                  batch: int) -> dict[str, list[np.ndarray]]:
    """The stored arrays of the videos at `pos`, from `encode_videos` of their raw features, batch
    by batch (each batch's parts are made unit length and 16-bit while they are in the cache), as
    one list of per-batch pieces per array (written one after the other, never concatenated)."""
    patches = "finer" in model.cfg.levels
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(pos), batch):
        data = source.read(pos[s:s + batch], patches=patches)
        v = encode_videos(model, data, device, batch=batch).unit_length()
        out = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if isinstance(getattr(v, f.name), torch.Tensor)}
        out["vectors"] = model.video_vectors(v)
        for k, t in out.items():
            parts.setdefault(k, []).append(_stored(k, t.detach()))
        parts.setdefault("frame_time", []).append(np.asarray(data.frame_time, np.float32))
    return parts


def _stored(key: str, t: torch.Tensor) -> np.ndarray:
    """A part as it is stored: see HALF and BF16 (numpy has no bfloat16: its bits as int16)."""
    if key in BF16:
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    a = t.cpu().numpy()
    return a.astype(np.float16 if key in HALF else np.float32) if a.dtype.kind == "f" else a


def _tensor(key: str, a: np.ndarray) -> torch.Tensor:
    """The tensor of a stored array (`_stored`'s inverse for the bfloat16 parts; a view, no copy)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if key in BF16 else t


def fast_bfloat16(device) -> bool:
    """Whether bfloat16 products are fast on `device`: a CUDA GPU that supports them, or a CPU for
    which PyTorch's oneDNN has bfloat16 kernels (AVX-512 or newer; elsewhere they are emulated,
    slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _save_pieces(f, pieces: list[np.ndarray]) -> None:
    """The `.npy` of the pieces' concatenation along the first axis, written piece by piece (a
    chunk's arrays are never copied into one: at tens of MB that copy cost more than the write)."""
    first = pieces[0]
    shape = (sum(len(p) for p in pieces), *first.shape[1:])
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(first.dtype),
                                             "fortran_order": False, "shape": shape})
    for p in pieces:
        f.write(np.ascontiguousarray(p, first.dtype).data)


def _write_chunk(folder: Path, i: int, arrays: dict[str, list[np.ndarray]]) -> None:
    """Chunk i's arrays (each as pieces, see `_save_pieces`) into a temporary folder, fsynced,
    then renamed to chunk-i (atomic)."""
    final = folder / f"chunk-{i:05d}"
    tmp = folder / f".chunk-{i:05d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for k, pieces in arrays.items():
        with open(tmp / f"{k}.npy", "wb") as f:
            _save_pieces(f, pieces)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    fault_point("index-chunk")  # tests: killed with a chunk written, not yet renamed
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another builder of the same index stored it first
    _fsync_dir(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def build_chunks(model: VarCMP, source: CacheVideos, folder: Path, device, chunk: int,
                 batch: int = ENCODE_BATCH, progress=None, label: str = "indexing") -> int:
    """Encode and store every chunk of `source` that `folder` lacks; returns how many were built.
    Temporary folders of a killed build are removed first. Two builders of one index (a server
    and a search started together) each store whole chunks; the second rename of a chunk is dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".chunk-*.tmp"):  # of a killed build (not of one still running)
        pid = stale.name.split(".")[-2]
        if not (pid.isdecimal() and _alive(int(pid))) or int(pid) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
    n_chunks = math.ceil(source.n / chunk)
    todo = [i for i in range(n_chunks) if not (folder / f"chunk-{i:05d}").is_dir()]
    task = progress.add_task(label, total=source.n, completed=source.n - sum(
        min(chunk, source.n - i * chunk) for i in todo)) if progress is not None else None
    done = lambda write, n: (write.result(), task is not None and progress.advance(task, n))  # noqa: E731
    # one writer thread stores (and fsyncs) chunk i while chunk i + 1 is encoded; leaving the
    # block, even on an error, waits for the chunk being written
    with torch.inference_mode(), ThreadPoolExecutor(1, thread_name_prefix="varcmp-index") as writer:
        pending = None
        for i in todo:
            pos = np.arange(i * chunk, min((i + 1) * chunk, source.n))
            arrays = _encode_chunk(model, source, pos, device, batch)
            if pending is not None:
                done(*pending)
            pending = (writer.submit(_write_chunk, folder, i, arrays), len(pos))
        if pending is not None:
            done(*pending)
    return len(todo)


# --------------------------------------------------------------------------
# The index as search reads it


class VideoIndex:
    """A split's stored video side, by position 0..n-1 (the positions of `CacheVideos`): `embed`
    gives the `VideoEmb` of any positions, `candidates` the first stage's best K per query. The
    small arrays are held in memory; frames and patches are memory-mapped copy-on-write (reads
    of consecutive videos are views, never copies; nothing is ever written back), so a warm
    index is the operating system's page cache, shared by every process that opens it."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.n, self.chunk, self.name = int(meta["videos"]), int(meta["chunk"]), meta["split"]
        chunks = [self.folder / f"chunk-{i:05d}" for i in range(math.ceil(self.n / self.chunk))]
        self._parts = {k: [np.load(c / f"{k}.npy", mmap_mode="c") for c in chunks] for k in meta["arrays"]}
        for k in ("frame_mask", "frame_weights", "anomaly", "video_score", "anomalous", "vectors", "frame_time",
                  "patch_weights", "patch_mask"):
            if k in self._parts:
                self._parts[k] = [np.concatenate(self._parts[k])] if self._parts[k] else []
        self._faiss = None

    def load(self) -> "VideoIndex":
        """Read every array into this process's memory (an index whose files are about to go)."""
        self._parts = {k: [np.array(p) for p in v] for k, v in self._parts.items()}
        return self

    def array(self, key: str, pos: np.ndarray) -> np.ndarray:
        """Rows `pos` of one stored array, in the order given (a view when they are a run of
        consecutive videos of one chunk, as exhaustive pages are: nothing is copied)."""
        parts = self._parts[key]
        pos = np.asarray(pos, np.int64)
        whole = len(parts) == 1 and len(parts[0]) == self.n
        if len(pos) and pos[-1] - pos[0] == len(pos) - 1 and (np.diff(pos) == 1).all():
            c0, r0 = (0, pos[0]) if whole else divmod(int(pos[0]), self.chunk)
            if r0 + len(pos) <= len(parts[c0]):
                return parts[c0][r0:r0 + len(pos)]
        if whole:
            return np.asarray(parts[0][pos])
        c, r = np.divmod(pos, self.chunk)
        out = np.empty((len(pos), *parts[0].shape[1:]), parts[0].dtype)
        for ci in np.unique(c):
            sel = c == ci
            out[sel] = parts[ci][r[sel]]
        return out

    def embed(self, pos: np.ndarray, device, patches: bool = True) -> VideoEmb:
        """The `VideoEmb` of the videos at `pos` as `encode_videos` gave it, in its unit-length form
        (`VideoEmb.unit_length`; float16 parts as float32, the patches in bfloat16 where the
        device computes in it fast, else float32)."""
        fields = [f.name for f in dataclasses.fields(VideoEmb) if f.name != "unit"]
        if not patches:
            fields = [f for f in fields if not f.startswith("patch")]
        got = {f: _tensor(f, self.array(f, pos)).to(device) for f in fields if f in self._parts}
        keep = fast_bfloat16(device)
        got = {f: t.float() if t.dtype == torch.float16 or (t.dtype == torch.bfloat16 and not keep) else t
               for f, t in got.items()}
        return VideoEmb(**got, unit=True)

    @property
    def frame_time(self) -> np.ndarray:
        return self._parts["frame_time"][0]

    def candidates(self, q: QueryEmb, k: int) -> list[np.ndarray]:
        """The k videos of highest first-stage score (`VarCMP.video_vectors`) per query (positions, best first)."""
        import faiss

        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self._parts["vectors"][0].shape[1])
            self._faiss.add(np.ascontiguousarray(self._parts["vectors"][0], dtype=np.float32))
        k = min(int(k), self.n)
        if k <= 0:
            return [np.zeros(0, np.int64) for _ in range(len(q))]
        _, ids = self._faiss.search(np.ascontiguousarray(VarCMP.query_vectors(q).cpu().numpy()), k)
        return [row[row >= 0].astype(np.int64) for row in ids]

    def nbytes(self) -> int:
        return sum(p.nbytes for parts in self._parts.values() for p in parts)


# --------------------------------------------------------------------------
# Where an index lives and what it is keyed by


def index_folder(cache_path: Path) -> Path:
    cache_path = Path(cache_path)
    if is_hdf5(cache_path):
        return cache_path.with_name(cache_path.name + INDEX_DIR)
    return cache_path / INDEX_DIR


def default_pool(n: int) -> int:
    """Default candidates per query for a split of n videos (see DEFAULT_POOL_SHARE)."""
    return min(n, max(DEFAULT_CANDIDATES, math.ceil(DEFAULT_POOL_SHARE * n)))


def model_ident(model: VarCMP) -> str:
    """The checkpoint's weights hash and settings: what the index depends on in the model."""
    from ..encoders.frozen import weights_hash

    return weights_hash(model) + json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str)


def index_key(ident: str, cache, source: CacheVideos, chunk: int) -> str:
    enc = {k: ({kk: vv for kk, vv in v.items() if kk != "name"} if isinstance(v, dict) else v)
           for k, v in (cache.encoders or {}).items()}
    blob = json.dumps({"format": INDEX_FORMAT, "model": ident, "split": source.name, "n": source.n, "chunk": chunk,
                       "videos": source.fingerprint(), "encoders": enc, "spec": cache.meta.get("spec")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------
# Open the index of a (checkpoint, split), building what is missing


@dataclass
class IndexInfo:
    path: str | None
    built: bool          # this call encoded chunks (a new index, or the rest of a killed build)
    seconds: float
    key: str
    stored: bool = True
    note: str = ""       # a line for the user: why it was (re)built, or why it lives in memory only
    chunks_built: int = 0

    def record(self) -> dict:
        """What a search result says of the index (no timing: the same search gives the same JSON)."""
        return {"path": self.path, "built": self.built, "stored": self.stored, "key": self.key}


def open_index(model: VarCMP, cache, source: CacheVideos, checkpoint: Path | None, device,
               chunk: int | None = None, progress=None) -> tuple[VideoIndex, IndexInfo]:
    """The split's index: opened when a complete one of this key is stored and still matches the
    raw cache, else built (what is missing of it) and stored. `progress`: a function returning a
    rich Progress context for the build, entered only when something is built. A cache folder
    that cannot be written gets an index built in a temporary folder and held in memory (said in
    `IndexInfo.note`)."""
    chunk = chunk or CHUNK_VIDEOS
    key = index_key(model_ident(model), cache, source, chunk)
    folder = index_folder(cache.path) / f"{source.name}.{key}"
    t0 = time.perf_counter()
    info = IndexInfo(str(folder), False, 0.0, key)
    if (folder / META).is_file():
        idx = _open(folder, key)
        if idx is not None and _matches(model, source, idx, device):
            info.seconds = time.perf_counter() - t0
            return idx, info
        info.note = f"the stored index {folder} no longer matches the cache: rebuilt"
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.is_dir():
        info.note = f"finishing the index build that stopped in {folder}"
    label = f"indexing {lit(source.name)}"
    bar = progress or contextlib.nullcontext
    try:
        with bar() as prog:
            info.chunks_built = build_chunks(model, source, folder, device, chunk, progress=prog, label=label)
        _write_meta(folder, key, model, source, checkpoint, chunk, time.perf_counter() - t0)
        _prune(folder.parent, source.name, key, checkpoint)
        idx = _open(folder, key)
    except OSError as e:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="varcmp-index-") as tmp:
            with bar() as prog:
                build_chunks(model, source, Path(tmp), device, chunk, progress=prog, label=label)
            meta = _write_meta(Path(tmp), key, model, source, checkpoint, chunk, 0.0)
            idx = VideoIndex(Path(tmp), meta).load()
        info.stored, info.path = False, None
        info.note = f"index not stored ({folder.parent}: {e.strerror or e}); it is rebuilt on every run"
    info.built, info.seconds = True, time.perf_counter() - t0
    return idx, info


def stored_index(model: VarCMP, cache, source: CacheVideos, device) -> VideoIndex | None:
    """The split's complete stored index for this checkpoint when there is one and it still matches
    the raw cache; None otherwise (nothing is built: `varcmp-eval` then encodes the videos itself)."""
    key = index_key(model_ident(model), cache, source, CHUNK_VIDEOS)
    idx = _open(index_folder(cache.path) / f"{source.name}.{key}", key)
    return idx if idx is not None and _matches(model, source, idx, device) else None


def _open(folder: Path, key: str) -> VideoIndex | None:
    """A complete stored index of this key, or None (missing, damaged or of another format)."""
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("key") != key:
            return None
        return VideoIndex(folder, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _matches(model: VarCMP, source: CacheVideos, idx: VideoIndex, device) -> bool:
    """Whether the index's first videos equal a fresh encoding of their raw features."""
    pos = np.arange(min(INDEX_CHECK, source.n))
    with torch.inference_mode():
        fresh = {k: np.concatenate(a) for k, a in _encode_chunk(model, source, pos, device, ENCODE_BATCH).items()}
    try:
        stored = {k: _tensor(k, idx.array(k, pos)) for k in fresh}
    except (KeyError, ValueError, IndexError, RuntimeError):
        return False
    fresh = {k: _tensor(k, a) for k, a in fresh.items()}
    return all(a.shape == stored[k].shape and (torch.equal(a, stored[k]) if a.dtype == torch.bool else
               torch.allclose(a.float(), stored[k].float(), atol=CHECK_ATOL))
               for k, a in fresh.items())


def _write_meta(folder: Path, key: str, model: VarCMP, source: CacheVideos, checkpoint, chunk: int,
                seconds: float) -> dict:
    first = folder / "chunk-00000"
    arrays = sorted(p.stem for p in first.glob("*.npy"))
    size = sum(p.stat().st_size for p in folder.glob("chunk-*/*.npy"))
    meta = {"format": INDEX_FORMAT, "key": key, "split": source.name, "videos": int(source.n), "chunk": int(chunk),
            "arrays": arrays, "checkpoint": str(checkpoint) if checkpoint else None,
            "levels": list(model.cfg.levels), "anomaly_weighting": bool(model.cfg.anomaly_weighting),
            "first_stage": model.linear_levels(), "bytes": int(size),
            "build_seconds": round(seconds, 3), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(folder / META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def _prune(parent: Path, split: str, key: str, checkpoint: Path | None) -> None:
    """Delete this split's indexes of the same checkpoint path with another key (stale weights)."""
    if checkpoint is None:
        return
    for meta in parent.glob(f"{split}.*/{META}"):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("split") == split and m.get("key") != key \
                and m.get("checkpoint") == str(checkpoint):
            shutil.rmtree(meta.parent, ignore_errors=True)
