"""The one scoring engine: per-video and per-query encodings in batches, then the all-pairs
score in blocks (`score_matrix`, used by validation and evaluation) or the best `top` videos per
query page by page (`top_k`, used by search). Every number comes from `VarCMP.encode_videos`,
`VarCMP.encode_queries` and `VarCMP.similarity`; levels and anomaly weighting are arguments, never
a change to the model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model import QueryEmb, VarCMP, VideoEmb

DEFAULT_CHUNK = 32          # CPU; see score_matrix for the memory formula and benchmarks/evaluate.py
DEFAULT_CHUNK_CUDA = 128    # GPUs want bigger blocks (fewer kernel launches)
INDEX_PAGE = 128            # videos per page of top_k over a stored index (one query: fewest passes)
ENCODE_BATCH = 16           # videos per encode_videos forward in evaluation and the index build
                            # (memory, not results; on one CPU core 16 was the fastest of 8-64)


def default_chunk(device) -> int:
    return DEFAULT_CHUNK_CUDA if torch.device(device).type == "cuda" else DEFAULT_CHUNK


@torch.inference_mode()
def encode_videos(model: VarCMP, videos, device, batch: int = 256, *, patches: bool | None = None,
                  anomaly_weighting: bool | None = None) -> VideoEmb:
    """Per-video parts of `videos` (frame_feat, frame_mask and, with patches, patch_feat), once, in
    the model's current mode (eval: predicted anomaly labels). `batch` bounds memory only.
    patches / anomaly_weighting: as VarCMP.encode_videos (default: the model's config)."""
    patches = "finer" in model.cfg.levels if patches is None else patches
    parts = []
    for s in range(0, len(videos.frame_mask), batch):
        sl = slice(s, s + batch)
        parts.append(model.encode_videos(
            torch.from_numpy(videos.frame_feat[sl]).to(device), torch.from_numpy(videos.frame_mask[sl]).to(device),
            torch.from_numpy(videos.patch_feat[sl]).to(device) if patches else None,
            patches=patches, anomaly_weighting=anomaly_weighting))
    return VideoEmb.cat(parts)


@torch.inference_mode()
def encode_queries(model: VarCMP, feats: dict[str, np.ndarray], device, batch: int = 1024) -> QueryEmb:
    """Queries from their cached features (text: word_feat, word_mask, sentence; audio: seg_feat,
    seg_mask) through VarCMP.encode_queries, in batches."""
    n = len(next(iter(feats.values())))
    return QueryEmb.cat(model.encode_queries({k: torch.from_numpy(v[s:s + batch]).to(device)
                                              for k, v in feats.items()})
                        for s in range(0, n, batch))


def _trim_tokens(q: QueryEmb) -> QueryEmb:
    """Drop token positions that are padding in every query of the block (exact: padded tokens weigh
    0 in every sum and are -inf in every max). Keeps at least one position."""
    valid = q.token_mask.any(0)
    n = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 1
    if n == q.tokens.shape[1]:
        return q
    return QueryEmb(glob=q.glob, tokens=q.tokens[:, :n], token_mask=q.token_mask[:, :n],
                    token_weights=q.token_weights[:, :n])


@torch.inference_mode()
def score_matrix(model: VarCMP, v: VideoEmb, q: QueryEmb, levels=None,
                 chunk: int = DEFAULT_CHUNK) -> dict[str, np.ndarray]:
    """All-pairs similarities through VarCMP.similarity, one float32 [V, Q] array per level and
    "total", computed in blocks of `chunk` videos x `chunk` queries so that memory does not grow
    with the collection.

    Peak memory of one block is dominated by the finer level's token-wise similarity, a
    [chunk, chunk, L, N*M] float32 tensor and its masked copies (VarCMP.token_wise):
        about 3 * chunk^2 * L * N * M * 4 bytes
    (L query tokens, N frames, M selected patches per frame); at the production sizes (L = 32,
    N = 32, M = 4) that is 48 MiB at chunk 32, 192 MiB at 64 (measured: 130-185 MiB) and 768 MiB
    at 128, on top of the [V, Q] outputs and the per-video/per-query embeddings, which grow with
    the collection, not with the number of pairs. On 2 CPU cores blocks of 24-32 were the fastest
    (cache-sized), 64 about 20% slower. Queries are scored in order of their last valid token, and
    each block drops the token positions that are padding in all of its queries (exact, see
    _trim_tokens)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    V, Q = len(v), len(q)
    order = np.zeros(0, dtype=np.int64)
    if Q:  # queries in order of their last valid token, so that blocks of short queries can be trimmed
        pos = torch.arange(q.token_mask.shape[1], device=q.token_mask.device)
        last = torch.where(q.token_mask, pos, -1).amax(1).cpu()
        order = torch.sort(last, stable=True).indices.numpy()
    out: dict[str, np.ndarray] = {}
    for qs in range(0, Q, chunk):
        cols = order[qs:qs + chunk]
        qb = _trim_tokens(q.take(torch.from_numpy(cols).to(q.glob.device)))
        for vs in range(0, V, chunk):
            block = model.similarity(v.take(slice(vs, vs + chunk)), qb, levels)
            for k, s in block.items():
                if k not in out:
                    out[k] = np.empty((V, Q), dtype=np.float32)
                out[k][vs:vs + chunk, cols] = s.float().cpu().numpy()
    if not out:  # an empty collection: the keys the model would have produced
        lv = tuple(model.cfg.levels if levels is None else levels)
        out = {k: np.zeros((V, Q), dtype=np.float32) for k in (*lv, "total")}
    return out


# --------------------------------------------------------------------------
# Top-k mode: the best videos of a source, page by page


@dataclass
class Ranked:
    """The best `top` videos of each query (positions in the source; -1 where fewer)."""

    pos: np.ndarray                  # [Q, top] int64
    scores: dict[str, np.ndarray]    # level and "total" -> [Q, top] float32
    video_score: np.ndarray          # [Q, top] predicted anomaly probability
    anomalous: np.ndarray            # [Q, top] bool (video_score > 0.5)


def _empty_ranked(Q: int, keys) -> Ranked:
    return Ranked(np.zeros((Q, 0), np.int64), {k: np.zeros((Q, 0), np.float32) for k in keys},
                  np.zeros((Q, 0), np.float32), np.zeros((Q, 0), bool))


def _merge(best: Ranked, pos: np.ndarray, scores: dict[str, np.ndarray], vscore: np.ndarray, anom: np.ndarray,
           top: int) -> Ranked:
    """Keep the `top` best of `best` plus new candidates (scores [G, U] for positions pos [U]; -inf
    marks a pair that is not a candidate). Order: total descending, then position ascending."""
    G, U = scores["total"].shape
    tot = np.concatenate([best.scores["total"], scores["total"]], axis=1)
    tot = np.where(np.isnan(tot), -np.inf, tot)
    allpos = np.concatenate([best.pos, np.broadcast_to(pos, (G, U))], axis=1)
    order = np.lexsort((allpos, -tot.astype(np.float64)), axis=-1)[:, :top]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return Ranked(take(allpos), {k: take(np.concatenate([best.scores[k], v], axis=1)) for k, v in scores.items()},
                  take(np.concatenate([best.video_score, np.broadcast_to(vscore, (G, U))], axis=1)),
                  take(np.concatenate([best.anomalous, np.broadcast_to(anom, (G, U))], axis=1)))


def _stack(parts: list[Ranked], keys) -> Ranked:
    """Per-group results (widths may differ: fewer candidates) as one Ranked, padded with -1 / -inf."""
    w = max(r.pos.shape[1] for r in parts)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=v)  # noqa: E731
    return Ranked(np.concatenate([pad(r.pos, -1) for r in parts]),
                  {k: np.concatenate([pad(r.scores[k], -np.inf) for r in parts]) for k in keys},
                  np.concatenate([pad(r.video_score, np.nan) for r in parts]),
                  np.concatenate([pad(r.anomalous, False) for r in parts]))


def _pairs(candidates: list[np.ndarray], Q: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (query, position) candidate pair, sorted by position: a page's pairs are one slice."""
    if len(candidates) != Q:
        raise ValueError(f"{len(candidates)} candidate lists for {Q} queries")
    qi = np.concatenate([np.full(len(np.unique(c)), i, np.int64) for i, c in enumerate(candidates)])
    ci = np.concatenate([np.unique(np.asarray(c, np.int64)) for c in candidates])
    if len(ci) and (ci.min() < 0 or ci.max() >= n):
        raise ValueError(f"candidate positions must be in [0, {n})")
    order = np.argsort(ci, kind="stable")
    return qi[order], ci[order]


@dataclass
class _Page:
    """One page of videos, read and encoded: their positions, embeddings and anomaly predictions."""

    pos: np.ndarray          # [U] positions in the source, ascending
    v: VideoEmb
    video_score: np.ndarray  # [U]
    anomalous: np.ndarray    # [U] bool


def _read_page(model: VarCMP, source, pos: np.ndarray, device, stats: dict, on_page) -> _Page:
    """Read and encode the videos at `pos` (one forward), timing both into `stats`. A source with
    `embed` (a stored `retrieval.index.VideoIndex`) holds them encoded already: read only."""
    t0 = time.perf_counter()
    patches = "finer" in model.cfg.levels
    if hasattr(source, "embed"):
        v = source.embed(pos, device, patches=patches)
        t1 = time.perf_counter()
    else:
        data = source.read(pos, patches=patches)
        t1 = time.perf_counter()
        v = encode_videos(model, data, device, batch=len(pos))
    if on_page is not None:
        on_page(pos, v)
    stats["read"] += t1 - t0
    stats["encode"] += time.perf_counter() - t1
    return _Page(pos, v, v.video_score.float().cpu().numpy(), v.anomalous.cpu().numpy())


def _members(qi: np.ndarray, ci: np.ndarray, need: np.ndarray, Q: int) -> np.ndarray:
    """[Q, len(need)] bool: which of the page's videos are candidates of each query (pairs by position)."""
    a, b = np.searchsorted(ci, [need[0], need[-1] + 1])
    member = np.zeros((Q, len(need)), bool)
    member[qi[a:b], np.searchsorted(need, ci[a:b])] = True
    return member


def _rank_page(model: VarCMP, page: _Page, q: QueryEmb, member: np.ndarray | None, best: Ranked, top: int,
               chunk: int) -> Ranked:
    """`best` of a group of queries `q` updated with one page: each query scored against the page's
    videos that are a candidate of one of the group's queries (member [G, U]; None: every video),
    non-candidate pairs at -inf."""
    cols = np.arange(len(page.pos))
    if member is not None:
        cols = np.flatnonzero(member.any(0))
        if len(cols) == 0:
            return best
    v = page.v if len(cols) == len(page.pos) else page.v.take(torch.from_numpy(cols).to(page.v.video.device))
    s = {k: m.T for k, m in score_matrix(model, v, q, chunk=chunk).items()}  # [G, U]
    if member is not None:
        mask = member[:, cols]
        s = {k: np.where(mask, m, -np.inf).astype(np.float32) for k, m in s.items()}
    return _merge(best, page.pos[cols], s, page.video_score[cols], page.anomalous[cols], top)


def top_k(model: VarCMP, source, q: QueryEmb, top: int, candidates: list[np.ndarray] | None = None,
          chunk: int = DEFAULT_CHUNK, device="cpu", progress=None, stats: dict | None = None,
          on_page=None, page: int | None = None) -> Ranked:
    """The `top` best videos of `source` (`.n` videos, and `.read(pos, patches)` of their raw
    features or `.embed(pos, device, patches)` of their stored encoding) for each query by the full
    score (model.cfg.levels).

    candidates: None scores every video (exhaustive); else one array of positions per query, and
    only those are read, encoded and scored (two-stage). The videos to score (all, or the union of
    the candidates), in position order, are taken in pages of `page` videos (default: `chunk` of
    raw features; at least INDEX_PAGE of a stored index, whose pages are encoded already): a page
    is read and encoded once, then scored (`score_matrix`, in blocks of `chunk`) against the
    queries in groups of `chunk`, each group against the page's videos that are a candidate of one
    of its queries. With every video a candidate of every query, the computation is that of
    candidates=None, operation for operation. `stats` (a dict) accumulates the seconds spent
    reading, encoding and scoring; `on_page(pos, VideoEmb)` sees every encoded page."""
    Q, n = len(q), source.n
    keys = (*model.cfg.levels, "total")
    if Q == 0 or n == 0:
        return _empty_ranked(Q, keys)
    qi = ci = None
    union = np.arange(n)
    if candidates is not None:
        qi, ci = _pairs(candidates, Q, n)
        union = np.unique(ci)
    stats = stats if stats is not None else {}
    for k in ("read", "encode", "score"):
        stats.setdefault(k, 0.0)
    groups = [slice(g, min(g + chunk, Q)) for g in range(0, Q, chunk)]
    best = [_empty_ranked(g.stop - g.start, keys) for g in groups]
    page = page or (max(chunk, INDEX_PAGE) if hasattr(source, "embed") else chunk)
    pages = [union[s:s + page] for s in range(0, len(union), page)]
    task = progress.add_task("scoring", total=len(pages)) if progress is not None else None
    for need in pages:
        member = None if candidates is None else _members(qi, ci, need, Q)
        page = _read_page(model, source, need, device, stats, on_page)
        t0 = time.perf_counter()
        for gi, g in enumerate(groups):
            best[gi] = _rank_page(model, page, q.take(g), None if member is None else member[g], best[gi], top, chunk)
        stats["score"] += time.perf_counter() - t0
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return _stack(best, keys)
