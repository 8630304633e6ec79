"""`varcmp-eval`: retrieval metrics of a checkpoint (or of zero-shot CLIP) on one split, scored by
the engine that validation and search share (`retrieval.scoring`), measured by `retrieval.metrics`.

Rank of the true item = 1 + the number of other items scoring at least as high:
ties count against the model.

    varcmp-eval cache.zarr --checkpoint runs/ucf --split test --metrics r1,r5,r10,mdr
    varcmp-eval cache.zarr --checkpoint runs/xd --split test --json results.json
    varcmp-eval cache.zarr --zero-shot --split test
    varcmp-eval cache.zarr --checkpoint runs/ucf --levels coarse --no-anomaly-weighting
    varcmp-eval cache.zarr --checkpoint runs/a-seed0 --checkpoint runs/a-seed1 \
                           --compare runs/b-seed0 --compare runs/b-seed1      # seeds pooled"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from .cache.reader import read_rows
from .cli.common import OneLineErrors, OutputFile, report_console
from .errors import UserError
from .model import VarCMP
from .model.queries import AUDIO, QUERY_KINDS, check_segments
from .retrieval.frame_labels import annotation_frame_labels, frame_auc, read_temporal_annotations
from .retrieval.metrics import (LEVEL, METRICS, POST, POST_LABEL, QB_BANK, RESAMPLES, SINKHORN_ITERS, auc_interval,
                                bootstrap_intervals, format_metric, metric_label, paired_comparison, parse_metrics,
                                pooled_summary, postprocess, query_to_video_ranks, roc_auc, summarize,
                                video_to_query_ranks)
from .retrieval.pairs import load_eval_data
from .retrieval.scoring import (DEFAULT_CHUNK, DEFAULT_CHUNK_CUDA, ENCODE_BATCH, default_chunk, encode_queries,
                                encode_videos, score_matrix)

DEFAULT_METRICS = ("r1", "r5", "r10", "mdr")
ZERO_SHOT = "zero-shot (untrained heads)"  # what a comparison with the zero-shot model names it


# --------------------------------------------------------------------------
# The command

SHOWN_DROPPED = 5


def pick_device(name: str) -> torch.device:
    """--device NAME as a device (`resolve_device`); UserError (one line) for one that is not here."""
    from .encoders.frozen import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def zero_shot_model(spec, query: str) -> VarCMP:
    """Untrained heads with the cache's dims: e_v = mean frame feature, uniform weights, A = 0.5
    (no video predicted anomalous), patches closest to their frame's [CLS]: the frozen-CLIP
    baseline. Seeded, so the (unused) random parts are the same on every run."""
    from .model import ModelConfig

    torch.manual_seed(0)
    heads = next(h for h in (8, 4, 2, 1) if spec.dim % h == 0)
    cfg = ModelConfig(query=query, dim=spec.dim, audio_dim=spec.audio_dim, num_frames=spec.num_frames,
                      num_patches=spec.num_patches, max_words=spec.max_words,
                      audio_segments=max(1, spec.audio_segments), top_patches=min(4, spec.num_patches), heads=heads,
                      selector_cos=1.0)
    return VarCMP(cfg).eval()


def _levels(text, default) -> tuple[str, ...]:
    """--levels 'coarse,fine' -> ('coarse', 'fine'), checked; None or empty -> default."""
    from .model import LEVELS

    if not text:
        return tuple(default)
    levels = tuple(x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip())
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise UserError(f"--levels: unknown level {bad[0]!r}; choose from {', '.join(LEVELS)}")
    if not levels or len(set(levels)) != len(levels):
        raise UserError(f"--levels {','.join(levels)}: name each of {', '.join(LEVELS)} at most once")
    return levels


def evaluate_split(cache, checkpoint=None, split: str = "test", query: str | None = None, metrics=DEFAULT_METRICS,
                   zero_shot: bool = False, levels=None, anomaly_weighting: bool | None = None,
                   chunk: int | None = None, device: str = "auto", post: str | None = None,
                   bootstrap: int = RESAMPLES, seed: int = 0, compare=None, compare_zero_shot: bool = False,
                   keep_ranks: bool = False, temporal_annotations=None, bank_split: str = "train") -> dict:
    """Everything `varcmp-eval` reports, as a JSON-ready dict: each metric with its 95 % bootstrap
    interval over `bootstrap` resamples (seeded by `seed`; 0: none) and, with `compare` (a second
    checkpoint) or `compare_zero_shot`, each metric's difference to it on the same queries with its
    paired-bootstrap interval. `checkpoint` and `compare` may each be a list of runs of one setting
    (seeds): its metrics are then the mean over the runs, each run's own are under "runs", and the
    intervals resample the queries (videos) with the runs held fixed. `keep_ranks`: also the rank
    of every query and video ("ranks", per direction; per run and unit for several runs), to compare
    with other results later (`retrieval.metrics.paired_comparison`).
    The anomaly head's frame-level AUC uses the split's stored frame labels, or those of
    `temporal_annotations` (UCF-Crime's temporal annotation file; `retrieval.frame_labels`).
    `post="qb"` draws its query bank from `bank_split` (never the evaluated split).
    Raises UserError, CacheError or CheckpointError (one-line messages) for what cannot be
    evaluated."""
    from .cache.reader import open_cache

    c = open_cache(cache)
    try:
        return _evaluate_split(c, checkpoint, split, query, metrics, zero_shot, levels, anomaly_weighting,
                               chunk, device, post, bootstrap, seed, compare, compare_zero_shot, keep_ranks,
                               temporal_annotations, bank_split)
    finally:
        c.close()


def _evaluate_split(c, checkpoint, split, query, metrics, zero_shot, levels, anomaly_weighting, chunk, device,
                    post, bootstrap=RESAMPLES, seed=0, compare=None, compare_zero_shot=False,
                    keep_ranks=False, temporal_annotations=None, bank_split="train") -> dict:
    """evaluate_split on an open cache: check the request, rank both directions, summarise (and
    compare)."""
    metrics = parse_metrics(metrics)
    checkpoints, compare = _run_list(checkpoint), _run_list(compare)
    _check_request(checkpoints, zero_shot, query, post, chunk)
    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap}: must be >= 0 (0: no intervals)")
    if compare and compare_zero_shot:
        raise UserError("--compare CHECKPOINT and --compare-zero-shot: give one of them")
    comparing = bool(compare) or compare_zero_shot
    if comparing and not bootstrap:
        raise UserError(f"{'--compare' if compare else '--compare-zero-shot'} needs the bootstrap: "
                        "drop --bootstrap 0")
    spans = None if temporal_annotations is None else read_temporal_annotations(temporal_annotations)
    dev = pick_device(device)
    chunk = chunk or default_chunk(dev)
    sp = c.split(split)
    bank = _bank_split(c, sp, bank_split) if post == "qb" else None
    runs = _ranked_runs(c, sp, checkpoints, query, levels, anomaly_weighting, post, dev, chunk, bank)
    run, ranks = runs[0], _pooled_ranks(runs)
    frame_labels = _frame_labels(sp, run.data.videos, spans, temporal_annotations)
    anomaly = [_anomaly(r.data, r.v, *frame_labels, bootstrap=bootstrap, seed=seed) for r in runs]
    kind = run.model.kind
    pooled = len(runs) > 1
    result = {**_settings(c, split, kind.name, [str(r.ckpt) for r in runs] if pooled else run.ckpt, zero_shot,
                          run.levels, run.weighting, post),
              "metrics": {key: {"direction": label, "ranked": int(r.shape[-1]), **pooled_summary(r, metrics)}
                          for (key, label), r in zip(kind.directions, ranks)},
              "metric_names": list(metrics),
              "bootstrap": {"resamples": bootstrap, "seed": seed, "level": LEVEL,
                            "units": f"{kind.name} queries ({kind.metric_keys[0]}), videos ({kind.metric_keys[1]})"
                                     + (f", the {len(runs)} runs held fixed" if pooled else "")},
              "counts": _counts(run.data, None if pooled else run.v),
              "anomaly": None if pooled else anomaly[0],
              "dropped": list(run.data.dropped),
              "chunk": chunk,
              "device": str(dev),
              "index": None if pooled or run.index is None else str(run.index.folder)}
    if pooled:  # each run on its own; the metrics above are their mean
        result["runs"] = [{"checkpoint": str(r.ckpt), "predicted_anomalous": int(r.v.anomalous.sum()),
                           "index": None if r.index is None else str(r.index.folder),
                           "metrics": {key: summarize(x, metrics) for (key, _), x in zip(kind.directions, r.ranks)},
                           "anomaly": a} for r, a in zip(runs, anomaly)]
    if bank is not None:
        result["query_bank"] = {"split": bank.name, "queries": run.bank_size}
    if bootstrap:
        for res, r in zip(result["metrics"].values(), ranks):
            res["interval"] = bootstrap_intervals(r, metrics, bootstrap, seed)
    if keep_ranks:
        result["ranks"] = {key: r.tolist() for (key, _), r in zip(kind.directions, ranks)}
    if comparing:
        result["compare"] = _compare(c, sp, compare, runs, levels, anomaly_weighting, post, dev, chunk, metrics,
                                     bootstrap, seed, bank)
    return result


def _run_list(checkpoints) -> list:
    """--checkpoint / --compare as a list of runs: None or () is none, a path is one."""
    if checkpoints is None:
        return []
    if isinstance(checkpoints, (str, Path)):
        return [checkpoints]
    return list(checkpoints)


def _ranked_runs(c, sp, checkpoints: list, query, levels, anomaly_weighting, post, dev, chunk, bank) -> list:
    """`_ranked` for each run of one setting ([]: the zero-shot model); runs pooled together must be
    for the same query kind and evaluated at the same levels and weighting (UserError)."""
    runs = []
    for ckpt in checkpoints or [None]:
        runs.append(_ranked(c, sp, ckpt, query, levels, anomaly_weighting, post, dev, chunk, bank))
        first, last = runs[0], runs[-1]
        if last.model.cfg.query != first.model.cfg.query:
            raise UserError(f"{last.ckpt}: trained for {last.model.cfg.query} queries, but {first.ckpt} for "
                            f"{first.model.cfg.query}: runs pooled together must be one setting (seeds)")
        if (last.levels, last.weighting) != (first.levels, first.weighting):
            raise UserError(f"{last.ckpt}: levels {'+'.join(last.levels)}, weighting "
                            f"{'on' if last.weighting else 'off'}, but {first.ckpt} has "
                            f"{'+'.join(first.levels)}, {'on' if first.weighting else 'off'}: runs pooled together "
                            "must be one setting (seeds); --levels (--no-anomaly-weighting) evaluates them alike")
    return runs


def _pooled_ranks(runs: list) -> tuple:
    """Per direction, the one run's ranks [n] or the runs' [S, n]."""
    per_direction = zip(*(r.ranks for r in runs))
    return tuple(np.stack(r) if len(runs) > 1 else r[0] for r in per_direction)


@dataclass
class _Ranked:
    model: VarCMP
    ckpt: object
    levels: tuple
    weighting: bool
    data: object
    v: object
    ranks: tuple  # query->video per query, video->query per video with queries
    index: object = None  # the stored index the videos were read from (None: encoded here)
    bank_size: int = 0  # queries in the query bank (--post qb)


def _ranked(c, sp, checkpoint, query, levels, anomaly_weighting, post, dev, chunk, bank=None) -> _Ranked:
    """Load the model and the split's pairs, score every pair, rank both directions (`bank`: the
    split whose queries form the query bank of --post qb)."""
    model, ckpt = _model(c, sp, checkpoint, query, dev)
    kind = model.kind
    levels = _levels(levels, model.cfg.levels)  # ablations: same weights, other levels or weighting
    weighting = model.cfg.anomaly_weighting if anomaly_weighting is None else bool(anomaly_weighting)
    check_segments(model.cfg, c, ckpt)
    index = _stored_index(c, sp, model, ckpt, levels, weighting, dev)
    data = load_eval_data(sp, kind.name, patches="finer" in levels and index is None)
    if len(data.query_video) == 0:
        raise UserError(f"{c.path}: split '{sp.name}' has no {kind.name} query whose video was extracted"
                        + (f" ({len(data.dropped)} dropped)" if data.dropped else ""))
    v, sims = _score(model, data, dev, levels, weighting, chunk, index)
    bank_sims = None if bank is None else _bank_similarities(model, bank, v, dev, levels, chunk)
    m_q2v, m_v2q = postprocess(sims["total"], post, model.cfg.logit_scale, bank_sims)
    ranks = (query_to_video_ranks(m_q2v, data.query_video), video_to_query_ranks(m_v2q, data.query_video)[0])
    return _Ranked(model, ckpt, levels, weighting, data, v, ranks, index,
                   0 if bank_sims is None else bank_sims.shape[1])


def _bank_split(c, sp, name: str):
    """The split whose queries are --post qb's query bank: another split than the evaluated one."""
    if name == sp.name:
        raise UserError(f"--bank-split {name}: the query bank must come from another split than the one "
                        "evaluated (its queries would normalise themselves)")
    if name not in c.splits:
        raise UserError(f"{c.path}: no split '{name}' for the query bank of --post qb (splits: "
                        f"{', '.join(c.splits)}); name one with --bank-split")
    return c.split(name)


