"""Tests of varcmp.evaluate: rank metrics on hand-made matrices, blocked scoring, post-processing
and the `varcmp-eval` command on the planted cache."""
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ENCODERS, SPEC, one_line_error, write_planted_cache

from varcmp.model import checkpoint
from varcmp.cache.writer import CacheWriter
from varcmp.cache_schema import VideoEntry, VideoFeatures
from varcmp.cache.reader import open_cache
from varcmp.evaluate import DEFAULT_METRICS, evaluate_split, main, zero_shot_model
from varcmp.retrieval.metrics import METRICS, auc_interval, bootstrap_intervals, mean_r1_gain, paired_difference, pooled_summary, r1_units, roc_auc, format_metric, metric_label, postprocess, query_to_video_ranks, retrieval_metrics, summarize, video_to_query_ranks
from varcmp.retrieval.frame_labels import annotation_frame_labels, frame_auc, read_temporal_annotations
from varcmp.retrieval.pairs import load_eval_data
from varcmp.model import QUERIES, ModelConfig, VarCMP
from varcmp.model.queries import AUDIO, QUERY_KINDS, TEXT, query_kind
from varcmp.errors import UserError
from varcmp.retrieval.scoring import DEFAULT_CHUNK, encode_queries, encode_videos, score_matrix

ALL = ("r1", "r2", "r3", "r5", "r10", "mdr", "mnr")


# ----------------------------------------------------------------------------- ranks and metrics

def test_perfect_matrix():
    sim = np.eye(12) + 0.01 * np.arange(12)[None, :]  # off-diagonal scores differ, true pair always on top
    qv = np.arange(12)
    assert query_to_video_ranks(sim, qv).tolist() == [1] * 12
    ranks, rows = video_to_query_ranks(sim, qv)
    assert ranks.tolist() == [1] * 12 and rows.tolist() == list(range(12))
    m = retrieval_metrics(sim, qv, METRICS)
    for d in ("q2v", "v2q"):
        assert m[d] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "r50": 100.0, "mdr": 1.0, "mnr": 1.0}


def test_reversed_matrix_gives_worst_ranks():
    # every true pair scores below every other pair of its row and column
    sim = np.array([[0.1, 0.5, 0.9],
                    [0.8, 0.2, 0.4],
                    [0.6, 0.7, 0.3]])
    qv = np.arange(3)
    assert query_to_video_ranks(sim, qv).tolist() == [3, 3, 3]
    assert video_to_query_ranks(sim, qv)[0].tolist() == [3, 3, 3]
    sim10 = 1.0 - 2.0 * np.eye(10)
    m = retrieval_metrics(sim10, np.arange(10), METRICS)
    for d in ("q2v", "v2q"):
        assert m[d] == {"r1": 0.0, "r5": 0.0, "r10": 100.0, "r50": 100.0, "mdr": 10.0, "mnr": 10.0}


def test_mixed_ranks_mdr_mnr_by_hand():
    sim = np.array([[0.9, 0.1, 0.3, 0.2],
                    [0.5, 0.4, 0.6, 0.1],
                    [0.2, 0.8, 0.5, 0.3],
                    [0.1, 0.3, 0.7, 0.05]])
    qv = np.arange(4)
    # columns: q0 .9 top -> 1; q1 .4 < .8 -> 2; q2 .5 < .6, .7 -> 3; q3 .05 < .2, .1, .3 -> 4
    assert query_to_video_ranks(sim, qv).tolist() == [1, 2, 3, 4]
    # rows: v0 .9 top -> 1; v1 .4 < .5, .6 -> 3; v2 .5 < .8 -> 2; v3 .05 < .1, .3, .7 -> 4
    assert video_to_query_ranks(sim, qv)[0].tolist() == [1, 3, 2, 4]
    s = summarize([1, 2, 3, 4], ALL)
    assert s == {"r1": 25.0, "r2": 50.0, "r3": 75.0, "r5": 100.0, "r10": 100.0, "mdr": 2.5, "mnr": 2.5}
    s = summarize([1, 1, 2, 7, 9], ALL)
    assert s == {"r1": 40.0, "r2": 60.0, "r3": 60.0, "r5": 60.0, "r10": 100.0, "mdr": 2.0, "mnr": 4.0}


def test_ties_count_against_the_model():
    flat = np.full((5, 5), 0.3)
    qv = np.arange(5)
    assert query_to_video_ranks(flat, qv).tolist() == [5] * 5   # rank = number of items
    assert video_to_query_ranks(flat, qv)[0].tolist() == [5] * 5
    sim = np.array([[0.7, 0.2, 0.1],
                    [0.7, 0.9, 0.0],
                    [0.1, 0.3, 0.5]])
    qv = np.arange(3)
    # q0: v1 ties the true v0 at .7 -> 2 (an argsort could report 1); v2t v0: q0 .7, others .2 .1 -> 1
    assert query_to_video_ranks(sim, qv).tolist() == [2, 1, 1]
    # v1: own .9; q0 .7 below -> 1. v2: own .5; .1 .3 -> 1
    assert video_to_query_ranks(sim, qv)[0].tolist() == [1, 1, 1]
    sim[0, 2] = 0.5  # v0 now ties v2's own caption: v2t for v2 unchanged (a column tie), t2v q2 -> 2
    assert query_to_video_ranks(sim, qv).tolist() == [2, 1, 2]
    nan = np.eye(3)
    nan[1, 1] = np.nan   # a NaN true score ranks last, it never flatters
    assert query_to_video_ranks(nan, qv).tolist() == [1, 3, 1]
    assert video_to_query_ranks(nan, qv)[0].tolist() == [1, 3, 1]


def test_several_queries_per_video_and_distractors():
    # videos 0..3 (3 has no query: a distractor), queries 0..4 with their videos:
    qv = np.array([0, 0, 1, 2, 2])
    sim = np.array([[0.90, 0.20, 0.50, 0.60, 0.10],
                    [0.30, 0.80, 0.70, 0.20, 0.40],
                    [0.10, 0.30, 0.20, 0.90, 0.90],
                    [0.95, 0.10, 0.10, 0.10, 0.10]])
    # t2v per caption: q0 .90 < v3 .95 -> 2; q1 .20 < .80 .30 -> 3; q2 .70 top -> 1; q3 .90 top -> 1; q4 .90 -> 1
    assert query_to_video_ranks(sim, qv).tolist() == [2, 3, 1, 1, 1]
    ranks, rows = video_to_query_ranks(sim, qv)
    # v0: best own .90 (q0; own q1 .20 is ignored), others .50 .60 .10 -> 1
    # v1: own .70; others .30 .80 .20 .40 -> .80 >= -> 2
    # v2: best own .90, its other own caption ties at .90 and does not count; others .10 .30 .20 -> 1
    assert rows.tolist() == [0, 1, 2] and ranks.tolist() == [1, 2, 1]
    m = retrieval_metrics(sim, qv, ("r1", "mdr", "mnr"))
    assert m["q2v"] == {"r1": 60.0, "mdr": 1.0, "mnr": 8 / 5}
    assert m["v2q"] == {"r1": pytest.approx(200 / 3), "mdr": 1.0, "mnr": pytest.approx(4 / 3)}


