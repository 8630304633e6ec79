"""`varcmp-search`: find the video, and the moment in it, by text or by sound.

    varcmp-search cache.zarr --checkpoint runs/ucf "a man in a black shirt hits a dog with a stick" --top 10
    varcmp-search cache.zarr --checkpoint runs/xd --audio gunshot.wav --top 5
    varcmp-search cache.zarr --checkpoint runs/ucf --queries queries.txt --json hits.json
    varcmp-search cache.zarr --checkpoint runs/ucf "car on fire" --html report.html

The query is encoded by the frozen encoder the cache was extracted with (its recorded config and
weights hashes are checked): text with CLIP exactly as captions are extracted (the cache's
max_words, word features and sentence), audio with CLAP over the extraction's windows of the
clip (`media.audio_windows`, mono 48 kHz, `is_longer` False). It is then scored against the
videos through the scoring engine (`retrieval.scoring`: `VarCMP.encode_videos`, `encode_queries`, `similarity`), the code
training and evaluation use.

Modes (per split):

- **exhaustive**: every video is read, encoded and scored with the full three-level score, page by
  page (memory does not grow with the collection); the top hits are kept as it goes.
- **two-stage**: a faiss inner-product index over one vector per video picks `--candidates` K
  videos per query; the full score reranks them, through the same page-by-page code as the
  exhaustive mode (which is this mode with every video a candidate: with K >= the collection the
  two modes give identical hits and scores). The vector (`VarCMP.video_vectors`) is the normalised video
  embedding ~e_v (the coarse level), plus, for text checkpoints, half the fine level's weighted
  mean of the normalised frames: its inner product with the normalised sentence is exactly the
  coarse score plus the weighted-mean half of the fine score (eq. 1-2), the part of the total
  that is linear in the query. Measured on the benchmark world with trained heads, this keeps the
  exhaustive top 10 in a pool ~10x smaller than the coarse level alone (benchmarks/search.py).
  Audio checkpoints use ~e_v alone (eq. 3 has no linear part).
- **auto** (default): two-stage for a split of more than `AUTO_TWO_STAGE` videos, else exhaustive.
  The default pool is `DEFAULT_POOL_SHARE` of the split, at least `DEFAULT_CANDIDATES` videos.

The index (`faiss.IndexFlatIP`: exact inner products, ~15 ms a query at 100k videos x 512-d) is
built once per (cache, checkpoint, split) and stored with the cache: in a `.varcmp-search/` folder
inside a Zarr store (which `varcmp-extract --overwrite` clears with the rest), or in
`CACHE.varcmp-search/` next to an HDF5 file. Its file name carries a key hashing the checkpoint's
weights and settings, the split, its done videos (rows and paths) and the cache's encoders and
dims, so an index of other weights or of another state of the split is never used; it is written
atomically and checked against freshly computed vectors of its first videos when loaded.
Indexes of the same split and checkpoint path with another key (the checkpoint was retrained) are
deleted.

Time span of a hit (seconds, from the stored frame timestamps): over the valid sampled frames j,

    s_j  the frame-query similarity: cos(sentence, f_j) for text (the fine level's frame term,
         eq. 2), max_i cos(e_a_i, f_j) over valid audio segments for audio (eq. 3's frame term);
    w_j  the frame weight the fine level uses (after anomaly-biased weighting, eq. 6);
    r_j = (w_j / max w) * (s_j - min s) / (max s - min s)   (s-part 1 when all s_j are equal);

the peak is the frame maximising r_j (the first on ties) and the span is the longest run of
consecutive valid frames around it whose r_j >= SPAN_THRESHOLD (0.5) x r_peak. Frame j covers
from the midpoint with its previous frame to the midpoint with its next one (0 and the duration
at the ends), which for the extraction's uniform sampling is exactly its segment of the video.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from .cache_schema import CacheError, VideoData, is_hdf5, read_checked
from .checkpoint import atomic_write
from .cli import CommandError, OneLineErrors, OutputFile
from .evaluate import UserError
from .markup import lit
from .model import QueryEmb, VarCMP
from .retrieval.scoring import DEFAULT_CHUNK, DEFAULT_CHUNK_CUDA, Ranked, default_chunk, encode_queries, encode_videos, top_k

AUTO_TWO_STAGE = 5000       # --mode auto: two-stage for splits with more videos than this
DEFAULT_CANDIDATES = 1000   # --candidates default: at least this many videos per query are reranked,
DEFAULT_POOL_SHARE = 0.02   # and at least this share of the split
SPAN_THRESHOLD = 0.5        # span = frames around the peak with relevance >= this x the peak's
THUMBNAILS = 4              # frames shown per hit in the HTML report
INDEX_DIR = ".varcmp-search"
INDEX_FORMAT = 2
INDEX_CHECK = 32            # videos re-encoded to check a stored index when it is loaded
MODES = ("auto", "exhaustive", "two-stage")
TEXT_BATCH = 256
AUDIO_BATCH = 32


# --------------------------------------------------------------------------
# Videos by position (the done videos of one split; the benchmark has a generated source)


class CacheVideos:
    """The extracted (done) videos of one split, addressed by position 0..n-1."""

    def __init__(self, split):
        self.split = split
        self.name = split.name
        self.rows = split.done_index()                      # cache row of each position
        self.n = len(self.rows)
        self.paths = split.paths[self.rows]
        self.durations = np.asarray(split.durations)[self.rows]
        self.root = split.attrs.get("root")
        self._arr: dict = {}  # the lazy arrays, opened once

    def read(self, pos: np.ndarray, patches: bool) -> VideoData:
        """The videos at positions `pos`; a corrupt chunk or a NaN is a one-line DamagedCacheError
        naming the video."""
        pos = np.asarray(pos, dtype=np.int64)
        rows = self.rows[pos]
        keys = ("frame_feat", "frame_mask", "frame_time") + (("patch_feat",) if patches else ())
        for k in keys:
            if k not in self._arr:
                self._arr[k] = self.split.array(f"videos/{k}")
        got = {k: read_checked(self._arr[k], rows, f"videos/{k}", self.split.describe_video) for k in keys}
        return VideoData(index=pos, paths=self.paths[pos], labels=np.zeros(len(pos), np.int8),
                         categories=np.full(len(pos), "", object), patch_feat=got.get("patch_feat"),
                         **{k: got[k] for k in keys[:3]})

    def fingerprint(self) -> str:
        """What the index of this split depends on besides the checkpoint and the encoders."""
        h = hashlib.sha256()
        h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        h.update("\n".join(map(str, self.paths)).encode())
        return h.hexdigest()


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
    from .encoders import weights_hash

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
    with _progress(console, progress_bar, transient=False) as prog:
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


# --------------------------------------------------------------------------
# Where in the video


@dataclass
class Span:
    start: float
    end: float
    first_frame: int
    last_frame: int
    peak_frame: int


def relevance(sim: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """r_j = (w_j / max w) * (s_j - min s) / (max s - min s) over valid frames; 0 on padded ones."""
    r = np.zeros(len(sim), np.float64)
    if not mask.any():
        return r
    s, w = sim[mask].astype(np.float64), weights[mask].astype(np.float64)
    spread = s.max() - s.min()
    s_part = (s - s.min()) / spread if spread > 0 else np.ones_like(s)
    w_part = w / w.max() if w.max() > 0 else np.ones_like(w)
    r[mask] = w_part * s_part
    return r


def best_span(sim: np.ndarray, weights: np.ndarray, mask: np.ndarray, times: np.ndarray, duration: float,
              threshold: float = SPAN_THRESHOLD) -> Span:
    """The span defined in this module's docstring. sim, weights, mask, times: [N] of one video;
    frame indices are positions among the sampled frames (padded ones never belong to a span)."""
    valid = np.flatnonzero(mask)
    if len(valid) == 0:
        return Span(0.0, float(duration), -1, -1, -1)
    r = relevance(sim, weights, mask)[valid]
    p = int(np.argmax(r))
    a = b = p
    cut = threshold * r[p]
    while a > 0 and r[a - 1] >= cut:
        a -= 1
    while b < len(valid) - 1 and r[b + 1] >= cut:
        b += 1
    t = times[valid].astype(np.float64)
    bounds = np.empty(len(t) + 1)
    bounds[1:-1] = (t[:-1] + t[1:]) / 2
    if len(t) > 1:
        bounds[0] = max(0.0, t[0] - (t[1] - t[0]) / 2)
        bounds[-1] = min(float(duration), t[-1] + (t[-1] - t[-2]) / 2)
    else:
        bounds[0], bounds[-1] = 0.0, float(duration)
    bounds = np.clip(bounds, 0.0, max(float(duration), 0.0))
    return Span(float(bounds[a]), float(bounds[b + 1]), int(valid[a]), int(valid[b]), int(valid[p]))


# --------------------------------------------------------------------------
# Queries


def _encoder_record(cache, which: str) -> dict:
    rec = (cache.encoders or {}).get(which)
    if not rec:
        what = "CLIP" if which == "clip" else "CLAP (extract with --audio)"
        raise UserError(f"{cache.path}: no {what} encoder recorded in this cache; cannot encode the query")
    return rec


def _check_encoder(loaded: dict, recorded: dict, flag: str, name: str, cache_path) -> None:
    for k in ("config_hash", "weights_hash"):
        if loaded.get(k) != recorded.get(k):
            what = "configuration" if k == "config_hash" else "weights"
            raise UserError(f"{flag} {name}: its {what} ({loaded.get(k)}) differ from the encoder {cache_path} was "
                            f"extracted with ({recorded.get('name')}, {recorded.get(k)}); pass the same model")


def read_query_audio(path, segments: int) -> dict:
    """The extraction's windows of an audio clip (mono 48 kHz): `segments` windows centred on the
    centres of equal parts of the clip, clamp(duration / segments, 1 s, 10 s) long (the clip is
    its own 'video': offset 0, duration = its length). Raises UserError for a missing,
    unreadable, empty or silent file."""
    from .media import AUDIO_RATE, MediaError, audio_windows, read_audio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--audio {path}: no such file")
    try:
        got = read_audio(path, AUDIO_RATE)
    except MediaError as e:
        raise UserError(f"--audio {path}: {e}") from None
    if got is None:
        raise UserError(f"--audio {path}: no audio track")
    samples, _ = got
    duration = len(samples) / AUDIO_RATE
    win = audio_windows(samples, 0.0, duration, segments, AUDIO_RATE)
    if not win.mask.any():
        raise UserError(f"--audio {path}: {win.note or 'no usable audio'} (nothing to search with)")
    return {"windows": win.windows, "mask": win.mask, "duration": duration}


# --------------------------------------------------------------------------
# The searcher


def _progress(console, enabled: bool, transient: bool = True):
    if not enabled or console is None:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=transient)


class Searcher:
    """A cache, a checkpoint and the splits to search. Raises UserError, CacheError or
    CheckpointError (one-line messages) for what cannot be searched."""

    def __init__(self, cache, checkpoint, splits=None, device: str = "auto", chunk: int | None = None,
                 mode: str = "auto", candidates: int | None = None, console=None, progress: bool = True):
        from .cache_schema import open_cache
        from .checkpoint import check_compatible, load, read_meta, resolve
        from .evaluate import _device

        if mode not in MODES:
            raise UserError(f"--mode {mode}: choose from {', '.join(MODES)}")
        if candidates is not None and candidates < 1:
            raise UserError(f"--candidates {candidates}: must be >= 1")
        if chunk is not None and chunk < 1:
            raise UserError(f"--chunk {chunk}: must be >= 1")
        self.device = _device(device)
        self.chunk = chunk or default_chunk(self.device)
        self.mode, self.candidates = mode, None if candidates is None else int(candidates)
        self.console, self.progress = console, progress
        self.cache = open_cache(cache)
        try:
            names = list(splits) if splits else self.cache.splits
            if not names:
                raise UserError(f"{self.cache.path}: holds no split to search")
            self.sources = [CacheVideos(self.cache.split(s)) for s in dict.fromkeys(names)]
            if sum(s.n for s in self.sources) == 0:
                raise UserError(f"{self.cache.path}: no extracted video in split(s) {', '.join(names)}")
            self.checkpoint = resolve(checkpoint)
            check_compatible(read_meta(self.checkpoint), self.cache, self.checkpoint)
            self.model, self.meta = load(self.checkpoint, self.device)
        except BaseException:
            self.cache.close()
            raise
        self.kind = self.model.cfg.query
        self.index_info: dict[str, IndexInfo] = {}
        self._indexes: dict[str, object] = {}

    def close(self) -> None:
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- queries -----------------------------------------------------------------------------
    def _encoder(self, cls, which: str, override: str | None):
        """The cache's recorded encoder (`which`: clip or clap), loaded from `override` or the
        recorded name, refused unless its config and weights hash as the cache records."""
        from .encoders import quiet_transformers

        rec = _encoder_record(self.cache, which)
        name = override or rec.get("name")
        quiet_transformers()
        try:
            enc = cls(str(name), self.device)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        _check_encoder(enc.info(), rec, f"--{which}-model", name, self.cache.path)
        return enc

    def text_features(self, texts: list[str], clip_model: str | None = None) -> dict[str, np.ndarray]:
        """CLIP word features, mask and sentence of `texts`, as extraction computes captions."""
        from .encoders import ClipEncoder

        if self.kind != "text":
            raise UserError(f"{self.checkpoint}: trained for audio queries; pass --audio FILE (or a --queries file "
                            "of audio paths), not text")
        texts = [str(t) for t in texts]
        for i, t in enumerate(texts):
            if not t.strip():
                raise UserError(f"empty query (query {i + 1}): give words to search for")
        clip = self._encoder(ClipEncoder, "clip", clip_model)
        L = self.cache.spec.max_words
        long = [i + 1 for i in clip.cut(texts, L)]
        if long and self.console is not None:
            self.console.print(f"note: query {', '.join(map(str, long[:5]))}{' ...' if len(long) > 5 else ''} "
                               f"cut to {L} tokens (the cache's max_words, as captions were)", highlight=False)
        parts = [clip.encode_text(texts[s:s + TEXT_BATCH], L) for s in range(0, len(texts), TEXT_BATCH)]
        return {"word_feat": torch.cat([p[0] for p in parts]).numpy(),
                "word_mask": torch.cat([p[1] for p in parts]).numpy(),
                "sentence": torch.cat([p[2] for p in parts]).numpy()}

    def audio_features(self, files: list, clap_model: str | None = None) -> dict[str, np.ndarray]:
        """CLAP embeddings of the extraction's windows of each audio clip, and their mask."""
        from .encoders import ClapEncoder, preprocess_audio
        from .media import AUDIO_RATE

        if self.kind != "audio":
            raise UserError(f"{self.checkpoint}: trained for text queries; --audio needs a checkpoint trained with "
                            "--query audio")
        na = self.cache.spec.audio_segments or self.model.cfg.audio_segments
        if na > self.model.cfg.audio_segments:
            raise UserError(f"{self.checkpoint}: trained with {self.model.cfg.audio_segments} audio segments, but "
                            f"{self.cache.path} has {na}")
        clips = [read_query_audio(f, na) for f in files]        # bad files fail before any model loads
        clap = self._encoder(ClapEncoder, "clap", clap_model)
        feat = np.zeros((len(clips), na, clap.dim), np.float32)
        for i, c in enumerate(clips):
            x = preprocess_audio(clap.extractor, c["windows"], AUDIO_RATE)
            emb = torch.cat([clap.encode(x[s:s + AUDIO_BATCH]) for s in range(0, len(x), AUDIO_BATCH)]).numpy()
            feat[i, c["mask"]] = emb
        return {"seg_feat": feat, "seg_mask": np.stack([c["mask"] for c in clips])}

    # ---- search ------------------------------------------------------------------------------
    def pool(self, source: CacheVideos) -> int:
        """Candidates per query in a two-stage split: --candidates, else default_pool."""
        return min(self.candidates or default_pool(source.n), source.n)

    def split_mode(self, source: CacheVideos) -> str:
        if self.mode != "auto":
            return self.mode
        return "two-stage" if source.n > AUTO_TWO_STAGE else "exhaustive"

    def index(self, source: CacheVideos):
        if source.name not in self._indexes:
            idx, info = load_or_build_index(self.model, self.cache, source, self.checkpoint, self.device,
                                            console=self.console, progress_bar=self.progress)
            self._indexes[source.name], self.index_info[source.name] = idx, info
            if info.note and self.console is not None:
                self.console.print(f"note: {lit(info.note)}", highlight=False, soft_wrap=True)
        return self._indexes[source.name]

    @torch.inference_mode()
    def search(self, feats: dict[str, np.ndarray], labels: list[str], top: int = 10) -> dict:
        """Rank every searched split for each query (features as `text_features` / `audio_features`
        return them, or as the cache stores captions) and describe the best `top` hits. Returns
        the JSON-ready result (what --json writes)."""
        if top < 1:
            raise UserError(f"--top {top}: must be >= 1")
        n_q = len(next(iter(feats.values())))
        if n_q == 0 or n_q != len(labels):
            raise UserError("no query to search with" if n_q == 0 else f"{len(labels)} labels for {n_q} queries")
        model = self.model.eval()
        q = encode_queries(model, feats, self.device)
        per_split, splits_out = [], []
        for si, src in enumerate(self.sources):
            mode = self.split_mode(src)
            info = None
            cands = None
            if src.n and mode == "two-stage":
                index = self.index(src)
                info = self.index_info[src.name]
                cands = index_candidates(index, q, self.pool(src))
            with _progress(self.console, self.progress and src.n > 8 * self.chunk) as prog:
                r = top_k(model, src, q, top, cands, self.chunk, self.device, progress=prog)
            per_split.append(r)
            splits_out.append({"name": src.name, "videos": int(src.n), "mode": mode,
                               "candidates": self.pool(src) if mode == "two-stage" else None,
                               "exact": mode == "exhaustive" or self.pool(src) >= src.n,
                               "root": src.root,
                               "index": None if info is None else {"path": info.path, "built": info.built,
                                                                   "stored": info.stored, "key": info.key,
                                                                   "seconds": round(info.seconds, 3)}})
        hits = self._merge_splits(per_split, top)
        details = self._details(q, hits)
        queries = []
        for qi, label in enumerate(labels):
            queries.append({"query": label, "hits": [{"rank": r + 1, **details[(qi, h[0], h[1])]}
                                                    for r, h in enumerate(hits[qi])]})
        from . import __version__

        return {"varcmp_version": __version__, "cache": str(self.cache.path), "checkpoint": str(self.checkpoint),
                "query_kind": self.kind, "levels": list(model.cfg.levels),
                "anomaly_weighting": bool(model.cfg.anomaly_weighting), "top": int(top), "device": str(self.device),
                "num_frames": int(self.cache.spec.num_frames), "splits": splits_out,
                "span_rule": (f"peak of r_j = (w_j / max w) * (s_j - min s) / (max s - min s), extended over "
                              f"consecutive frames with r_j >= {SPAN_THRESHOLD} r_peak; s_j: "
                              + ("cos(sentence, frame)" if self.kind == "text" else "max_i cos(audio segment i, frame)")
                              + ", w_j: the fine level's frame weights"),
                "queries": queries}

    def _merge_splits(self, per_split: list[Ranked], top: int) -> list[list[tuple]]:
        """Per query: [(split index, position, scores dict, video_score, anomalous)], best first
        (total descending, then split order, then position)."""
        out = []
        for qi in range(len(per_split[0].pos) if per_split else 0):
            cand = []
            for si, r in enumerate(per_split):
                for j in range(r.pos.shape[1]):
                    total = float(r.scores["total"][qi, j])
                    if not np.isfinite(total):
                        continue
                    cand.append((-total, si, int(r.pos[qi, j]), {k: float(v[qi, j]) for k, v in r.scores.items()},
                                 float(r.video_score[qi, j]), bool(r.anomalous[qi, j])))
            cand.sort(key=lambda c: c[:3])
            out.append([c[1:] for c in cand[:top]])
        return out

    def _details(self, q: QueryEmb, hits: list[list[tuple]]) -> dict:
        """Span, frame curves and the JSON record of every (query, split, position) hit."""
        pairs = [(qi, h) for qi, hs in enumerate(hits) for h in hs]
        out = {}
        by_split: dict[int, list] = {}
        for qi, h in pairs:
            by_split.setdefault(h[0], []).append((qi, h))
        for si, items in by_split.items():
            src = self.sources[si]
            uniq = np.unique([h[1] for _, h in items])
            data = src.read(uniq, patches=False)
            # frames, weights and A do not depend on the patches
            v = encode_videos(self.model, data, self.device, batch=len(uniq), patches=False)
            row_of = {int(p): i for i, p in enumerate(uniq)}
            vi = torch.tensor([row_of[h[1]] for _, h in items], device=v.video.device)
            qidx = torch.tensor([qi for qi, _ in items], device=q.glob.device)
            vv, qq = v.take(vi), q.take(qidx)
            sim = self.model.frame_terms(vv, qq).cpu().numpy()
            w = vv.frame_weights.float().cpu().numpy()
            A = vv.anomaly.float().cpu().numpy()
            m = vv.frame_mask.cpu().numpy()
            for k, (qi, h) in enumerate(items):
                _, pos, scores, vscore, anom = h
                r = row_of[pos]
                times = data.frame_time[r]
                dur = float(src.durations[pos])
                span = best_span(sim[k], w[k], m[k], times, dur)
                valid = m[k]
                rel = relevance(sim[k], w[k], m[k])
                out[(qi, si, pos)] = {
                    "video": str(src.paths[pos]), "split": src.name, "row": int(src.rows[pos]),
                    "score": scores["total"], "levels": {lv: scores[lv] for lv in self.model.cfg.levels},
                    "anomaly": vscore, "predicted_anomalous": anom, "duration": dur,
                    "span": dataclasses.asdict(span),
                    "frames": {"index": [int(j) for j in np.flatnonzero(valid)],
                               "time": [float(x) for x in times[valid]],
                               "similarity": [float(x) for x in sim[k][valid]],
                               "weight": [float(x) for x in w[k][valid]],
                               "anomaly": [float(x) for x in A[k][valid]],
                               "relevance": [float(x) for x in rel[valid]]}}
        return out


