"""Ranks and retrieval metrics (R@K, MdR, MnR) in both directions, ties counted against the model;
their bootstrap intervals (one result, or the paired difference of two; each result one run or
several runs, e.g. seeds, on the same units); and the opt-in post-processing (DSL, Sinkhorn, QB-Norm)."""

from __future__ import annotations

import numpy as np

from ..errors import UserError

METRICS = ("r1", "r5", "r10", "r50", "mdr", "mnr")
POST = ("dsl", "sinkhorn", "qb")
QB_BANK = 4096  # at most this many training queries in the query bank of --post qb (a seeded draw)
SINKHORN_ITERS = 4          # alternating row/column normalisations (log domain)


# --------------------------------------------------------------------------
# Ranks and metrics


def _finite_or_worst(sim: np.ndarray) -> np.ndarray:
    """NaN scores (a broken model) rank last, so they can never flatter a result."""
    sim = np.asarray(sim)
    return np.where(np.isnan(sim), -np.inf, sim) if np.isnan(sim).any() else sim


def _pairing(sim: np.ndarray, query_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = _finite_or_worst(sim)
    query_video = np.asarray(query_video, dtype=np.int64)
    if sim.ndim != 2 or query_video.shape != (sim.shape[1],) or (
            len(query_video) and not 0 <= query_video.min() <= query_video.max() < sim.shape[0]):
        raise ValueError(f"query_video must give a row of sim {sim.shape} for each of its {sim.shape[-1]} "
                         f"columns, got {query_video.shape} values")
    return sim, query_video


def query_to_video_ranks(sim: np.ndarray, query_video: np.ndarray) -> np.ndarray:
    """sim [V, Q]; query_video[q] = row of q's video. Rank of that video among all videos, per query:
    1 + the number of other videos scoring >= the true one."""
    sim, query_video = _pairing(sim, query_video)
    q = np.arange(sim.shape[1])
    true = sim[query_video, q]  # [Q]
    return (sim >= true[None, :]).sum(0)  # the true video itself + every other video scoring >= it


def video_to_query_ranks(sim: np.ndarray, query_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per video that has queries: 1 + the number of other videos' queries scoring at least as high
    as its best-scoring own query (a video with several captions is retrieved by its best one).
    Returns (ranks, video rows)."""
    sim, query_video = _pairing(sim, query_video)
    V, Q = sim.shape
    rows = np.unique(query_video)
    if Q == 0:
        return np.zeros(0, dtype=np.int64), rows
    true = sim[query_video, np.arange(Q)].astype(np.float64)     # float64 holds every value exactly
    best = np.full(V, -np.inf)
    np.maximum.at(best, query_video, true)                       # best own query per video
    at_least = (sim[rows] >= best[rows, None]).sum(1)            # all queries >= it, own ones included
    own = np.bincount(query_video[true >= best[query_video]], minlength=V)[rows]
    return (1 + at_least - own).astype(np.int64), rows


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


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (1 positive): the probability that
    a positive scores above a negative, ties counting one half (Mann-Whitney U from average ranks).
    None when one of the classes is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their average rank
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


# --------------------------------------------------------------------------
# How sure: percentile bootstrap over the ranked units (queries for query->video, videos for
# video->query), seeded, so the same command gives the same interval


RESAMPLES = 1000
LEVEL = 0.95


def _metric_rows(ranks: np.ndarray, m: str) -> np.ndarray:
    """Metric `m` of every row of a [B, n] matrix of ranks (as `summarize` computes it for one row)."""
    if m.startswith("r") and m[1:].isdigit():
        return 100.0 * (ranks <= int(m[1:])).mean(1)
    if m == "mdr":
        return np.median(ranks, axis=1)
    if m == "mnr":
        return ranks.mean(1)
    raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")


def _runs(ranks) -> np.ndarray:
    """The ranks of one run [n], or of several runs on the same units [S, n] (e.g. seeds), as [S, n]."""
    runs = np.asarray(ranks, dtype=np.float64)
    if runs.ndim not in (1, 2):
        raise ValueError(f"ranks: expected [units] or [runs, units], got shape {runs.shape}")
    return runs[None] if runs.ndim == 1 else runs


def pooled_summary(ranks, metrics=METRICS) -> dict[str, float]:
    """`summarize` of one run, or the mean over several runs on the same units of each run's metric."""
    runs = _runs(ranks)
    per_run = [summarize(r, metrics) for r in runs]
    return {m: float(np.mean([s[m] for s in per_run])) for m in metrics}


def _pooled_rows(runs: np.ndarray, idx: np.ndarray, m: str) -> np.ndarray:
    """Metric `m` of each resample `idx` [B, n] of the units, the mean over the runs [S, n] -> [B]:
    every run is drawn on the same units (the runs are held fixed, the units resampled)."""
    return np.mean([_metric_rows(r[idx], m) for r in runs], axis=0)


def _resampled(n: int, resamples: int, seed: int):
    """Blocks of [rows, n] indices drawn with replacement, `resamples` rows in all, a few million
    indices a block (so a large split needs no [resamples, n] matrix); the same arguments give the
    same draws."""
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 22) // max(n, 1))
    for start in range(0, resamples, rows):
        yield rng.integers(0, n, size=(min(rows, resamples - start), n))


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _nan_interval() -> list[float]:
    return [float("nan"), float("nan")]


def bootstrap_intervals(ranks: np.ndarray, metrics=METRICS, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> dict[str, list[float]]:
    """The `level` percentile-bootstrap interval [lo, hi] of each metric of `ranks` (one rank per
    unit [n], or per run and unit [S, n]): the metric (its mean over the runs) of `resamples`
    resamples of the units, drawn with replacement."""
    runs = _runs(ranks)
    if runs.shape[1] == 0:
        return {m: _nan_interval() for m in metrics}
    values = {m: [] for m in metrics}
    for idx in _resampled(runs.shape[1], resamples, seed):
        for m in metrics:
            values[m].append(_pooled_rows(runs, idx, m))
    return {m: _percentiles(np.concatenate(v), level) for m, v in values.items()}


def auc_interval(scores: np.ndarray, labels: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> list[float] | None:
    """The `level` percentile-bootstrap interval [lo, hi] of `roc_auc(scores, labels)`: the AUC of
    `resamples` resamples of the videos, each class drawn with replacement within itself (so every
    resample keeps the split's counts of anomalous and normal videos and has an AUC). None when a
    class is absent (no AUC)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if not len(pos) or not len(neg):
        return None
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    values = [roc_auc(scores[np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]], y)
              for _ in range(resamples)]
    return _percentiles(np.array(values), level)


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, metrics=METRICS, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = LEVEL) -> dict[str, dict]:
    """Metric of A minus metric of B on the same units (ranks_a[..., i] and ranks_b[..., i] rank the
    same query or video), with its paired-bootstrap interval: each resample draws the same units for
    both. Either side may hold several runs [S, n] (seeds of one setting): its metric is then the
    mean over its runs, and the interval resamples the units with the runs held fixed.
    {metric: {"difference": d, "interval": [lo, hi]}}."""
    a, b = _runs(ranks_a), _runs(ranks_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired ranks must rank the same units, got {a.shape[1]} and {b.shape[1]}")
    n = a.shape[1]
    if n == 0:
        return {m: {"difference": float("nan"), "interval": _nan_interval()} for m in metrics}
    values = {m: [] for m in metrics}
    for idx in _resampled(n, resamples, seed):
        for m in metrics:
            values[m].append(_pooled_rows(a, idx, m) - _pooled_rows(b, idx, m))
    every = np.arange(n)[None]
    return {m: {"difference": float(_pooled_rows(a, every, m)[0] - _pooled_rows(b, every, m)[0]),
                "interval": _percentiles(np.concatenate(v), level)} for m, v in values.items()}


def holds(d: dict) -> bool:
    """Whether a paired difference holds at its level: its interval excludes 0."""
    lo, hi = d["interval"]
    return bool(lo > 0 or hi < 0)


def paired_comparison(ranks_a, ranks_b, directions, metrics=METRICS, resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, dict]:
    """A minus B in each direction, from their rank arrays on the same split (`ranks_a[i]`,
    `ranks_b[i]`: one direction's ranks, [n] or [runs, n]; `directions`: its (key, label) pairs, e.g.
    QueryKind's):
    {key: {"direction": label, metric: {"difference", "interval", "holds"}}}. What `varcmp-eval
    --compare` reports and the demo's ablation differences."""
    out = {}
    for (key, label), a, b in zip(directions, ranks_a, ranks_b):
        diff = paired_difference(a, b, metrics, resamples, seed)
        out[key] = {"direction": label, **{m: {**d, "holds": holds(d)} for m, d in diff.items()}}
    return out


def r1_units(sim: np.ndarray, query_video: np.ndarray) -> np.ndarray:
    """Per video with queries (the rows `video_to_query_ranks` returns, in its order): [its queries
    ranked first for query->video, its number of queries, 1 if video->query ranks it first]. The
    units that `mean_r1_gain` resamples: a video is drawn with its queries."""
    q2v = query_to_video_ranks(sim, query_video) == 1
    v2q, rows = video_to_query_ranks(sim, query_video)
    query_video = np.asarray(query_video, dtype=np.int64)
    hits = np.bincount(query_video, weights=q2v, minlength=sim.shape[0])[rows]
    return np.stack([hits, np.bincount(query_video, minlength=sim.shape[0])[rows], v2q == 1], 1).astype(np.int64)


def _mean_r1(units: np.ndarray) -> np.ndarray:
    """The mean of the two R@1 (model selection's score) of [..., n, 3] units (`r1_units`)."""
    return 50.0 * (units[..., 0].sum(-1) / units[..., 1].sum(-1) + units[..., 2].mean(-1))


def mean_r1_gain(units_a: np.ndarray, units_b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, float]:
    """(mean R@1 of A minus that of B on the same videos, the one-sided `level` lower bound of that
    gain): a paired bootstrap over the videos, each drawn with its queries in both directions.
    The gain holds at `level` when the bound is above 0."""
    a, b = np.asarray(units_a, dtype=np.float64), np.asarray(units_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3 or not len(a):
        raise ValueError(f"paired units must be the same [videos, 3] arrays, got {a.shape} and {b.shape}")
    draws = np.concatenate([_mean_r1(a[idx]) - _mean_r1(b[idx]) for idx in _resampled(len(a), resamples, seed)])
    return float(_mean_r1(a) - _mean_r1(b)), float(np.quantile(draws, 1 - level))


# --------------------------------------------------------------------------
# Opt-in post-processing (never applied unless asked for; the output says which was used)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def postprocess(sim: np.ndarray, method: str | None, scale: float = 100.0,
                bank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Matrices ranked in each direction, (for query->video, for video->query), from raw sim [V, Q].

    None: the raw similarities for both.
    "dsl": dual softmax (CAMoE): the raw score times a prior, the softmax of scale * sim over the
        *other* axis: query->video ranks sim * softmax_q(scale * sim) (each video's distribution
        over the queries), video->query ranks sim * softmax_v(scale * sim).
    "sinkhorn": log-domain Sinkhorn normalisation of exp(scale * sim): SINKHORN_ITERS rounds of
        normalising the rows (videos), then the columns (queries); the same matrix is ranked in
        both directions.
    Both use the statistics of the whole test collection (transductive): they are not raw
    similarities and are labelled as such in every output.
    "qb": querybank normalisation with the inverted softmax (QB-Norm, Bogolin et al. 2022), inductive:
        `bank` [V, B] holds each video's raw similarity to B queries of the training split, and
        query->video ranks sim - logsumexp_b(scale * bank) / scale, the log of the inverted softmax
        exp(scale * sim) / sum_b exp(scale * bank). The correction is one number per video (how much
        it matches any query: a "hub"), so video->query, which ranks the queries of one video,
        keeps the raw similarities.
    scale: the model's logit scale."""
    sim = np.asarray(sim, dtype=np.float64)
    if method is None:
        return sim, sim
    if method == "qb":
        if bank is None or len(bank) != len(sim):
            raise ValueError("qb needs bank: each video's similarities to the query bank, one row per video")
        hub = _logsumexp(scale * np.asarray(bank, dtype=np.float64), axis=1) / scale  # [V, 1]
        return sim - hub, sim
    if method == "dsl":
        z = scale * sim
        return sim * _softmax(z, axis=1), sim * _softmax(z, axis=0)
    if method == "sinkhorn":
        z = scale * sim
        for _ in range(SINKHORN_ITERS):
            z = z - _logsumexp(z, axis=1)
            z = z - _logsumexp(z, axis=0)
        return z, z
    raise ValueError(f"unknown post-processing {method!r}; choose from {', '.join(POST)}")


POST_LABEL = {None: "none (raw similarities)", "dsl": "DSL, dual softmax (not raw similarities)",
              "sinkhorn": f"Sinkhorn, {SINKHORN_ITERS} iterations (not raw similarities)",
              "qb": "QB-Norm, inverted softmax over training queries (not raw similarities; video->query raw)"}


def parse_metrics(text) -> tuple[str, ...]:
    """'r1,r5,r10,mdr' -> ('r1', 'r5', 'r10', 'mdr'); any rK (K >= 1), mdr and mnr."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not names:
        raise UserError(f"--metrics: name at least one of {', '.join(METRICS)}")
    for m in names:
        if not (m in ("mdr", "mnr") or (m.startswith("r") and m[1:].isdigit() and int(m[1:]) >= 1)):
            raise UserError(f"--metrics: unknown metric {m!r}; choose from {', '.join(METRICS)} (or any rK)")
    return tuple(dict.fromkeys(names))


def metric_label(m: str) -> str:
    return {"mdr": "MdR", "mnr": "MnR"}.get(m, f"R@{m[1:]}")


def format_metric(m: str, value: float) -> str:
    """How the table prints a value: R@K and MnR with one decimal, MdR as it is (x or x.5)."""
    if value != value:  # NaN
        return "-"
    return f"{value:.0f}" if m == "mdr" and float(value).is_integer() else f"{value:.1f}"