@pytest.mark.parametrize("V, Q", [(7, 7), (9, 20), (30, 12)])
def test_vectorised_ranks_match_a_loop(V, Q):
    rng = np.random.default_rng(V * 100 + Q)
    sim = np.round(rng.random((V, Q)), 1).astype(np.float32)  # many ties
    qv = rng.integers(0, V, Q)
    t2v = [1 + sum(sim[u, q] >= sim[qv[q], q] for u in range(V) if u != qv[q]) for q in range(Q)]
    assert query_to_video_ranks(sim, qv).tolist() == t2v
    v2t = []
    for v in sorted(set(qv.tolist())):
        best = max(sim[v, q] for q in range(Q) if qv[q] == v)
        v2t.append(1 + sum(sim[v, q] >= best for q in range(Q) if qv[q] != v))
    assert video_to_query_ranks(sim, qv)[0].tolist() == v2t


@pytest.mark.parametrize("ranked", [lambda sim, qv: query_to_video_ranks(sim, qv),
                                    lambda sim, qv: video_to_query_ranks(sim, qv)[0]], ids=["t2v", "v2t"])
def test_recall_is_monotone_in_k(ranked):
    rng = np.random.default_rng(1)
    sim = rng.standard_normal((60, 80))
    qv = rng.integers(0, 60, 80)
    ks = [f"r{k}" for k in range(1, 81)]  # ranks are at most 60 (t2v) and 80 (v2t)
    s = summarize(ranked(sim, qv), ks)
    values = [s[k] for k in ks]
    assert values == sorted(values) and values[0] < values[-1] == 100.0


def test_metric_names_and_formatting():
    assert [metric_label(m) for m in METRICS] == ["R@1", "R@5", "R@10", "R@50", "MdR", "MnR"]
    assert format_metric("mdr", 3.0) == "3" and format_metric("mdr", 2.5) == "2.5"
    assert format_metric("r1", 100 / 3) == "33.3" and format_metric("mnr", 1e6) == "1000000.0"


def test_unknown_metric_and_mismatched_pairing_are_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        summarize([1, 2], ("r1", "map"))
    with pytest.raises(ValueError, match="query_video"):
        query_to_video_ranks(np.eye(3), np.arange(4))
    with pytest.raises(ValueError, match="query_video"):
        video_to_query_ranks(np.eye(3), np.array([0, 1, 3]))


# ----------------------------------------------------------------------------- post-processing

def test_postprocessing_definitions():
    sim = np.array([[0.9, 0.6, 0.1], [0.2, 0.55, 0.1]])
    raw = postprocess(sim, None)
    assert np.array_equal(raw[0], sim) and np.array_equal(raw[1], sim)
    q2v, v2q = postprocess(sim, "dsl", scale=10.0)
    e = np.exp(10 * sim)
    assert np.allclose(q2v, sim * e / e.sum(1, keepdims=True))   # prior: each video's softmax over queries
    assert np.allclose(v2q, sim * e / e.sum(0, keepdims=True))   # prior: each query's softmax over videos
    # q1's best video is v0 raw; DSL penalises v0 (it prefers q0) and picks v1: a different ranking
    assert sim[:, 1].argmax() == 0 and q2v[:, 1].argmax() == 1
    a, b = postprocess(sim, "sinkhorn", scale=10.0)
    assert a is b
    assert np.allclose(np.exp(a).sum(0), 1.0)              # columns normalised last
    with pytest.raises(ValueError, match="unknown post-processing"):
        postprocess(sim, "qb-norm")


def test_querybank_normalisation_is_the_inverted_softmax_over_the_bank():
    rng = np.random.default_rng(0)
    sim, bank = rng.uniform(-1, 1, (5, 4)), rng.uniform(-1, 1, (5, 7))
    q2v, v2q = postprocess(sim, "qb", scale=10.0, bank=bank)
    assert np.array_equal(v2q, sim)  # one correction per video: the queries of a video keep their order
    for v in range(5):  # plain: log( exp(10 sim) / sum_b exp(10 bank) ) / 10, video by video
        inverted = np.exp(10 * sim[v]) / sum(np.exp(10 * b) for b in bank[v])
        assert np.allclose(q2v[v], np.log(inverted) / 10, atol=1e-12)
    # a hub: video 0 gains +0.5 with every query, the bank's included: query->video ranks do not move
    hub = np.array([0.5, 0, 0, 0, 0])[:, None]
    again, _ = postprocess(sim + hub, "qb", scale=10.0, bank=bank + hub)
    assert np.allclose(again, q2v, atol=1e-12)
    assert not np.array_equal(np.argsort(-(sim + hub), 0), np.argsort(-sim, 0))  # the raw ranks did move
    with pytest.raises(ValueError, match="bank"):
        postprocess(sim, "qb")


# ----------------------------------------------------------------------------- scoring

def planted_model(query="text", seed=0, levels=("coarse", "fine", "finer")):
    torch.manual_seed(seed)
    cfg = ModelConfig(query=query, dim=SPEC.dim, audio_dim=SPEC.audio_dim, num_frames=SPEC.num_frames,
                      num_patches=SPEC.num_patches, max_words=SPEC.max_words, audio_segments=SPEC.audio_segments,
                      top_patches=2, heads=4, ffn_dim=64, levels=levels)
    model = VarCMP(cfg)
    with torch.no_grad():  # leave the zero init: weights are not uniform, A is not 0.5
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_planted_cache(tmp_path_factory.mktemp("c") / "planted.zarr", {"train": 20, "test": 16}, fail=2)