def search_features(cache, checkpoint, feats: dict[str, np.ndarray], labels: list[str] | None = None,
                    top: int = 10, **kw) -> dict:
    """Search with query features given directly (e.g. a cached caption's word_feat, word_mask and
    sentence, or CLAP segment features seg_feat, seg_mask): no encoder is loaded."""
    n = len(next(iter(feats.values())))
    labels = labels if labels is not None else [f"query {i + 1}" for i in range(n)]
    kw.setdefault("progress", False)
    with Searcher(cache, checkpoint, **kw) as s:
        return s.search(feats, labels, top)


def run_search(cache, checkpoint, texts=(), audio=(), queries_file=None, splits=(), top: int = 10,
               clip_model=None, clap_model=None, mode: str = "auto", candidates: int | None = None,
               device: str = "auto", chunk: int | None = None, console=None, progress: bool = True) -> dict:
    """Everything `varcmp-search` does short of printing: encode the queries and search."""
    texts, audio = list(texts), [Path(a) for a in audio]
    given = [bool(texts), bool(audio), queries_file is not None]
    if sum(given) == 0:
        raise UserError("give a query: text QUERY..., --audio FILE... or --queries FILE")
    if sum(given) > 1:
        raise UserError("give text QUERY..., --audio FILE... or --queries FILE, not several of them")
    lines = None
    if queries_file is not None:
        qf = Path(queries_file)
        try:
            lines = [x.strip() for x in qf.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--queries {qf}: {getattr(e, 'strerror', None) or e}") from None
        lines = [x for x in lines if x]
        if not lines:
            raise UserError(f"--queries {qf}: no queries in it (one per line)")
    for i, t in enumerate(texts):
        if not t.strip():
            raise UserError(f"empty query (query {i + 1}): give words to search for")
    with Searcher(cache, checkpoint, splits, device, chunk, mode, candidates, console, progress) as s:
        if lines is not None:
            if s.kind == "audio":
                audio = [p if p.is_absolute() else Path(queries_file).parent / p for p in map(Path, lines)]
            else:
                texts = lines
        if texts:
            feats, labels = s.text_features(texts, clip_model), texts
        else:
            feats, labels = s.audio_features(audio, clap_model), [str(a) for a in audio]
        return s.search(feats, labels, top)


# --------------------------------------------------------------------------
# Output


def _fmt_span(h: dict) -> str:
    return f"{h['span']['start']:.1f}-{h['span']['end']:.1f}"


def print_results(r: dict, console) -> None:
    from rich.table import Table

    say = lambda text: console.print(text, soft_wrap=True, highlight=False, markup=False)  # noqa: E731
    splits = ", ".join(f"{s['name']} ({s['videos']} videos, {s['mode']}"
                       + (f", {s['candidates']} candidates" if s["mode"] == "two-stage" else "") + ")"
                       for s in r["splits"])
    say(f"varcmp-search | cache {r['cache']} | checkpoint {r['checkpoint']} | {r['query_kind']} queries | levels "
        f"{'+'.join(r['levels'])} | splits {splits}")
    for s in r["splits"]:
        if s["index"]:
            ix = s["index"]
            say(f"index of '{s['name']}': {'built' if ix['built'] else 'reused'} "
                f"({ix['path'] or 'in memory'}, {ix['seconds']:.1f} s)")
    levels = r["levels"]
    for n, qr in enumerate(r["queries"], 1):
        t = Table(title=lit(f"{n}. {qr['query']}"), title_justify="left", show_edge=True, header_style="bold")
        t.add_column("#", justify="right")
        t.add_column("video", overflow="fold")
        t.add_column("split")
        t.add_column("score", justify="right")
        for lv in levels:
            t.add_column(lv, justify="right")
        t.add_column("anomaly", justify="right")
        t.add_column("span (s)", justify="right")
        for h in qr["hits"]:
            t.add_row(str(h["rank"]), lit(h["video"]), lit(h["split"]), f"{h['score']:.4f}",
                      *(f"{h['levels'][lv]:.4f}" for lv in levels), f"{h['anomaly']:.2f}", _fmt_span(h))
        if not qr["hits"]:
            say(f"{n}. {qr['query']}: no hits")
            continue
        console.print(t)


def write_json(r: dict, path) -> None:
    text = json.dumps(r, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------
# HTML report


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _plot_png(h: dict, marks: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = h["frames"]
    fig, ax = plt.subplots(figsize=(5.6, 2.1), dpi=90)
    ax.axvspan(h["span"]["start"], h["span"]["end"], color="#f4b400", alpha=0.25, label="span")
    ax.plot(fr["time"], fr["anomaly"], color="#c62828", marker=".", label="anomaly score A")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, max(h["duration"], max(fr["time"], default=0.0)) or 1.0)
    ax.set_xlabel("seconds", fontsize=7)
    ax.set_ylabel("A", fontsize=7, color="#c62828")
    ax2 = ax.twinx()
    ax2.plot(fr["time"], fr["similarity"], color="#1565c0", marker=".", label="query similarity")
    ax2.set_ylabel("similarity", fontsize=7, color="#1565c0")
    for t in marks:
        ax.axvline(t, color="#555555", lw=0.6, ls=":")
    for a in (ax, ax2):
        a.tick_params(labelsize=6)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="lower left", bbox_to_anchor=(0, 1.0),
              ncol=3, frameon=False, borderaxespad=0.2)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _thumb_jpeg(img: np.ndarray, size: int = 176) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def best_frames(h: dict, k: int = THUMBNAILS) -> list[int]:
    """Positions (in h['frames'] lists) of the k most relevant frames, in time order."""
    rel = np.asarray(h["frames"]["relevance"])
    order = np.lexsort((np.arange(len(rel)), -rel))[:k]
    return sorted(int(i) for i in order)


def _small(img: np.ndarray, size: int = 2 * 176) -> np.ndarray:
    """A decoded frame cut down to at most `size` pixels a side as it is decoded (a report of
    4K videos then holds thumbnails, not 25 MB frames)."""
    from PIL import Image

    if max(img.shape[:2]) <= size:
        return img
    im = Image.fromarray(img)
    im.thumbnail((size, size))
    return np.asarray(im)


class _Frames:
    """Decoded sampled frames of original videos, once per video (read_frames: the extraction's
    own frame choice), or why not."""

    def __init__(self, num_frames: int):
        self.n, self.memo = num_frames, {}

    def get(self, root, rel: str):
        from .media import MediaError, read_frames

        if not root:
            return None, "the split records no video root: no thumbnails"
        path = Path(root) / rel
        key = str(path)
        if key not in self.memo:
            if not path.is_file():
                self.memo[key] = (None, f"original video not reachable ({path}): no thumbnails")
            else:
                try:
                    self.memo[key] = (read_frames(path, self.n, _small), "")
                except MediaError as e:
                    self.memo[key] = (None, f"original video could not be decoded ({e}): no thumbnails")
                except Exception as e:  # noqa: BLE001 - a report must not die on one bad file
                    self.memo[key] = (None, f"original video could not be decoded ({type(e).__name__}): no thumbnails")
        return self.memo[key]


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin:.2em 0}.hit{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.meta{font-size:.85em;color:#444}.meta td{padding:0 .8em 0 0}.thumbs{display:flex;gap:.5em;flex-wrap:wrap}
figure{margin:0}figcaption{font-size:.75em;color:#555}.inspan img{outline:3px solid #f4b400}
.note{font-size:.85em;color:#8a5a00}.plot{display:block;margin-top:.4em;max-width:100%}"""


def render_html(r: dict) -> str:
    """One self-contained page: a section per query, per hit its scores, thumbnails of its best
    frames (decoded from the original video when reachable) and a plot of the frame-level anomaly
    score and query similarity with the span highlighted; every image is embedded (base64)."""
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    roots = {s["name"]: s["root"] for s in r["splits"]}
    frames = _Frames(r["num_frames"])
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>varcmp-search: {e(len(r['queries']))} queries</title>", f"<style>{CSS}</style>", "</head>",
           "<body>", "<h1>varcmp-search report</h1>",
           f'<p class="meta">cache {e(r["cache"])} &middot; checkpoint {e(r["checkpoint"])} &middot; '
           f'{e(r["query_kind"])} queries &middot; levels {e("+".join(r["levels"]))} &middot; splits '
           + e(", ".join(f"{s['name']} ({s['videos']} videos, {s['mode']})" for s in r["splits"])) + "</p>",
           f'<p class="meta">span: {e(r["span_rule"])}</p>']
    for n, qr in enumerate(r["queries"], 1):
        out.append(f'<section class="query" id="q{n}">')
        out.append(f"<h2>{n}. {e(qr['query'])}</h2>")
        if not qr["hits"]:
            out.append("<p>no hits</p>")
        for h in qr["hits"]:
            out.append(f'<article class="hit" id="q{n}-{h["rank"]}">')
            out.append(f"<h3>#{h['rank']} {e(h['video'])}</h3>")
            levels = " ".join(f"<td>{e(lv)} {v:.4f}</td>" for lv, v in h["levels"].items())
            out.append(f'<table class="meta"><tr><td>split {e(h["split"])}</td><td>score {h["score"]:.4f}</td>'
                       f'{levels}<td>anomaly {h["anomaly"]:.2f}</td><td>span {_fmt_span(h)} s of '
                       f'{h["duration"]:.1f} s</td></tr></table>')
            picks = best_frames(h)
            fr = h["frames"]
            got, why = frames.get(roots.get(h["split"]), h["video"])
            if got is None:
                out.append(f'<p class="note">{e(why)}</p>')
            else:
                out.append('<div class="thumbs">')
                dec_t = np.asarray(got.times)
                for i in picks:
                    t = fr["time"][i]
                    img = got.images[int(np.argmin(np.abs(dec_t - t)))]
                    inside = h["span"]["first_frame"] <= fr["index"][i] <= h["span"]["last_frame"]
                    out.append(f'<figure class="{"inspan" if inside else "outspan"}"><img src="'
                               f'{_b64(_thumb_jpeg(img), "image/jpeg")}" alt="frame at {t:.1f} s">'
                               f"<figcaption>{t:.1f} s{' (span)' if inside else ''}</figcaption></figure>")
                out.append("</div>")
            plot = _plot_png(h, [fr["time"][i] for i in picks])
            out.append(f'<img class="plot" src="{_b64(plot, "image/png")}" alt="anomaly score and query '
                       f'similarity over time, span {_fmt_span(h)} s">')
            out.append("</article>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_html(r: dict, path) -> None:
    text = render_html(r)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------
# The command


EPILOG = (f"Modes: exhaustive scores every video with the full three-level score; two-stage takes the "
          f"--candidates videos of highest first-stage score (the coarse level, plus for text the weighted-mean "
          f"half of the fine level: one inner product per video) from a faiss index, built once per cache, "
          f"checkpoint and split and stored in the cache's {INDEX_DIR}/ folder (building shows progress), and "
          f"reranks them with the full score; auto uses two-stage for splits of more than {AUTO_TWO_STAGE} "
          f"videos. With --candidates >= the split's size both modes give identical results. Span: the frames "
          f"around the one maximising frame weight x query similarity, extended while neighbours keep "
          f"{SPAN_THRESHOLD} of its relevance or more (python -c 'import varcmp.search; help(varcmp.search)').")


@click.command(cls=OneLineErrors, epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("query", nargs=-1)
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run directory (its best.safetensors, else last.safetensors) or checkpoint file.")
@click.option("--audio", "audio", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Audio clip(s) to search with (audio checkpoints); repeat for several.")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="One query per line: text, or audio file paths (relative to FILE's folder) for an audio "
                   "checkpoint. Batched: videos are read and encoded once for all of them.")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="Split(s) to search; repeat for several [default: every split of the cache].")
@click.option("--top", default=10, type=click.IntRange(1), help="Hits per query.")
@click.option("--json", "json_out", type=OutputFile(), default=None,
              help="Also write the hits as JSON (scores, per-level scores, anomaly, span, frame curves).")
@click.option("--html", "html_out", type=OutputFile(), default=None,
              help="Also write a self-contained HTML report (thumbnails and plots embedded).")
@click.option("--clip-model", default=None,
              help="Where to load CLIP from [default: the name the cache recorded]; its config and weights "
                   "must hash as the cache's.")
@click.option("--clap-model", default=None, help="The same for CLAP (audio queries).")
@click.option("--mode", type=click.Choice(MODES), default="auto",
              help=f"auto: two-stage above {AUTO_TWO_STAGE} videos in a split, else exhaustive.")
@click.option("--candidates", default=None, type=click.IntRange(1),
              help=f"Two-stage: videos per query (and split) that the full score reranks [default: "
                   f"{DEFAULT_POOL_SHARE:.0%} of the split, at least {DEFAULT_CANDIDATES}].")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("--chunk", type=int, default=None,
              help=f"Videos per page (read, encoded, scored together) and queries per scoring block "
                   f"[default: {DEFAULT_CHUNK} on CPU, {DEFAULT_CHUNK_CUDA} on CUDA]. Results do not depend on it "
                   "beyond float rounding.")
def main(cache, query, checkpoint, audio, queries_file, splits, top, json_out, html_out, clip_model, clap_model,
         mode, candidates, device, chunk):
    """Search a feature cache with a text or audio query: the matching videos ranked by a trained
    checkpoint, each with its per-level scores, predicted anomaly probability and the time span
    where it matches best.

    \b
    Examples:
      varcmp-search cache.zarr --checkpoint runs/ucf "a man in a black shirt hits a dog with a stick" --top 10
      varcmp-search cache.zarr --checkpoint runs/xd --audio gunshot.wav --top 5
      varcmp-search cache.zarr --checkpoint runs/ucf --queries queries.txt --json hits.json
      varcmp-search cache.zarr --checkpoint runs/ucf "car on fire" --html report.html
      varcmp-search big.zarr --checkpoint runs/ucf "a fight" --mode two-stage --candidates 2000
    """
    from rich.console import Console

    from .checkpoint import CheckpointError
    from .media import MediaError

    err = Console(stderr=True)
    try:
        result = run_search(cache, checkpoint, query, audio, queries_file, splits, top, clip_model, clap_model,
                            mode, candidates, device, chunk, console=err)
    except (UserError, CacheError, CheckpointError, MediaError) as e:
        raise CommandError(" ".join(str(e).split())) from None
    for flag, path, write in (("--json", json_out, write_json), ("--html", html_out, write_html)):
        if path is not None:  # the files first: nothing printed can then cost them
            try:
                write(result, path)
            except OSError as e:
                raise CommandError(f"{flag} {path}: {e.strerror or e}") from None
    out = Console()
    print_results(result, out if out.is_terminal else Console(width=160))


if __name__ == "__main__":
    main()