def _bank_similarities(model: VarCMP, bank, v, dev, levels, chunk: int) -> np.ndarray:
    """Each video's total similarity to the query bank [V, B]: up to QB_BANK queries of split `bank`
    (a seeded draw when it has more), encoded by the same model."""
    data = load_eval_data(bank, model.kind.name, patches=False)
    n = len(data.query_video)
    if n == 0:
        raise UserError(f"split '{bank.name}' has no {model.kind.name} queries for the query bank of --post qb")
    keep = np.sort(np.random.default_rng(0).choice(n, QB_BANK, replace=False)) if n > QB_BANK else np.arange(n)
    q = encode_queries(model, {k: x[keep] for k, x in data.query_feats.items()}, dev)
    return np.asarray(score_matrix(model, v, q, levels, chunk=chunk)["total"])


def _compare(c, sp, checkpoints: list, runs: list, levels, anomaly_weighting, post, dev, chunk, metrics, bootstrap,
             seed, bank=None) -> dict:
    """The model(s) evaluated first minus `checkpoints` ([]: zero-shot) on the same split, queries
    and overrides, per metric, with paired-bootstrap intervals: the same queries (videos) are
    drawn for both (each side's mean over its runs, when it has several). Zero-shot takes the
    evaluated model's levels and weighting (its counterpart: a coarse-only run against zero-shot
    coarse)."""
    run = runs[0]
    if not checkpoints:
        levels, anomaly_weighting = run.levels, run.weighting
    others = _ranked_runs(c, sp, checkpoints, run.model.cfg.query, levels, anomaly_weighting, post, dev, chunk, bank)
    other = others[0]
    names = [ZERO_SHOT if o.ckpt is None else str(o.ckpt) for o in others]
    return {"checkpoint": names if len(others) > 1 else names[0], "zero_shot": other.ckpt is None,
            "levels": list(other.levels), "anomaly_weighting": other.weighting,
            "metrics": paired_comparison(_pooled_ranks(runs), _pooled_ranks(others), run.model.kind.directions,
                                         metrics, bootstrap, seed)}