@pytest.fixture(scope="module")
def ckpt(cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    checkpoint.save(path, planted_model(), {"cache": checkpoint.cache_fingerprint(open_cache(cache))})
    return path


@pytest.mark.parametrize("query", ["text", "audio"])
def test_blocked_equals_unblocked(cache, query):
    model = planted_model(query)
    data = load_eval_data(open_cache(cache).split("test"), query)
    v = encode_videos(model, data.videos, "cpu", batch=5)
    q = encode_queries(model, data.query_feats, "cpu", batch=3)
    assert len(v) == 14 and len(q) == 14
    full = score_matrix(model, v, q, chunk=10_000)
    with torch.inference_mode():
        direct = {k: s.numpy() for k, s in model.similarity(v, q).items()}
    for chunk in (1, 3, 5):
        blocked = score_matrix(model, v, q, chunk=chunk)
        assert blocked.keys() == full.keys() == {"coarse", "fine", "finer", "total"}
        for k in full:
            assert np.allclose(blocked[k], full[k], rtol=0, atol=1e-6)
            assert np.allclose(direct[k], full[k], rtol=0, atol=1e-6)
        assert len(np.unique(full["total"])) == full["total"].size  # tie-free, so ranks must agree exactly
        assert np.array_equal(query_to_video_ranks(blocked["total"], data.query_video),
                              query_to_video_ranks(full["total"], data.query_video))
        assert np.array_equal(video_to_query_ranks(blocked["total"], data.query_video)[0],
                              video_to_query_ranks(full["total"], data.query_video)[0])
    if query == "text":  # the planted captions have 3..6 words: blocks of short queries are trimmed
        lengths = data.query_feats["word_mask"].sum(1)
        assert lengths.min() < lengths.max() == SPEC.max_words


def test_zero_shot_is_the_frozen_clip_baseline(cache):
    model = zero_shot_model(open_cache(cache).spec, "text")
    data = load_eval_data(open_cache(cache).split("test"), "text")
    v = encode_videos(model, data.videos, "cpu")
    q = encode_queries(model, data.query_feats, "cpu")
    assert not bool(v.anomalous.any())   # A = 0.5 everywhere: no video predicted anomalous
    s = score_matrix(model, v, q, levels=("coarse",), chunk=4)["coarse"]
    f = data.videos.frame_feat.astype(np.float64)
    m = data.videos.frame_mask
    mean = (f * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    sent = data.query_feats["sentence"].astype(np.float64)
    ref = (mean / np.linalg.norm(mean, axis=1, keepdims=True)) @ (sent / np.linalg.norm(sent, axis=1, keepdims=True)).T
    assert np.allclose(s, ref, atol=1e-5)


# ----------------------------------------------------------------------------- the command

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def table_rows(output):
    """{direction: [cells after the direction]} from the rich table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and "->" in cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_cli_checkpoint_table_and_json_agree(cache, ckpt, tmp_path):
    out = tmp_path / "res" / "r.json"
    out.parent.mkdir()  # an output file's folder must exist (tests/test_bad_input_paths.py)
    metrics = "r1,r5,r10,r50,mdr,mnr"
    r = run(cache, "--checkpoint", ckpt.parent, "--split", "test", "--metrics", metrics, "--json", out, "--chunk", 4)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(ckpt) and res["zero_shot"] is False and res["query"] == "text"
    assert res["levels"] == ["coarse", "fine", "finer"] and res["anomaly_weighting"] is True
    assert res["post"] is None and res["raw_similarities"] is True
    assert res["counts"] == {"videos": 14, "queries": 14, "videos_without_query": 0, "videos_with_several_queries": 0,
                             "dropped_queries": 2, "predicted_anomalous": res["counts"]["predicted_anomalous"]}
    rows = table_rows(r.output)
    assert set(rows) == {"text->video", "video->text"}
    for key, direction in (("t2v", "text->video"), ("v2t", "video->text")):
        m = res["metrics"][key]
        assert m["direction"] == direction and m["ranked"] == 14
        assert rows[direction] == [str(m["ranked"])] + [format_metric(k, m[k]) for k in metrics.split(",")]
    header = [metric_label(k) for k in metrics.split(",")]
    assert all(h in r.output for h in header)
    assert "14 videos" in r.output and "14 text queries" in r.output and str(ckpt) in r.output
    assert "post-processing: none (raw similarities)" in r.output

    # the numbers are the model's own ranking of the cache, recomputed here step by step
    model, _ = checkpoint.load(ckpt)
    data = load_eval_data(open_cache(cache).split("test"), "text")
    sim = score_matrix(model, encode_videos(model, data.videos, "cpu"), encode_queries(model, data.query_feats, "cpu"))
    ref = retrieval_metrics(sim["total"], data.query_video, metrics.split(","))
    assert {k: res["metrics"]["t2v"][k] for k in ref["q2v"]} == pytest.approx(ref["q2v"])
    assert {k: res["metrics"]["v2t"][k] for k in ref["v2q"]} == pytest.approx(ref["v2q"])

    # the same command twice: the same output, the same JSON
    out2 = tmp_path / "r2.json"
    r2 = run(cache, "--checkpoint", ckpt.parent, "--split", "test", "--metrics", metrics, "--json", out2, "--chunk", 4)
    assert r2.output == r.output and out2.read_text() == out.read_text()
    # another block size gives the same ranks
    r3 = run(cache, "--checkpoint", ckpt, "--metrics", metrics, "--chunk", 64)
    assert table_rows(r3.output) == rows


def test_cli_default_metrics_and_ablation_overrides(cache, ckpt, tmp_path):
    out = tmp_path / "a.json"
    r = run(cache, "--checkpoint", ckpt, "--levels", "coarse", "--no-anomaly-weighting", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["levels"] == ["coarse"] and res["anomaly_weighting"] is False
    assert res["metric_names"] == list(DEFAULT_METRICS) and res["chunk"] == DEFAULT_CHUNK and res["device"] == "cpu"
    assert "levels coarse " in r.output and "anomaly weighting off" in r.output
    model, _ = checkpoint.load(ckpt)  # the same weights, the ablation's levels and weighting as arguments
    data = load_eval_data(open_cache(cache).split("test"), "text", patches=False)
    v = encode_videos(model, data.videos, "cpu", patches=False, anomaly_weighting=False)
    sim = score_matrix(model, v, encode_queries(model, data.query_feats, "cpu"), levels=("coarse",))
    assert set(sim) == {"coarse", "total"}
    ref = retrieval_metrics(sim["total"], data.query_video, DEFAULT_METRICS)
    assert {k: res["metrics"]["t2v"][k] for k in DEFAULT_METRICS} == pytest.approx(ref["q2v"])


def test_cli_zero_shot_text_and_audio(cache, tmp_path):
    out = tmp_path / "z.json"
    r = run(cache, "--zero-shot", "--json", out)
    assert r.exit_code == 0, r.output
    raw = json.loads(out.read_text())
    assert raw["zero_shot"] is True and raw["checkpoint"] is None and raw["counts"]["predicted_anomalous"] == 0
    assert "zero-shot" in r.output and "raw similarities" in r.output
    ra = run(cache, "--zero-shot", "--query", "audio", "--json", out)
    assert ra.exit_code == 0, ra.output
    res = json.loads(out.read_text())
    assert res["query"] == "audio" and set(res["metrics"]) == {"a2v", "v2a"}
    assert res["counts"]["queries"] == 14 and "audio->video" in ra.output and "video->audio" in ra.output


@pytest.mark.parametrize("post, label", [("dsl", "DSL"), ("sinkhorn", "Sinkhorn")])
def test_cli_post_processing_is_labelled(cache, tmp_path, post, label):
    out = tmp_path / "p.json"
    rp = run(cache, "--zero-shot", "--post", post, "--json", out)
    assert rp.exit_code == 0, rp.output
    res = json.loads(out.read_text())
    assert res["post"] == post and res["raw_similarities"] is False
    assert f"post-processing: {label}" in rp.output and "(not raw similarities)" in rp.output
    assert "post-processing: none" not in rp.output


def test_cli_querybank_normalisation_uses_the_training_queries(cache, ckpt, tmp_path):
    out = tmp_path / "qb.json"
    r = run(cache, "--checkpoint", ckpt, "--post", "qb", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["post"] == "qb" and res["raw_similarities"] is False and "post-processing: QB-Norm" in r.output
    assert res["query_bank"] == {"split": "train", "queries": 18}  # 20 training videos, 2 failed: 18 captions
    raw = evaluate_split(cache, checkpoint=ckpt, bootstrap=0)
    assert res["metrics"]["v2t"]["r1"] == raw["metrics"]["v2t"]["r1"]  # video->text is not changed
    # by hand: each test video's score minus its log-sum-exp over the training captions, at the logit scale
    model = checkpoint.load(ckpt)[0].eval()
    c = open_cache(cache)
    test, train = load_eval_data(c.split("test"), "text"), load_eval_data(c.split("train"), "text")
    torch.manual_seed(0)
    v = encode_videos(model, test.videos, "cpu")
    s = score_matrix(model, v, encode_queries(model, test.query_feats, "cpu"))["total"].astype(np.float64)
    b = score_matrix(model, v, encode_queries(model, train.query_feats, "cpu"))["total"].astype(np.float64)
    hub = np.log(np.exp(100 * b).sum(1, keepdims=True)) / 100
    ranks = query_to_video_ranks(s - hub, test.query_video)
    assert res["metrics"]["t2v"]["r1"] == pytest.approx(100 * np.mean(ranks == 1))
    for bad, says in ((("--bank-split", "test"), "another split"), (("--bank-split", "val"), "no split 'val'")):
        e = run(cache, "--checkpoint", ckpt, "--post", "qb", *bad)
        assert e.exit_code == 2 and says in e.output and "Traceback" not in e.output


def test_cli_reports_captions_of_failed_videos(cache, tmp_path):
    out = tmp_path / "d.json"
    r = run(cache, "--zero-shot", "--json", out)
    res = json.loads(out.read_text())
    assert res["counts"]["dropped_queries"] == 2 and len(res["dropped"]) == 2
    assert all("was not extracted" in d for d in res["dropped"])
    assert "2 queries dropped" in r.output and "Abuse/test_0015.mp4" in r.output


def test_python_m_runs(cache):
    p = subprocess.run([sys.executable, "-m", "varcmp.evaluate", str(cache), "--zero-shot", "--levels", "coarse"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "text->video" in p.stdout and "video->text" in p.stdout


def test_checkpoint_of_other_encoders_or_dims_is_refused(cache, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(cache, other)
    root = json.loads((other / "zarr.json").read_text())
    root["attributes"]["varcmp"]["encoders"]["clip"]["weights_hash"] = "sha256:retrained"
    (other / "zarr.json").write_text(json.dumps(root))
    fp = checkpoint.cache_fingerprint(open_cache(other))
    assert fp["encoders"] != checkpoint.cache_fingerprint(open_cache(cache))["encoders"]
    path = checkpoint.save(tmp_path / "other.safetensors", planted_model(), {"cache": fp})
    one_line_error(run(cache, "--checkpoint", path), "other encoders")
    fp = checkpoint.cache_fingerprint(open_cache(cache))
    fp["spec"] = {**fp["spec"], "dim": 64}
    path = checkpoint.save(tmp_path / "dims.safetensors", planted_model(), {"cache": fp})
    one_line_error(run(cache, "--checkpoint", path), "dim=64")


@pytest.mark.parametrize("args, needle", [
    (lambda c, k, t: (c, "--checkpoint", k, "--split", "val"), "no split 'val'"),
    (lambda c, k, t: (c, "--checkpoint", t / "nope"), "no such checkpoint"),
    (lambda c, k, t: (c, "--checkpoint", k, "--metrics", "r1,map"), "'map'"),
    (lambda c, k, t: (c, "--checkpoint", k, "--metrics", "r0"), "'r0'"),
    (lambda c, k, t: (c, "--checkpoint", k, "--levels", "coarse,best"), "unknown level"),
    (lambda c, k, t: (c, "--checkpoint", k, "--query", "audio"), "trained for text"),
    (lambda c, k, t: (c, "--checkpoint", k, "--chunk", 0), "--chunk"),
    (lambda c, k, t: (c, "--checkpoint", k, "--zero-shot"), "--zero-shot"),
    (lambda c, k, t: (c,), "--checkpoint"),
    (lambda c, k, t: (t / "missing.zarr", "--zero-shot"), "no such cache"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_user_errors_are_one_line(cache, ckpt, tmp_path, args, needle):
    """args(cache, checkpoint, tmp_path): the command line; needle: in its one error line."""
    one_line_error(run(*args(cache, ckpt, tmp_path)), needle)


def test_audio_checkpoint_of_fewer_segments_than_the_cache_is_refused(cache, tmp_path):
    """The one segment check serves varcmp-eval and search alike."""
    from varcmp.retrieval.search import Searcher

    with open_cache(cache) as c:
        model = zero_shot_model(dataclasses.replace(c.spec, audio_segments=SPEC.audio_segments - 1), "audio")
        path = checkpoint.save(tmp_path / "short.safetensors", model, {"cache": checkpoint.cache_fingerprint(c)})
    needle = f"trained with {SPEC.audio_segments - 1} audio segments, but {cache} has {SPEC.audio_segments}"
    one_line_error(run(cache, "--checkpoint", path), needle)
    with Searcher(cache, path, device="cpu", progress=False) as s:
        with pytest.raises(UserError, match=re.escape(needle)):
            s.audio_features([tmp_path / "never-read.wav"])


def test_query_kinds_name_the_models_inputs():
    for kind in QUERY_KINDS.values():
        model = planted_model(kind.name)
        assert model.kind is kind and kind.name in QUERIES
        n, L = 3, SPEC.max_words if kind is TEXT else SPEC.audio_segments
        dim = SPEC.dim if kind is TEXT else SPEC.audio_dim
        feats = {"word_feat": torch.randn(n, L, dim), "sentence": torch.randn(n, dim),
                 "seg_feat": torch.randn(n, L, dim), "word_mask": torch.ones(n, L, dtype=torch.bool),
                 "seg_mask": torch.ones(n, L, dtype=torch.bool)}
        with torch.no_grad():
            q = model.encode_queries({k: feats[k] for k in kind.features})
            ref = getattr(model, kind.encode)(*(feats[k] for k in kind.features))
        assert torch.equal(q.glob, ref.glob) and torch.equal(q.token_weights, ref.token_weights)
    assert set(QUERY_KINDS) == set(QUERIES) and (TEXT.fine_on_glob, AUDIO.fine_on_glob) == (True, False)
    with pytest.raises(ValueError, match="'text' or 'audio', got 'video'"):
        query_kind("video")
    with pytest.raises(ValueError, match="'text' or 'audio'"):
        load_eval_data(None, "video")


def test_queries_the_cache_lacks_are_one_line(cache, tmp_path):
    # a split without captions, queried with text; a cache without audio, queried with audio
    w = CacheWriter(cache, SPEC, ENCODERS, {"planted": True, "seed": 0})
    sw = w.split("nocap", [VideoEntry("Abuse/x.mp4")])
    n, p, c, a = SPEC.num_frames, SPEC.num_patches, SPEC.dim, SPEC.audio_segments
    sw.write_video(0, VideoFeatures(10.0, 25.0, np.zeros(n, np.float32), np.ones(n, bool), np.ones((n, c)),
                                    np.ones((n, p, c)), np.ones((a, c)), np.ones(a, bool),
                                    np.zeros((a, 2), np.float32)))
    w.finish()
    one_line_error(run(cache, "--zero-shot", "--split", "nocap", "--query", "text"), "no captions")
    silent = write_planted_cache(tmp_path / "silent.zarr", {"test": 4},
                                 spec=dataclasses.replace(SPEC, audio_segments=0))
    one_line_error(run(silent, "--zero-shot", "--query", "audio"), "no audio")


def test_damaged_features_are_named_not_scored(cache, ckpt, tmp_path):
    """A NaN in one video's frame features, or a chunk that no longer decompresses: one line naming
    the video, exit code 2; never NaN scores in a table."""
    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache, bad)
    with open_cache(bad) as c:
        s = c.split("test")
        row = int(s.done_index()[3])
        path = s.paths[row]
    zarr.open_group(str(bad), mode="r+", use_consolidated=False)["test/videos/frame_feat"][row, 1, 2] = np.nan
    one_line_error(run(bad, "--checkpoint", ckpt, "--split", "test"),
                   f"video {path} (row {row} of split 'test')", "videos/frame_feat holds NaN or infinite values")
    shutil.rmtree(bad)
    shutil.copytree(cache, bad)
    chunk = bad / "test" / "videos" / "patch_feat" / "c" / str(row) / "0" / "0" / "0"
    chunk.write_bytes(np.random.default_rng(0).integers(0, 256, chunk.stat().st_size, dtype=np.uint8).tobytes())
    one_line_error(run(bad, "--checkpoint", ckpt, "--split", "test"), f"video {path} ", "cannot be read")


# ----------------------------------------------------------------------------- bootstrap intervals

def _binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q, summed by hand."""
    from math import comb

    total = 0.0
    for k in range(n + 1):
        total += comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


@pytest.mark.parametrize("n, hits", [(40, 12), (80, 45), (200, 20)])
def test_bootstrap_interval_of_recall_is_the_binomial_one(n, hits):
    # resampling n queries of which `hits` have rank 1: R@1 of a resample is 100 * Binomial(n, hits/n) / n,
    # so the percentile interval lies within a step (100/n) of that distribution's quantiles
    ranks = np.array([1] * hits + [7] * (n - hits))
    lo, hi = bootstrap_intervals(ranks, ("r1",), resamples=4000, seed=3)["r1"]
    step = 100.0 / n
    assert abs(lo - step * _binomial_quantile(n, hits / n, 0.025)) <= step + 1e-9
    assert abs(hi - step * _binomial_quantile(n, hits / n, 0.975)) <= step + 1e-9


def test_bootstrap_intervals_cover_the_true_value():
    # 300 test sets of 100 queries drawn from a known rank distribution: the 95 % intervals of R@1, R@5
    # and the mean rank hold the population value in about 95 % of them (seeded: the same every run)
    rng = np.random.default_rng(11)
    p = np.array([0.3, 0.15, 0.1, 0.05, 0.05] + [0.35 / 15] * 15)  # P(rank = 1..20)
    truth = {"r1": 30.0, "r5": 65.0, "mnr": float((np.arange(1, 21) * p).sum())}
    covered = {m: 0 for m in truth}
    for i in range(300):
        ranks = rng.choice(np.arange(1, 21), size=100, p=p)
        iv = bootstrap_intervals(ranks, tuple(truth), resamples=400, seed=i)
        for m, (lo, hi) in iv.items():
            covered[m] += lo <= truth[m] <= hi
    for m, c in covered.items():
        assert 0.89 <= c / 300 <= 0.99, (m, c)


def test_bootstrap_is_seeded_and_degenerate_cases_are_exact():
    ranks = np.random.default_rng(0).integers(1, 30, 150)
    assert bootstrap_intervals(ranks, ALL, seed=5) == bootstrap_intervals(ranks, ALL, seed=5)
    assert bootstrap_intervals(ranks, ("r5",), seed=5) != bootstrap_intervals(ranks, ("r5",), seed=6)
    assert bootstrap_intervals(np.ones(30), ("r1", "mdr", "mnr")) == {"r1": [100.0, 100.0], "mdr": [1.0, 1.0],
                                                                      "mnr": [1.0, 1.0]}
    assert all(np.isnan(v).all() for v in bootstrap_intervals(np.zeros(0), ("r1",)).values())


def test_paired_difference():
    ranks = np.random.default_rng(1).integers(1, 30, 120)
    same = paired_difference(ranks, ranks, ALL)
    assert all(d == {"difference": 0.0, "interval": [0.0, 0.0]} for d in same.values())  # a model against itself
    better = np.maximum(ranks - 3, 1)  # every query ranked 3 places higher (or first)
    d = paired_difference(better, ranks, ("r1", "mnr"))
    assert d["r1"]["difference"] == pytest.approx(summarize(better, ("r1",))["r1"] - summarize(ranks, ("r1",))["r1"])
    assert d["r1"]["interval"][0] > 0 and d["mnr"]["interval"][1] < 0
    # pairing matters: every resample of a constant shift differs by exactly that shift
    shift = paired_difference(ranks + 2, ranks, ("mnr",))["mnr"]
    assert shift["difference"] == pytest.approx(2.0) and shift["interval"] == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError, match="same units"):
        paired_difference(ranks, ranks[:-1])


def test_several_runs_pool_by_their_mean_over_the_same_resampled_units():
    rng = np.random.default_rng(2)
    n = 60
    a = rng.integers(1, 12, size=(3, n))  # three seeds of one setting, ranking the same 60 queries
    b = np.maximum(a[:2] + rng.integers(-2, 4, size=(2, n)), 1)  # two seeds of another
    # one run, whether [n] or [1, n], or several copies of it: the single run's numbers, exactly
    one = paired_difference(a[0], b[0], ALL, 300, 5)
    assert paired_difference(a[:1], b[:1], ALL, 300, 5) == one
    copies = paired_difference(np.stack([a[0]] * 3), np.stack([b[0]] * 2), ALL, 300, 5)
    assert all([copies[m]["difference"], *copies[m]["interval"]] ==
               pytest.approx([one[m]["difference"], *one[m]["interval"]]) for m in ALL)
    four, single = bootstrap_intervals(np.stack([a[0]] * 4), ALL, 300, 5), bootstrap_intervals(a[0], ALL, 300, 5)
    assert all(four[m] == pytest.approx(single[m]) for m in ALL)
    assert pooled_summary(a[1], ALL) == summarize(a[1], ALL)
    # the pooled value is the mean of the runs' values
    assert pooled_summary(a, ("r1", "mdr")) == pytest.approx(
        {m: np.mean([summarize(r, (m,))[m] for r in a]) for m in ("r1", "mdr")})
    # a plain loop over the same draws: each resample draws the same queries for every run of both sides
    draws = np.random.default_rng(9).integers(0, n, size=(400, n))
    def r1(runs, idx):
        return np.mean([100 * np.mean([r[i] <= 1 for i in idx]) for r in runs])
    def mdr(runs, idx):
        return np.mean([np.median([r[i] for i in idx]) for r in runs])
    got = paired_difference(a, b, ("r1", "mdr"), 400, 9)
    for m, f in (("r1", r1), ("mdr", mdr)):
        plain = [f(a.tolist(), idx) - f(b.tolist(), idx) for idx in draws]
        assert got[m]["interval"] == pytest.approx(np.quantile(plain, [0.025, 0.975]).tolist())
        assert got[m]["difference"] == pytest.approx(f(a.tolist(), range(n)) - f(b.tolist(), range(n)))
    single = bootstrap_intervals(a, ("r1",), 400, 9)["r1"]
    assert single == pytest.approx(np.quantile([r1(a.tolist(), idx) for idx in draws], [0.025, 0.975]).tolist())
    # pooling seeds narrows the interval of a noisy difference: seed noise averages out, the queries stay
    noisy_a = np.where(rng.random((8, n)) < 0.6, 1, 5)  # R@1 60 % per seed, the hits drawn anew each seed
    noisy_b = np.where(rng.random((8, n)) < 0.5, 1, 5)
    width = [np.diff(paired_difference(noisy_a[:s], noisy_b[:s], ("r1",), 500, 0)["r1"]["interval"])[0]
             for s in (1, 8)]
    assert width[1] < 0.6 * width[0]
    with pytest.raises(ValueError, match="same units"):
        paired_difference(a, b[:, :-1])
    with pytest.raises(ValueError, match="runs, units"):
        bootstrap_intervals(a[None])


def test_r1_units_count_each_videos_hits_by_hand():
    # 3 videos; video 0 has two captions (q0, q1), video 2 one (q3), video 1 one (q2)
    sim = np.array([[0.9, 0.2, 0.1, 0.3],
                    [0.1, 0.8, 0.7, 0.0],
                    [0.0, 0.1, 0.2, 0.6]])
    qv = np.array([0, 0, 1, 2])
    # q2v: q0 first (0.9), q1 not (video 1 scores 0.8 > 0.2), q2 first (0.7), q3 first (0.6 > 0.3)
    # v2q: video 0's best own query q0 (0.9) tops its row; video 1's q2 (0.7) is below q1 (0.8); video 2's q3 tops
    assert r1_units(sim, qv).tolist() == [[1, 2, 1], [1, 1, 0], [1, 1, 1]]
    units = np.array(r1_units(sim, qv))
    m = retrieval_metrics(sim, qv, ("r1",))
    assert 50 * (units[:, 0].sum() / units[:, 1].sum() + units[:, 2].mean()) == pytest.approx(
        0.5 * (m["q2v"]["r1"] + m["v2q"]["r1"]))


def test_mean_r1_gain_is_a_paired_bootstrap_over_videos():
    rng = np.random.default_rng(3)
    n = 80
    base = np.stack([rng.integers(0, 2, n), np.ones(n, int), rng.integers(0, 2, n)], 1)
    assert mean_r1_gain(base, base) == (0.0, 0.0)  # a model against itself: no gain, and it does not hold
    one = base.copy()
    one[np.flatnonzero(base[:, 0] == 0)[0], 0] = 1  # one more query ranked first of 80: 1.25 / 2 points
    gain, lower = mean_r1_gain(one, base)
    assert gain == pytest.approx(1.25 / 2) and lower <= 0
    many = base.copy()
    many[np.flatnonzero(base[:, 0] == 0)[:20], 0] = 1  # 20 more in each direction: +25 points
    many[np.flatnonzero(base[:, 2] == 0)[:20], 2] = 1
    gain, lower = mean_r1_gain(many, base)
    assert gain == pytest.approx(25.0) and lower > 0
    # the same bound from a plain loop over the same draws (a video is drawn with its queries)
    qs = base.copy()
    qs[:, 1] = rng.integers(1, 4, n)
    qs[:, 0] = np.minimum(qs[:, 0] * qs[:, 1], rng.integers(0, 4, n))
    better = qs.copy()
    better[:, 0] = np.minimum(qs[:, 0] + 1, qs[:, 1])  # one more hit where a video had a miss
    draws = np.random.default_rng(7).integers(0, n, size=(500, n))
    plain = []
    for idx in draws:
        def score(u):
            return 50 * (sum(u[i][0] for i in idx) / sum(u[i][1] for i in idx) + sum(u[i][2] for i in idx) / n)
        plain.append(score(better.tolist()) - score(qs.tolist()))
    got = mean_r1_gain(better, qs, resamples=500, seed=7)
    assert got[1] == pytest.approx(float(np.quantile(plain, 0.05)))
    with pytest.raises(ValueError, match="same"):
        mean_r1_gain(base, base[:-1])


def test_cli_intervals_and_comparison(cache, ckpt, tmp_path):
    out = tmp_path / "b.json"
    r = run(cache, "--checkpoint", ckpt, "--metrics", "r1,r5,mdr", "--json", out, "--compare", ckpt, "--seed", 4)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["bootstrap"] == {"resamples": 1000, "seed": 4, "level": 0.95,
                                "units": "text queries (t2v), videos (v2t)"}
    data = load_eval_data(open_cache(cache).split("test"), "text")
    model, _ = checkpoint.load(ckpt)
    sim = score_matrix(model, encode_videos(model, data.videos, "cpu"), encode_queries(model, data.query_feats, "cpu"))
    q2v = query_to_video_ranks(sim["total"], data.query_video)
    assert res["metrics"]["t2v"]["interval"] == bootstrap_intervals(q2v, ("r1", "r5", "mdr"), 1000, 4)
    for key in ("t2v", "v2t"):
        m = res["metrics"][key]
        assert all(m["interval"][k][0] <= m[k] <= m["interval"][k][1] for k in ("r1", "r5", "mdr"))
        assert all(res["compare"]["metrics"][key][k] == {"difference": 0.0, "interval": [0.0, 0.0], "holds": False}
                   for k in ("r1", "r5", "mdr"))
    assert "95% bootstrap intervals" in r.output and "paired-bootstrap" in r.output
    # the anomaly head's video AUC with its interval, from the same seed and resamples
    a = res["anomaly"]
    v = encode_videos(model, data.videos, "cpu")
    assert a["video_auc_interval"] == auc_interval(v.video_score.numpy(), data.videos.labels, 1000, 4)
    assert a["video_auc_interval"][0] <= a["video_auc"] <= a["video_auc_interval"][1]
    lo, hi = a["video_auc_interval"]
    assert f"video-level AUC {a['video_auc']:.3f} (95% interval {lo:.3f}-{hi:.3f}" in " ".join(r.output.split())
    plain = run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--json", out)
    assert plain.exit_code == 0 and "bootstrap intervals" not in plain.output
    assert "interval" not in json.loads(out.read_text())["metrics"]["t2v"]
    one_line_error(run(cache, "--checkpoint", ckpt, "--bootstrap", -1), "--bootstrap")
    one_line_error(run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--compare", ckpt), "--compare")


def test_cli_pools_several_runs_of_a_setting(cache, ckpt, tmp_path):
    other = tmp_path / "seed1.safetensors"  # a second "seed" of the same setting
    checkpoint.save(other, planted_model(seed=1), {"cache": checkpoint.cache_fingerprint(open_cache(cache))})
    alone = [evaluate_split(cache, checkpoint=k, metrics="r1,mdr", keep_ranks=True, bootstrap=0) for k in (ckpt, other)]
    zs = evaluate_split(cache, zero_shot=True, metrics="r1,mdr", keep_ranks=True, bootstrap=0)
    out = tmp_path / "pooled.json"
    r = run(cache, "--checkpoint", ckpt, "--checkpoint", other, "--metrics", "r1,mdr", "--seed", 3,
            "--compare", other, "--compare", ckpt, "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["checkpoint"] == [str(ckpt), str(other)] and res["anomaly"] is None
    assert res["counts"]["predicted_anomalous"] is None and res["bootstrap"]["units"].endswith("the 2 runs held fixed")
    for key in ("t2v", "v2t"):
        both = np.array([a["ranks"][key] for a in alone])
        m = res["metrics"][key]
        assert {k: m[k] for k in ("r1", "mdr")} == pytest.approx(
            {k: (alone[0]["metrics"][key][k] + alone[1]["metrics"][key][k]) / 2 for k in ("r1", "mdr")})
        assert m["interval"] == bootstrap_intervals(both, ("r1", "mdr"), 1000, 3)
        for i in range(2):  # each run on its own, as evaluated alone
            assert res["runs"][i]["metrics"][key] == {k: alone[i]["metrics"][key][k] for k in ("r1", "mdr")}
            assert res["runs"][i]["anomaly"]["video_auc"] == alone[i]["anomaly"]["video_auc"]
        # the same two runs in the other order: a difference of exactly 0 in every resample
        assert res["compare"]["metrics"][key]["r1"] == {"difference": 0.0, "interval": [0.0, 0.0], "holds": False}
    assert res["compare"]["checkpoint"] == [str(other), str(ckpt)]
    text = " ".join(r.output.split())
    assert "2 runs pooled (their mean)" in text and "mean over the 2 runs" in text and "the 2 runs held fixed" in text
    assert f"run 1: {ckpt} | text->video R@1" in text and f"run 2: {other}" in text
    assert text.count("anomaly head: video-level AUC") == 2
    # against zero-shot: the paired difference of the runs' mean over the same resampled queries
    r = run(cache, "--checkpoint", ckpt, "--checkpoint", other, "--metrics", "r1,mdr", "--compare-zero-shot",
            "--json", out)
    assert r.exit_code == 0, r.output
    cmp = json.loads(out.read_text())["compare"]
    assert cmp["checkpoint"] == "zero-shot (untrained heads)"
    both = np.array([a["ranks"]["t2v"] for a in alone])
    want = paired_difference(both, np.array(zs["ranks"]["t2v"]), ("r1", "mdr"), 1000, 0)
    assert {k: {"difference": v["difference"], "interval": v["interval"]} for k, v in cmp["metrics"]["t2v"].items()
            if k != "direction"} == {k: {"difference": d["difference"], "interval": d["interval"]} for k, d in want.items()}
    # runs of different settings are not pooled, unless --levels evaluates them alike
    coarse = tmp_path / "coarse.safetensors"
    checkpoint.save(coarse, planted_model(levels=("coarse",)), {"cache": checkpoint.cache_fingerprint(open_cache(cache))})
    one_line_error(run(cache, "--checkpoint", ckpt, "--checkpoint", coarse), "pooled together")
    one_line_error(run(cache, "--checkpoint", ckpt, "--compare", ckpt, "--compare", coarse), "pooled together")
    audio = tmp_path / "audio.safetensors"
    checkpoint.save(audio, planted_model("audio"), {"cache": checkpoint.cache_fingerprint(open_cache(cache))})
    one_line_error(run(cache, "--checkpoint", ckpt, "--checkpoint", audio), "trained for audio queries", "pooled together")
    assert run(cache, "--checkpoint", ckpt, "--checkpoint", coarse, "--levels", "coarse").exit_code == 0


# ----------------------------------------------------------------------------- the anomaly head's AUC

@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_is_the_pairwise_probability(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    labels = rng.random(40) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[labels] for n in scores[~labels]]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_auc_interval_resamples_each_class_within_itself(seed):
    """The same draws as a plain loop: per resample, the anomalous videos drawn with replacement among
    themselves, then the normal ones; the AUC of each resample by counting pairs; the 2.5 and 97.5
    percentiles."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, 30) / 7.0  # ties
    labels = rng.random(30) < 0.3
    got = auc_interval(scores, labels, resamples=200, seed=seed + 10)
    draw = np.random.default_rng(seed + 10)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    values = []
    for _ in range(200):
        p, n = scores[draw.choice(pos, len(pos))], scores[draw.choice(neg, len(neg))]
        values.append(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n]))
    assert got == pytest.approx(list(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    assert got == auc_interval(scores, labels, resamples=200, seed=seed + 10)  # seeded
    assert auc_interval(scores, np.ones(30), 100) is None and auc_interval(scores, np.zeros(30), 100) is None


def test_auc_intervals_cover_the_true_value():
    # 150 splits of 40 anomalous and 40 normal videos, scores N(1, 1) and N(0, 1): AUC = P(X > Y) =
    # Phi(1 / sqrt(2)) = 0.7602; the 95 % intervals hold it in about 95 % of the splits (seeded)
    truth = 0.5 * (1 + math.erf(0.5))
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(150):
        scores = np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 40)]
        lo, hi = auc_interval(scores, np.r_[np.ones(40), np.zeros(40)], resamples=200, seed=i)
        covered += lo <= truth <= hi
    assert 0.88 <= covered / 150 <= 0.99, covered


def test_roc_auc_by_hand_and_one_class():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert roc_auc([0.2, 0.9], [1, 1]) is None and roc_auc([], []) is None


def test_cli_reports_the_video_level_auc(cache, ckpt, tmp_path):
    out = tmp_path / "a.json"
    r = run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--json", out)
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())["anomaly"]
    data = load_eval_data(open_cache(cache).split("test"), "text")
    model, _ = checkpoint.load(ckpt)
    v = encode_videos(model, data.videos, "cpu")
    labels = np.asarray(data.videos.labels)
    assert a == {"video_auc": pytest.approx(roc_auc(v.video_score.numpy(), labels)), "anomalous": int(labels.sum()),
                 "normal": int((labels == 0).sum()), "predicted_anomalous": int(v.anomalous.sum()),
                 "frame_auc": None, "frame_labels": {"source": None, "videos": 0, "frames": 0}}  # none stored
    assert 0 < a["normal"] and 0 < a["anomalous"] and f"video-level AUC {a['video_auc']:.3f}" in r.output


def test_cli_compare_with_zero_shot(cache, ckpt, tmp_path):
    out = tmp_path / "z.json"
    r = run(cache, "--checkpoint", ckpt, "--metrics", "r1,mnr", "--json", out, "--compare-zero-shot")
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    zs = evaluate_split(cache, zero_shot=True, query="text", metrics="r1,mnr", keep_ranks=True)
    mine = evaluate_split(cache, checkpoint=ckpt, metrics="r1,mnr", keep_ranks=True)
    assert res["compare"]["zero_shot"] and res["compare"]["levels"] == list(zs["levels"])
    for key in ("t2v", "v2t"):
        # the ranks kept are the ones the metrics summarise
        assert summarize(mine["ranks"][key], ("r1", "mnr")) == {m: mine["metrics"][key][m] for m in ("r1", "mnr")}
        want = paired_difference(mine["ranks"][key], zs["ranks"][key], ("r1", "mnr"))
        for m in ("r1", "mnr"):
            d = res["compare"]["metrics"][key][m]
            assert d["difference"] == pytest.approx(mine["metrics"][key][m] - zs["metrics"][key][m])
            assert {**d, "holds": None} == {**want[m], "holds": None}
            assert d["holds"] == (d["interval"][0] > 0 or d["interval"][1] < 0)
    assert "zero-shot" in r.output and "paired-bootstrap" in r.output
    # zero-shot against itself: exactly no difference
    same = evaluate_split(cache, zero_shot=True, query="text", metrics="r1", compare_zero_shot=True)
    assert all(d["r1"] == {"difference": 0.0, "interval": [0.0, 0.0], "holds": False}
               for d in same["compare"]["metrics"].values())
    one_line_error(run(cache, "--checkpoint", ckpt, "--compare", ckpt, "--compare-zero-shot"), "--compare-zero-shot")
    one_line_error(run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--compare-zero-shot"), "--compare-zero-shot")


# ----------------------------------------------------------------------------- frame-level AUC

def test_frame_auc_by_hand():
    scores = np.array([[0.9, 0.2, 0.7, 0.3], [0.4, 0.3, 0.1, 0.6]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    labels = np.array([[1, 0, -1, 1], [0, 1, 0, -1]])  # -1: unknown; (0, 3) is padding
    # known valid frames: positives 0.9, 0.3; negatives 0.2, 0.4, 0.1: 0.9 beats all three, 0.3 two of them
    assert frame_auc(scores, mask, labels) == {"auc": pytest.approx(5 / 6), "videos": 2, "frames": 5}
    assert frame_auc(scores, mask, None) == {"auc": None, "videos": 0, "frames": 0}
    assert frame_auc(scores, mask, np.full((2, 4), -1))["auc"] is None


def test_temporal_annotations_become_labels_of_the_sampled_frames(tmp_path):
    f = tmp_path / "Temporal_Anomaly_Annotation.txt"
    f.write_text("Abuse028_x264.mp4  Abuse  165  240  -1  -1\n\nArrest001_x264.mp4  Arrest  10  20  100  130\n"
                 "Normal_Videos_003_x264.mp4  Normal  -1  -1  -1  -1\n")
    spans = read_temporal_annotations(f)
    assert spans == {"Abuse028_x264.mp4": [(165, 240)], "Arrest001_x264.mp4": [(10, 20), (100, 130)],
                     "Normal_Videos_003_x264.mp4": []}
    paths = ["Abuse/Abuse028_x264.mp4", "Arrest/Arrest001_x264.mp4", "Normal_Videos_event/Normal_Videos_003_x264.mp4",
             "Burglary/Burglary005_x264.mp4"]
    t = np.array([[5.0, 6.6, 8.0, 9.0]] * 2 + [[1.0, 2.0, 3.0, 4.0]] * 2)
    fps = np.array([30.0, 10.0, 30.0, 30.0])
    # frame numbers floor(t x fps): 150, 198, 240, 270 | 50, 66, 80, 90 | 30, 60, 90, 120 | not listed
    np.testing.assert_array_equal(annotation_frame_labels(spans, paths, t, fps),
                                  [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [-1, -1, -1, -1]])
    t[1] = [1.5, 2.0, 10.0, 13.0]  # frames 15, 20, 100, 130: ends included
    np.testing.assert_array_equal(annotation_frame_labels(spans, paths, t, fps)[1], [1, 1, 1, 1])
    for bad, why in (("a.mp4 Abuse 1 2 -1\n", "5 fields"), ("a.mp4 Abuse 1 x -1 -1\n", "integer"),
                     ("a.mp4 Abuse 9 2 -1 -1\n", "ends before it starts")):
        f.write_text("ok.mp4 Normal -1 -1 -1 -1\n" + bad)
        with pytest.raises(UserError, match=f"{f}: line 2: .*{why}"):
            read_temporal_annotations(f)


def test_cli_frame_auc_from_temporal_annotations(cache, ckpt, tmp_path):
    f = tmp_path / "Temporal_Anomaly_Annotation.txt"  # the planted test videos are 10 s at 25 fps, 8 frames
    f.write_text("test_0000.mp4 Abuse 46 109 200 210\ntest_0001.mp4 Normal -1 -1 -1 -1\n")
    out = tmp_path / "f.json"
    r = run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--json", out, "--temporal-annotations", f)
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())["anomaly"]
    data = load_eval_data(open_cache(cache).split("test"), "text")
    assert list(data.videos.paths[:2]) == ["Abuse/test_0000.mp4", "Normal_Videos/test_0001.mp4"]
    model, _ = checkpoint.load(ckpt)
    A = encode_videos(model, data.videos, "cpu").anomaly.numpy()
    # sampled frames at (i + 0.5) x 10 / 8 s: frame numbers 15, 46, 78, 109, 140, 171, 203, 234
    want = np.array([0, 1, 1, 1, 0, 0, 1, 0], bool)
    m0, m1 = data.videos.frame_mask[0], data.videos.frame_mask[1]
    scores = np.concatenate([A[0][m0], A[1][m1]])
    labels = np.concatenate([want[m0], np.zeros(m1.sum(), bool)])
    assert a["frame_labels"] == {"source": str(f), "videos": 2, "frames": int(m0.sum() + m1.sum())}
    assert a["frame_auc"] == pytest.approx(roc_auc(scores, labels))
    assert f"frame-level AUC {a['frame_auc']:.3f} over {int(m0.sum() + m1.sum())} sampled frames of 2 videos" in r.output
    # without the file: the planted cache stores no frame labels
    r = run(cache, "--checkpoint", ckpt, "--bootstrap", 0, "--json", out)
    assert json.loads(out.read_text())["anomaly"]["frame_labels"] == {"source": None, "videos": 0, "frames": 0}
    assert "frame-level" not in r.output
    f.write_text("test_0000.mp4 Abuse 46\n")
    one_line_error(run(cache, "--checkpoint", ckpt, "--temporal-annotations", f), "line 1", str(f))
    one_line_error(run(cache, "--checkpoint", ckpt, "--temporal-annotations", tmp_path / "none.txt"), "cannot read")
