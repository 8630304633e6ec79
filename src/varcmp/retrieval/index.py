"""The first-stage index of two-stage search: one vector per video in a faiss inner-product index,
stored with the cache and keyed by what it depends on.

The vector (`VarCMP.video_vectors`) is the normalised video embedding ~e_v (the coarse level), plus,
for text checkpoints, half the fine level's weighted mean of the normalised frames: its inner
product with the normalised sentence is exactly the coarse score plus the weighted-mean half of the
fine score (eq. 1-2), the part of the total that is linear in the query. Measured on the benchmark
world with trained heads, this keeps the exhaustive top 10 in a pool ~10x smaller than the coarse
level alone (benchmarks/search.py). Audio checkpoints use ~e_v alone (eq. 3 has no linear part).
The default pool is `DEFAULT_POOL_SHARE` of the split, at least `DEFAULT_CANDIDATES` videos.

The index (`faiss.IndexFlatIP`: exact inner products, ~15 ms a query at 100k videos x 512-d) is
built once per (cache, checkpoint, split) and stored with the cache: in a `.varcmp-search/` folder
inside a Zarr store (which `varcmp-extract --overwrite` clears with the rest), or in
`CACHE.varcmp-search/` next to an HDF5 file. Its file name carries a key hashing the checkpoint's
weights and settings, the split, its done videos (rows and paths) and the cache's encoders and
dims, so an index of other weights or of another state of the split is never used; it is written
atomically and checked against freshly computed vectors of its first videos when loaded. Indexes
of the same split and checkpoint path with another key (the checkpoint was retrained) are
deleted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..cache.store import is_hdf5
from ..cli import progress
from ..cli.markup import lit
from ..model import QueryEmb, VarCMP
from .scoring import encode_videos
from .videos import CacheVideos

DEFAULT_CANDIDATES = 1000   # --candidates default: at least this many videos per query are reranked,
DEFAULT_POOL_SHARE = 0.02   # and at least this share of the split
INDEX_DIR = ".varcmp-search"
INDEX_FORMAT = 2
INDEX_CHECK = 32            # videos re-encoded to check a stored index when it is loaded


# --------------------------------------------------------------------------
# The coarse index


def index_vectors(model: VarCMP, source, device, chunk: int = 256, pos: np.ndarray | None = None,
                  progress=None, label: str = "indexing") -> np.ndarray:
    """`VarCMP.video_vectors` of the videos of `source` (float32 [n, C]), encoded without the
    patches (e_v, the frames and their weights do not depend on them)."""
    pos = np.arange(source.n) if pos is None else np.asarray(pos, np.int64)
    out = np.zeros((len(pos), model.cfg.dim), np.float32)
    task = progress.add_task(label, total=len(pos)) if progress is not None else None
    for s in range(0, len(pos), chunk):
        v = encode_videos(model, source.read(pos[s:s + chunk], patches=False), device, batch=chunk, patches=False)
        out[s:s + chunk] = model.video_vectors(v).cpu().numpy()
        if task is not None:
            progress.advance(task, min(chunk, len(pos) - s))
    return out


def flat_index(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def index_candidates(index, q: QueryEmb, k: int) -> list[np.ndarray]:
    """The k videos of highest first-stage score (`VarCMP.video_vectors`) per query (positions, best first)."""
    k = min(int(k), index.ntotal)
    if k <= 0:
        return [np.zeros(0, np.int64) for _ in range(len(q))]
    _, ids = index.search(np.ascontiguousarray(VarCMP.query_vectors(q).cpu().numpy()), k)
    return [row[row >= 0].astype(np.int64) for row in ids]


def _weights_hash(model: VarCMP) -> str:
    from ..encoders.frozen import weights_hash

    return weights_hash(model)


def index_folder(cache_path: Path) -> Path:
    cache_path = Path(cache_path)
    if is_hdf5(cache_path):
        return cache_path.with_name(cache_path.name + INDEX_DIR)
    return cache_path / INDEX_DIR


def default_pool(n: int) -> int:
    """Default candidates per query for a split of n videos (see DEFAULT_POOL_SHARE)."""
    return min(n, max(DEFAULT_CANDIDATES, math.ceil(DEFAULT_POOL_SHARE * n)))


def index_key(weights: str, vector: str, cache, source: CacheVideos) -> str:
    enc = {k: ({kk: vv for kk, vv in v.items() if kk != "name"} if isinstance(v, dict) else v)
           for k, v in (cache.encoders or {}).items()}
    blob = json.dumps({"format": INDEX_FORMAT, "weights": weights, "vector": vector, "split": source.name, "n": source.n,
                       "videos": source.fingerprint(), "encoders": enc, "spec": cache.meta.get("spec")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class IndexInfo:
    path: str | None
    built: bool
    seconds: float
    key: str
    stored: bool = True
    note: str = ""


def load_or_build_index(model: VarCMP, cache, source: CacheVideos, checkpoint: Path | None, device,
                        chunk: int = 256, console=None, progress_bar: bool = True) -> tuple[object, IndexInfo]:
    """The split's first-stage index: loaded when a valid one is stored, else built (with a progress
    bar) and stored atomically. A cache that cannot be written gets an index in memory only."""
    import faiss

    ident = _weights_hash(model) + json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str)
    key = index_key(ident, model.linear_levels(), cache, source)
    folder = index_folder(cache.path)
    path = folder / f"{source.name}.{key}.faiss"
    t0 = time.perf_counter()
    if path.is_file():
        try:
            index = faiss.read_index(str(path))
            if index.ntotal == source.n and index.d == model.cfg.dim:
                k = min(INDEX_CHECK, source.n)
                fresh = index_vectors(model, source, device, pos=np.arange(k))
                if np.allclose(index.reconstruct_n(0, k), fresh, atol=1e-3):
                    return index, IndexInfo(str(path), False, time.perf_counter() - t0, key)
        except RuntimeError:
            pass  # unreadable: rebuilt below
    with progress.progress_bar(console, console is not None and progress_bar, transient=False) as prog:
        vectors = index_vectors(model, source, device, chunk=chunk, progress=prog,
                                label=f"indexing {lit(source.name)}")
    index = flat_index(vectors)
    info = IndexInfo(str(path), True, 0.0, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": INDEX_FORMAT, "key": key, "split": source.name, "videos": source.n,
                "checkpoint": str(checkpoint) if checkpoint else None, "dim": model.cfg.dim,
                "kind": "faiss.IndexFlatIP", "vector": model.linear_levels(), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
        _prune(folder, source.name, key, checkpoint)
    except OSError as e:
        info.stored, info.path = False, None
        info.note = f"index not stored ({folder}: {e.strerror or e}); it is rebuilt on every run"
    info.seconds = time.perf_counter() - t0
    return index, info


def _prune(folder: Path, split: str, key: str, checkpoint: Path | None) -> None:
    """Delete this split's indexes of the same checkpoint path with another key (stale weights)."""
    if checkpoint is None:
        return
    for meta in folder.glob(f"{split}.*.json"):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if m.get("split") == split and m.get("key") != key and m.get("checkpoint") == str(checkpoint):
            for p in (meta, meta.with_suffix(".faiss")):
                try:
                    p.unlink()
                except OSError:
                    pass