def _check_request(checkpoints: list, zero_shot, query, post, chunk) -> None:
    """The options that are wrong whatever the cache holds (UserError, one line)."""
    if zero_shot == bool(checkpoints):
        raise UserError("give either --checkpoint RUN_DIR_OR_FILE or --zero-shot" if not zero_shot
                        else "--zero-shot evaluates untrained heads; it cannot be combined with --checkpoint")
    if query is not None and query not in QUERY_KINDS:
        raise UserError(f"--query {query}: choose text or audio")
    if post not in (None, *POST):
        raise UserError(f"--post {post}: choose from {', '.join(POST)}")
    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk {chunk}: must be >= 1")


def _model(c, sp, checkpoint, query, dev) -> tuple[VarCMP, object]:
    """The model to evaluate and its checkpoint file (None: zero-shot, for `query`, by default the
    first kind the split holds queries of). A checkpoint is checked against the cache and --query."""
    from .model.checkpoint import check_compatible, load, read_meta, resolve

    if checkpoint is None:
        if query is None:
            query = next((k.name for k in QUERY_KINDS.values() if getattr(sp, k.held)), None)
            if query is None:
                raise UserError(f"{c.path}: split '{sp.name}' has neither captions nor audio features to query with")
        return zero_shot_model(c.spec, query).to(dev), None
    ckpt = resolve(checkpoint)
    check_compatible(read_meta(ckpt), c, ckpt)
    model, _ = load(ckpt, dev)
    if query is not None and query != model.cfg.query:
        raise UserError(f"{ckpt}: trained for {model.cfg.query} queries, not --query {query}")
    return model, ckpt


