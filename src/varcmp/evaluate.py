"""Retrieval metrics and all-pairs scoring from the cache (shared with training's
validation and with search).

Rank of the true item = 1 + the number of other items scoring at least as high:
ties count against the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cache_schema import CacheError, Split, VideoData
from .model import QueryEmb, VarCMP, VideoEmb

METRICS = ("r1", "r5", "r10", "r50", "mdr", "mnr")


# --------------------------------------------------------------------------
# Ranks and metrics


def query_to_video_ranks(sim: np.ndarray, query_video: np.ndarray) -> np.ndarray:
    """sim [V, Q]; query_video[q] = row of q's video. Rank of that video among all videos, per query."""
    sim = np.asarray(sim)
    q = np.arange(sim.shape[1])
    true = sim[query_video, q]  # [Q]
    return (sim >= true[None, :]).sum(0)  # the true video itself + every other video scoring >= it


def video_to_query_ranks(sim: np.ndarray, query_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per video that has queries: 1 + the number of other videos' queries scoring at least as high
    as its best-scoring own query. Returns (ranks, video rows)."""
    sim = np.asarray(sim)
    rows = np.unique(query_video)
    ranks = np.empty(len(rows), dtype=np.int64)
    for n, v in enumerate(rows):
        own = query_video == v
        best = sim[v, own].max()
        ranks[n] = 1 + int((sim[v, ~own] >= best).sum())
    return ranks, rows


def summarize(ranks: np.ndarray, metrics=METRICS) -> dict[str, float]:
    """R@K in percent, MdR and MnR of 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for m in metrics:
        if m.startswith("r") and m[1:].isdigit():
            out[m] = float(100.0 * (ranks <= int(m[1:])).mean()) if len(ranks) else float("nan")
        elif m == "mdr":
            out[m] = float(np.median(ranks)) if len(ranks) else float("nan")
        elif m == "mnr":
            out[m] = float(ranks.mean()) if len(ranks) else float("nan")
        else:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    return out


def retrieval_metrics(sim: np.ndarray, query_video: np.ndarray, metrics=METRICS) -> dict[str, dict[str, float]]:
    """Both directions: 'q2v' (text/audio -> video) and 'v2q' (video -> text/audio)."""
    v2q, _ = video_to_query_ranks(sim, query_video)
    return {"q2v": summarize(query_to_video_ranks(sim, query_video), metrics), "v2q": summarize(v2q, metrics)}


# --------------------------------------------------------------------------
# What is evaluated


@dataclass
class EvalData:
    """Videos and queries of one split, with the pairing and what had to be left out."""

    videos: VideoData
    query: str  # "text" or "audio"
    query_feats: dict[str, np.ndarray]  # text: word_feat, word_mask, sentence; audio: seg_feat, seg_mask
    query_video: np.ndarray  # [Q] row in `videos` of each query's video
    query_text: list[str]  # captions, or the video path of an audio query
    dropped: list[str] = field(default_factory=list)  # one line per query left out, and why
    no_query: int = 0  # videos (kept in the gallery) that have no query


def load_eval_data(split: Split, query: str, patches: bool = True) -> EvalData:
    """Every extracted video of the split, and every query whose video was extracted."""
    if query == "text":
        videos = split.load_videos(patches=patches, audio=False)
        t = split.load_text()
        row = {int(i): n for n, i in enumerate(videos.index)}
        keep = np.array([t.done[q] and int(t.video_index[q]) in row for q in range(len(t.text))], dtype=bool)
        paths = split.paths
        dropped = [f"caption {q} ({t.text[q][:40]!r}): its video {paths[t.video_index[q]]} was not extracted"
                   for q in np.flatnonzero(~keep)]
        qv = np.array([row[int(i)] for i in t.video_index[keep]], dtype=np.int64)
        feats = {"word_feat": t.word_feat[keep], "word_mask": t.word_mask[keep], "sentence": t.sentence[keep]}
        return EvalData(videos, "text", feats, qv, [str(x) for x in t.text[keep]], dropped,
                        int(len(videos.index) - len(np.unique(qv))))
    if query == "audio":
        if not split.has_audio:
            raise CacheError(f"{split.cache.path}: split '{split.name}' has no audio features (extract with --audio)")
        videos = split.load_videos(patches=patches, audio=True)
        has = videos.audio_mask.any(1)
        qv = np.flatnonzero(has)
        feats = {"seg_feat": videos.audio_feat[has], "seg_mask": videos.audio_mask[has]}
        return EvalData(videos, "audio", feats, qv, [str(p) for p in videos.paths[has]], [], int((~has).sum()))
    raise ValueError(f"query must be 'text' or 'audio', got {query!r}")


# --------------------------------------------------------------------------
# Encoding and blocked scoring


@torch.inference_mode()
def encode_videos(model: VarCMP, videos: VideoData, device, batch: int = 256) -> VideoEmb:
    """Per-video parts, once, in eval mode (predicted anomaly labels)."""
    parts = []
    finer = "finer" in model.cfg.levels
    for s in range(0, len(videos.index), batch):
        sl = slice(s, s + batch)
        parts.append(model.encode_videos(
            torch.from_numpy(videos.frame_feat[sl]).to(device), torch.from_numpy(videos.frame_mask[sl]).to(device),
            torch.from_numpy(videos.patch_feat[sl]).to(device) if finer else None))
    return VideoEmb.cat(parts)


@torch.inference_mode()
def encode_queries(model: VarCMP, feats: dict[str, np.ndarray], device, batch: int = 1024) -> QueryEmb:
    parts = []
    n = len(next(iter(feats.values())))
    for s in range(0, n, batch):
        t = {k: torch.from_numpy(v[s:s + batch]).to(device) for k, v in feats.items()}
        if model.cfg.query == "text":
            parts.append(model.encode_text(t["word_feat"], t["word_mask"], t["sentence"]))
        else:
            parts.append(model.encode_audio(t["seg_feat"], t["seg_mask"]))
    return QueryEmb.cat(parts)


@torch.inference_mode()
def score_matrix(model: VarCMP, v: VideoEmb, q: QueryEmb, levels=None, chunk: int = 64) -> dict[str, np.ndarray]:
    """All-pairs similarities, one float32 [V, Q] array per level and "total", computed in blocks
    of `chunk` videos x `chunk` queries so that memory does not grow with the collection."""
    out: dict[str, np.ndarray] = {}
    for vs in range(0, len(v), chunk):
        vb = v.take(slice(vs, vs + chunk))
        for qs in range(0, len(q), chunk):
            block = model.similarity(vb, q.take(slice(qs, qs + chunk)), levels)
            for k, s in block.items():
                if k not in out:
                    out[k] = np.empty((len(v), len(q)), dtype=np.float32)
                out[k][vs:vs + chunk, qs:qs + chunk] = s.float().cpu().numpy()
    return out