def _stored_index(c, sp, model: VarCMP, ckpt, levels, weighting: bool, dev):
    """The split's stored index of this checkpoint (`varcmp-index`) when it holds what these levels
    and this weighting need and still matches the cache; else None (the videos are encoded here)."""
    from .retrieval.index import stored_index
    from .retrieval.videos import CacheVideos

    if ckpt is None or weighting != model.cfg.anomaly_weighting or ("finer" in levels and "finer" not in model.cfg.levels):
        return None
    return stored_index(model, c, CacheVideos(sp), dev)


def _score(model: VarCMP, data, dev, levels, weighting: bool, chunk: int, index=None):
    """The videos' embeddings (read from `index` when given, else encoded) and the all-pairs
    similarities (each level and "total", [V, Q])."""
    torch.manual_seed(0)
    model.eval()
    if index is not None:  # its positions are the split's done videos in order, as data.videos holds them
        v = index.embed(np.arange(index.n), dev, patches="finer" in levels)
        if v.patches is not None:  # products in float32, as for fresh encodings (the index's rounding only)
            v = dataclasses.replace(v, patches=v.patches.float())
    else:
        v = encode_videos(model, data.videos, dev, batch=ENCODE_BATCH, patches="finer" in levels,
                          anomaly_weighting=weighting)
    q = encode_queries(model, data.query_feats, dev)
    return v, score_matrix(model, v, q, levels, chunk=chunk)


def _settings(c, split, query, ckpt, zero_shot, levels, weighting, post) -> dict:
    """What was evaluated, and how (the head of the JSON result)."""
    from . import __version__

    return {"varcmp_version": __version__, "cache": str(c.path), "split": split, "query": query,
            "checkpoint": None if ckpt is None else ckpt if isinstance(ckpt, list) else str(ckpt), "zero_shot": bool(zero_shot), "levels": list(levels),
            "anomaly_weighting": weighting, "post": post, "raw_similarities": post is None,
            "scores": POST_LABEL[post]}


def _counts(data, v) -> dict:
    """The split's counts; `v` (the encoded videos) for those predicted anomalous (None: several runs)."""
    per_video = np.bincount(data.query_video, minlength=len(data.videos.index))
    return {"videos": len(data.videos.index),
            "queries": len(data.query_video),
            "videos_without_query": int((per_video == 0).sum()),
            "videos_with_several_queries": int((per_video > 1).sum()),
            "dropped_queries": len(data.dropped),
            "predicted_anomalous": None if v is None else int(v.anomalous.sum())}


def _frame_labels(sp, videos, spans, annotations) -> tuple[np.ndarray | None, str | None]:
    """(per-frame labels of `videos` or None, where they come from): the temporal annotation file
    when one is given, else the split's stored labels, else none."""
    if spans is not None:
        fps = read_rows(sp.array("videos/fps"), videos.index)
        return annotation_frame_labels(spans, videos.paths, videos.frame_time, fps), str(annotations)
    if sp.has_frame_labels:
        return sp.frame_labels(videos.index), "cache"
    return None, None


def _anomaly(data, v, frame_labels=None, source=None, bootstrap: int = 0, seed: int = 0) -> dict:
    """How the anomaly head separates the split's videos by their labels (video-level ROC AUC of
    the MIL video score, None when the split holds one class only, and with `bootstrap` resamples
    its interval) and, where frame labels exist, its frames (frame-level ROC AUC of the frame
    scores A over the labelled valid frames)."""
    labels = np.asarray(data.videos.labels) > 0
    scores = v.video_score.float().cpu().numpy()
    frames = frame_auc(v.anomaly.float().cpu().numpy(), data.videos.frame_mask, frame_labels)
    out = {"video_auc": roc_auc(scores, labels), "anomalous": int(labels.sum()),
           "normal": int((~labels).sum()), "predicted_anomalous": int(v.anomalous.sum()),
           "frame_auc": frames.pop("auc"), "frame_labels": {"source": source, **frames}}
    if bootstrap:
        out["video_auc_interval"] = auc_interval(scores, labels, bootstrap, seed)
    return out


def print_report(r: dict, console) -> None:
    from rich.table import Table

    n = r["counts"]
    say = lambda text: console.print(text, soft_wrap=True, highlight=False, markup=False)  # noqa: E731
    model = "zero-shot (untrained heads: the frozen-CLIP baseline)" if r["zero_shot"] else _named(r["checkpoint"])
    flagged = "" if n["predicted_anomalous"] is None else f" ({n['predicted_anomalous']} predicted anomalous)"
    say(f"varcmp-eval | cache {r['cache']} | split {r['split']} | {n['videos']} videos, {n['queries']} {r['query']} "
        f"queries | model {model} | levels {'+'.join(r['levels'])} | anomaly weighting "
        f"{'on' if r['anomaly_weighting'] else 'off'}{flagged} | post-processing: {r['scores']}")
    if r["zero_shot"] and r["query"] == AUDIO.name:
        say("note: zero-shot audio uses an untrained audio encoder (CLAP is not aligned with CLIP): "
            "expect chance level")
    if r.get("index"):
        say(f"videos read from the stored index {r['index']} (varcmp-index), not encoded again")
    if r["anomaly"] is not None:
        _say_anomaly(r["anomaly"], say)
    for i, run in enumerate(r.get("runs", ()), 1):  # several runs pooled: each on its own, then their mean
        m = r["metric_names"][0]
        say(f"run {i}: {run['checkpoint']} | " + " | ".join(
            f"{res['direction']} {metric_label(m)} {format_metric(m, run['metrics'][key][m])}"
            for key, res in r["metrics"].items()))
        _say_anomaly(run["anomaly"], lambda text: say("  " + text))
    if n["videos_without_query"]:
        say(f"{n['videos_without_query']} videos have no {r['query']} query: kept in the gallery as distractors")
    if n["videos_with_several_queries"]:
        say(f"{n['videos_with_several_queries']} videos have several queries: each query is ranked "
            f"({r['query']}->video); video->{r['query']} uses each video's best-scoring one")
    if n["dropped_queries"]:
        shown = "; ".join(r["dropped"][:SHOWN_DROPPED])
        more = n["dropped_queries"] - SHOWN_DROPPED
        say(f"{n['dropped_queries']} queries dropped (not scored): {shown}"
            + (f"; and {more} more (all listed by --json)" if more > 0 else ""))
    runs = r.get("runs")
    table = Table(title=f"mean over the {len(runs)} runs" if runs else None, show_edge=True, header_style="bold")
    table.add_column("direction")
    table.add_column("ranked", justify="right")
    for m in r["metric_names"]:
        table.add_column(metric_label(m), justify="right")
    for res in r["metrics"].values():
        table.add_row(res["direction"], str(res["ranked"]), *(format_metric(m, res[m]) for m in r["metric_names"]))
    console.print(table)
    if r["bootstrap"]["resamples"]:
        print_intervals(r, console)
    if "compare" in r:
        print_comparison(r, console)


def _say_anomaly(a: dict, say) -> None:
    """The anomaly head's video-level and frame-level AUC, as far as the labels allow."""
    if a["video_auc"] is not None:
        iv = a.get("video_auc_interval")
        within = (f" ({100 * LEVEL:g}% interval {iv[0]:.3f}-{iv[1]:.3f}, videos resampled within each class)"
                  if iv else "")
        say(f"anomaly head: video-level AUC {a['video_auc']:.3f}{within} on {a['anomalous']} anomalous and "
            f"{a['normal']} normal videos (labels from the paths); {a['predicted_anomalous']} predicted anomalous")
    fl = a["frame_labels"]
    if a["frame_auc"] is not None:
        say(f"anomaly head: frame-level AUC {a['frame_auc']:.3f} over {fl['frames']} sampled frames of {fl['videos']} "
            f"videos (frame labels from {'the cache' if fl['source'] == 'cache' else fl['source']})")
    elif fl["source"] is not None:
        say(f"anomaly head: no frame-level AUC: {fl['frames']} labelled frames of {fl['videos']} videos "
            f"(from {fl['source']}) hold one class only")


def _named(checkpoint) -> str:
    """A checkpoint's name in the report, or several runs' (pooled: their mean)."""
    if isinstance(checkpoint, list):
        return f"{len(checkpoint)} runs pooled (their mean): {', '.join(checkpoint)}"
    return checkpoint


def print_intervals(r: dict, console) -> None:
    """Each metric with its bootstrap interval, a row per metric (so that it fits whatever the metrics)."""
    from rich.table import Table

    b = r["bootstrap"]
    table = Table(title=f"{b['level']:.0%} bootstrap intervals ({b['resamples']} resamples of the {b['units']}, "
                        f"seed {b['seed']})", show_edge=True, header_style="bold")
    table.add_column("metric")
    for res in r["metrics"].values():
        table.add_column(res["direction"], justify="right", no_wrap=True)
    for m in r["metric_names"]:
        table.add_row(metric_label(m), *(f"{format_metric(m, res[m])}  [{format_metric(m, res['interval'][m][0])}, "
                                         f"{format_metric(m, res['interval'][m][1])}]" for res in r["metrics"].values()))
    console.print(table, markup=False)


def print_comparison(r: dict, console) -> None:
    """The paired comparison, a row per metric: the evaluated checkpoint's value minus the other's,
    its paired-bootstrap interval, and `*` where the interval excludes 0 (the difference holds)."""
    from rich.table import Table

    from .cli.markup import lit

    cmp, b = r["compare"], r["bootstrap"]
    table = Table(title=lit(f"difference to {_named(cmp['checkpoint'])} (levels {'+'.join(cmp['levels'])}), same "
                            f"queries: {b['level']:.0%} paired-bootstrap interval, * where it excludes 0"),
                  show_edge=True, header_style="bold")
    table.add_column("metric")
    for res in cmp["metrics"].values():
        table.add_column(res["direction"], justify="right", no_wrap=True)
    for m in r["metric_names"]:
        table.add_row(metric_label(m), *(_delta(res[m]) for res in cmp["metrics"].values()))
    console.print(table, markup=False)


def _delta(d: dict) -> str:
    lo, hi = d["interval"]
    return f"{d['difference']:+.1f}  [{lo:+.1f}, {hi:+.1f}]{' *' if d['holds'] else '  '}"


def _main(**kw):
    from .atomic import atomic_write

    json_out = kw.pop("json_out")
    kw["anomaly_weighting"] = False if kw.pop("no_anomaly_weighting") else None
    result = evaluate_split(**kw)  # a VarcmpError is one line and exit code 2 (OneLineErrors)
    if json_out is not None:  # the file first: nothing printed can then cost it
        text = json.dumps(result, indent=2) + "\n"
        try:
            atomic_write(Path(json_out), lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            click.echo(f"error: --json {json_out}: {e.strerror or e}", err=True)
            sys.exit(2)
    print_report(result, report_console())


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
               epilog="Rank = 1 + the number of OTHER items scoring >= the true one (ties count against "
                      "the model). A video with several captions: each caption is ranked over the videos "
                      "(text->video), and video->text ranks the video's best-scoring caption among the "
                      "other videos' captions. Captions whose video was not extracted are dropped and "
                      "listed; videos without a query stay in the gallery as distractors. The same "
                      "command gives the same numbers (eval mode, hard top-k, no dropout).")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), multiple=True,
              help="Run directory (its best.safetensors, else last.safetensors) or checkpoint file. Give it "
                   "again for more runs of the same setting (seeds): the metrics are then their mean, each "
                   "run's own are listed, and the intervals hold the runs fixed.")
@click.option("--split", default="test", help="Split of the cache to evaluate.")
@click.option("--query", type=click.Choice(list(QUERY_KINDS)), default=None,
              help="Query modality [default: the checkpoint's; zero-shot: text if captions exist].")
@click.option("--metrics", default=",".join(DEFAULT_METRICS), help=f"Any of {','.join(METRICS)}.")
@click.option("--json", "json_out", type=OutputFile(), default=None,
              help="Also write the results as JSON (metrics, counts, settings, dropped queries).")
@click.option("--zero-shot", is_flag=True, help="No checkpoint: untrained heads, i.e. the frozen-CLIP baseline.")
@click.option("--levels", default=None, help="Override the checkpoint's levels, e.g. coarse or coarse,fine "
                                              "(ablation rows; weights unchanged).")
@click.option("--no-anomaly-weighting", is_flag=True, help="Switch eq. 6-7 off (ablation).")
@click.option("--chunk", type=int, default=None,
              help=f"Videos x queries per scoring block [default: {DEFAULT_CHUNK} on CPU, {DEFAULT_CHUNK_CUDA} on "
                   "CUDA]. Peak memory of a block ~ 3 * chunk^2 * L * N * M * 4 bytes (L query tokens, N frames, "
                   "M patches/frame): 48 MiB at 32, 768 MiB at 128 with 32 x 32 x 4. Results do not depend on it.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("--bootstrap", type=int, default=RESAMPLES,
              help="Resamples of the queries (videos, for video->query) for each metric's 95 % interval; 0: none.")
@click.option("--seed", type=int, default=0, help="Seed of the bootstrap resamples (the same seed, the same intervals).")
@click.option("--compare", type=click.Path(path_type=Path), multiple=True, metavar="CHECKPOINT",
              help="A second run directory or checkpoint: print each metric's difference (first minus this one) on "
                   "the same queries, with its paired-bootstrap interval. Give it again for more runs of that "
                   "setting (seeds: the difference of the two settings' means over their runs).")
@click.option("--compare-zero-shot", is_flag=True,
              help="As --compare, against the zero-shot model (untrained heads: the frozen-CLIP baseline) with "
                   "the evaluated model's levels: a coarse-only run against zero-shot coarse.")
@click.option("--temporal-annotations", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE", help="UCF-Crime's Temporal_Anomaly_Annotation.txt (name class start1 end1 start2 end2, "
              "frames, -1 for none): frame labels for the anomaly head's frame-level AUC, matched to the videos by "
              "file name [default: the labels stored in the cache, if any (varcmp-synth stores them)].")
@click.option("--post", type=click.Choice(list(POST)), default=None,
              help="Opt-in post-processing, labelled in the output: dsl = dual softmax (CAMoE): sim * "
                   "softmax(logit_scale * sim) over the other axis; sinkhorn = "
                   f"{SINKHORN_ITERS} log-domain row/column normalisations of exp(logit_scale * sim) (both "
                   "use all the test queries); qb = querybank normalisation (QB-Norm, inverted softmax): each "
                   "video's score minus its log-sum-exp over queries of --bank-split, which lowers videos that "
                   "match every query (hubs); it uses no test query, and video->query stays raw. "
                   "[default: raw similarities]")
@click.option("--bank-split", default="train", show_default=True,
              help=f"--post qb: the split whose queries form the query bank (up to {QB_BANK}, a seeded draw).")
def main(**kw):
    """Retrieval metrics of a checkpoint (or of zero-shot CLIP) on one split of a feature cache:
    R@K, median and mean rank, in both directions (text->video and video->text, or audio->video
    and video->audio), from raw similarities unless --post is given.

    \b
    Examples:
      varcmp-eval cache.zarr --checkpoint runs/ucf --json results.json
      varcmp-eval cache.zarr --zero-shot
      varcmp-eval cache.zarr --checkpoint runs/ucf --compare-zero-shot
      varcmp-eval cache.zarr --checkpoint runs/ucf --compare runs/coarse-only --post qb
      varcmp-eval cache.zarr --checkpoint runs/a-s0 --checkpoint runs/a-s1 --compare runs/b-s0 --compare runs/b-s1"""
    _main(**kw)


if __name__ == "__main__":
    main()
