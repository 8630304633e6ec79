"""Tests of varcmp.train (CPU, planted caches of small dims)."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_planted_cache
from helpers import cli, error_line, weights

import varcmp.train as T
import varcmp.training as TR
import varcmp.training.data as TD
import varcmp.training.loop as TL
import varcmp.training.state as TS
import varcmp.training.step as TP
from varcmp.model import checkpoint
from varcmp.cache.reader import Cache, open_cache, read_rows
from varcmp.cache_schema import CacheSpec, VideoEntry, VideoFeatures
from varcmp.cache.writer import CacheWriter
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
from varcmp.model import VarCMP

# a small head (the planted cache has dim 32) keeps every run at a fraction of a second
SMALL = dict(heads=2, ffn_dim=64, topk_samples=20)
SMALL_ARGS = ["--heads", "2", "--ffn-dim", "64", "--topk-samples", "20", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_cache(tmp_path_factory.mktemp("cache") / "planted.zarr", splits={"train": 96, "test": 16},
                               seed=0, fail=2)


@pytest.fixture(scope="module")
def other_encoders(planted, tmp_path_factory) -> Path:
    """The planted cache as if extracted with another CLIP: same dims, other encoder ids."""
    import zarr

    dst = tmp_path_factory.mktemp("other") / "other.zarr"
    shutil.copytree(planted, dst)
    root = zarr.open_group(str(dst), mode="r+", use_consolidated=False)
    meta = dict(root.attrs["varcmp"])
    meta["encoders"] = {**meta["encoders"], "clip": {"name": "another-clip", "config_hash": "sha256:9",
                                                      "weights_hash": "sha256:9"}}
    root.attrs["varcmp"] = meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(dst))
    assert open_cache(dst).encoders["clip"]["name"] == "another-clip"
    return dst


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A cache with neither captions nor audio."""
    spec = CacheSpec(num_frames=4, num_patches=6, dim=16, max_words=4, audio_segments=0)
    path = tmp_path_factory.mktemp("bare") / "bare.zarr"
    w = CacheWriter(path, spec, {"clip": {"name": "x", "config_hash": "0", "weights_hash": "0"}}, {})
    sw = w.split("train", [VideoEntry(f"v{i}.mp4", i % 2) for i in range(8)])
    rng = np.random.default_rng(0)
    for i in range(8):
        sw.write_video(i, VideoFeatures(duration=1.0, fps=4.0, frame_time=np.arange(4, dtype=np.float32),
                                        frame_mask=np.ones(4, bool), frame_feat=rng.standard_normal((4, 16)),
                                        patch_feat=rng.standard_normal((4, 6, 16))))
    w.finish()
    return path


def scores(model: VarCMP, cache: Path, split: str = "test") -> np.ndarray:
    from varcmp.retrieval.pairs import load_eval_data

    ev = load_eval_data(open_cache(cache).split(split), model.cfg.query)
    model.eval()
    v = encode_videos(model, ev.videos, "cpu")
    q = encode_queries(model, ev.query_feats, "cpu")
    return score_matrix(model, v, q)["total"]


# ----------------------------------------------------------------------------- learning


def guarded_best(history: list[dict]) -> int:
    """The best epoch by the zero-shot guard, from the recorded validation alone: the first epoch of
    the highest mean R@1 among those whose gain over epoch 0 holds (a plain re-computation of each
    gain and its bound from the recorded units), else epoch 0."""
    zero = np.array(history[0]["val_units"])
    ok = []
    for r in history[1:]:
        units = np.array(r["val_units"])
        score = lambda u: 50 * (u[:, 0].sum() / u[:, 1].sum() + u[:, 2].mean())  # noqa: E731
        assert score(units) == pytest.approx(r["val_r1"]) and score(zero) == pytest.approx(history[0]["val_r1"])
        draws = np.random.default_rng(0).integers(0, len(zero), size=(1000, len(zero)))
        lower = np.quantile([score(units[i]) - score(zero[i]) for i in draws], 0.05)
        assert r["over_untrained"] == {"gain": pytest.approx(score(units) - score(zero)),
                                       "lower": pytest.approx(lower), "holds": bool(lower > 0)}
        if lower > 0:
            ok.append(r)
    top = max((r["val_r1"] for r in ok), default=None)
    return next((r["epoch"] for r in ok if r["val_r1"] == top), 0)


def test_the_zero_shot_guard_keeps_the_untrained_model_against_a_gain_within_the_noise():
    """One more validation query ranked first (of 80) is the highest score, yet not beyond the noise:
    the guard keeps epoch 0; a gain of 20 queries in each direction replaces it."""
    n = 80
    zero = {"epoch": 0, "val_units": [[i % 2, 1, i % 3 == 0] for i in range(n)]}
    small = [list(u) for u in zero["val_units"]]
    small[0][0] = 1  # video 0's query, missed by epoch 0
    guard = TL.beyond_untrained({"epoch": 1, "val_units": small}, zero)
    assert guard["gain"] == pytest.approx(1.25 / 2) and not guard["holds"]
    metrics = lambda units: {"q2v": {"r1": 100 * np.mean([u[0] for u in units])},  # noqa: E731
                             "v2q": {"r1": 100 * np.mean([u[2] for u in units])}}
    best = {"epoch": 0, "score": TP.val_score(metrics(zero["val_units"]))}
    assert TL.pick_best(best, 1, metrics(small), guard["holds"]) == (False, best)
    assert TL.pick_best(best, 1, metrics(small))[0]  # without the guard, the higher score wins
    big = [[1 if i < 60 else u[0], 1, 1 if i < 47 else u[2]] for i, u in enumerate(zero["val_units"])]
    guard = TL.beyond_untrained({"val_units": big}, zero)
    assert guard["gain"] > 20 and guard["holds"]
    assert TL.pick_best(best, 2, metrics(big), guard["holds"])[1]["epoch"] == 2


def test_training_lowers_the_loss_and_raises_validation_r1(planted, tmp_path):
    # audio: the planted audio is a fixed rotation of the visual concepts, which only training
    # can learn (untrained, the CLAP-like segments are unrelated to the frames)
    # (24 validation videos: a few points gained are within their noise, so the zero-shot guard, tested on
    # its own below, is off: the highest validation R@1 wins)
    opts = T.TrainOptions(query="audio", epochs=5, lr=3e-3, val_fraction=0.25, seed=0, zero_shot_guard=False,
                          **SMALL)
    s = T.train(planted, tmp_path / "run", opts, quiet=True)
    h = s.history
    assert [r["epoch"] for r in h] == [0, 1, 2, 3, 4, 5] and "loss" not in h[0]
    assert not any("over_untrained" in r for r in h)
    assert h[-1]["loss"] < h[1]["loss"]
    assert h[-1]["q2v"] < h[1]["q2v"] and h[-1]["v2q"] < h[1]["v2q"]
    untrained = h[0]["val_r1"]
    best = max(r["val_r1"] for r in h[1:])
    assert best > untrained, [r["val_r1"] for r in h]
    assert s.best_epoch == next(r["epoch"] for r in h[1:] if r["val_r1"] == best)  # the first best wins
    meta = checkpoint.read_meta(tmp_path / "run" / "best.safetensors")
    assert meta["epoch"] == s.best_epoch and meta["val"] == json.loads(json.dumps(h[s.best_epoch]["val"]))
    assert meta["train"]["lr"] == 3e-3 and meta["cache"]["encoders"]["clip"]["name"] == "planted-clip"
    # the best checkpoint, reloaded, gives the recorded validation metrics again
    model, _ = checkpoint.load(tmp_path / "run")
    cache = open_cache(planted)
    plan = TD.plan_data(cache.split("train"), "audio", 0.25, 0)
    again = TP.validate(model, TD.load_validation(cache.split("train"), plan, model.cfg), torch.device("cpu"))[1]
    assert again == h[s.best_epoch]["val"]
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist["best_epoch"] == s.best_epoch and len(hist["epochs"]) == 6
    assert png_size(tmp_path / "run" / "curves.png") == (1500, 360)
    # the memorisation gap: as many training videos as validation videos, drawn by label, scored the same way
    assert len(plan.probe_rows) == len(plan.val_rows) and set(plan.probe_rows) <= set(plan.train_rows)
    share = plan.labels[plan.train_rows].mean() * len(plan.probe_rows)  # the training videos' share of each label
    assert abs(plan.labels[plan.probe_rows].sum() - share) < 1
    assert np.array_equal(plan.probe_rows, TD.plan_data(cache.split("train"), "audio", 0.25, 0).probe_rows)  # seeded
    probe = TD.load_validation(cache.split("train"), plan, model.cfg, plan.probe_rows)
    assert len(probe.query_video) == len(plan.probe_rows)
    rec = h[s.best_epoch]
    assert TP.validate(model, probe, torch.device("cpu"))[1] == rec["train_subset"]
    assert rec["train_r1"] == 0.5 * (rec["train_subset"]["q2v"]["r1"] + rec["train_subset"]["v2q"]["r1"])
    assert all("train_subset" in r for r in h)  # the untrained epoch 0 too
    # the anomaly head's video AUC on both subsets: the untrained head scores every video 0.5 (chance), and
    # the best epoch's is the AUC of the reloaded model's MIL video scores, ranked here by hand
    assert h[0]["val_auc"] == 0.5 and h[0]["train_auc"] == 0.5
    for data, key in ((TD.load_validation(cache.split("train"), plan, model.cfg), "val_auc"), (probe, "train_auc")):
        with torch.no_grad():
            score = model.encode_videos(torch.from_numpy(data.videos.frame_feat),
                                        torch.from_numpy(data.videos.frame_mask), patches=False).video_score.tolist()
        y = data.videos.labels
        pairs = [(a, n) for a in range(len(y)) if y[a] for n in range(len(y)) if not y[n]]
        want = sum(1.0 if score[a] > score[n] else 0.5 if score[a] == score[n] else 0.0 for a, n in pairs) / len(pairs)
        assert rec[key] == pytest.approx(want, abs=1e-9), key
    # the same scalars as TensorBoard events
    ev = events(tmp_path / "run")
    assert ev["r1_validation/a2v"] == [(r["epoch"], pytest.approx(r["val"]["q2v"]["r1"])) for r in h]
    assert ev["r1_training_subset/v2a"] == [(r["epoch"], pytest.approx(r["train_subset"]["v2q"]["r1"])) for r in h]
    assert ev["loss/bce"] == [(r["epoch"], pytest.approx(r["bce"])) for r in h[1:]]
    assert ev["anomaly_auc/validation"] == [(r["epoch"], pytest.approx(r["val_auc"])) for r in h]
    assert ev["anomaly_auc/training_subset"] == [(r["epoch"], pytest.approx(r["train_auc"])) for r in h]


def events(run) -> dict[str, list]:
    """The scalars of a run's TensorBoard event files, as TensorBoard reads them: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_curves_draw_the_history():
    import matplotlib.pyplot as plt

    from varcmp.training.curves import curves_figure

    val = lambda a, b: {"q2v": {"r1": a}, "v2q": {"r1": b}}  # noqa: E731
    history = [{"epoch": 0, "val": val(10.0, 12.0), "train_subset": val(11.0, 13.0), "val_auc": 0.5, "train_auc": 0.5},
               {"epoch": 1, "loss": 3.0, "v2q": 1.0, "q2v": 1.5, "bce": 0.5, "val": val(20.0, 25.0),
                "train_subset": val(40.0, 45.0), "val_auc": 0.75, "train_auc": 0.8},
               {"epoch": 2, "loss": 2.0, "v2q": 0.75, "q2v": 0.75, "bce": 0.5, "val": val(30.0, 28.0),
                "train_subset": val(70.0, 66.0), "val_auc": 0.7, "train_auc": 0.95}]
    fig = curves_figure(history, ("t2v", "v2t"), 2)
    loss_ax, val_ax, auc_ax = fig.axes
    assert {ln.get_label() for ln in auc_ax.lines} >= {"validation", "training subset"}
    auc = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in auc_ax.lines}
    assert auc["validation"] == ([0, 1, 2], [0.5, 0.75, 0.7]) and auc["training subset"] == ([0, 1, 2], [0.5, 0.8, 0.95])
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ax in fig.axes for ln in ax.lines}
    assert lines["total"] == ([1, 2], [3.0, 2.0])
    assert lines["retrieval (InfoNCE)"] == ([1, 2], [2.5, 1.5]) and lines["anomaly (MIL BCE)"] == ([1, 2], [0.5, 0.5])
    assert lines["t2v R@1"] == ([0, 1, 2], [10.0, 20.0, 30.0]) and lines["v2t R@1"] == ([0, 1, 2], [12.0, 25.0, 28.0])
    assert lines["t2v R@1, training subset"] == ([0, 1, 2], [11.0, 40.0, 70.0])
    assert lines["v2t R@1, training subset"] == ([0, 1, 2], [13.0, 45.0, 66.0])
    assert "best (epoch 2)" in lines
    plt.close(fig)


def test_mil_loss_weight_balances_the_training_videos(planted):
    from rich.console import Console

    plan = TD.plan_data(open_cache(planted).split("train"), "text", 0.1, 0)
    labels = plan.labels[plan.train_rows]
    normal, anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    assert 0 < normal < anomalous  # the planted split is mostly anomalous
    console = Console(record=True, width=200)
    weight = T._pos_weight(T.TrainOptions(), plan, console)
    assert weight == normal / anomalous and f"n_normal / n_anomalous = {normal} / {anomalous}" in console.export_text()
    assert T._pos_weight(T.TrainOptions(balance_anomaly=False), plan, console) is None  # the paper's loss
    learner = TL.init_learner(T.TrainOptions(**SMALL).model_config(open_cache(planted).spec), T.TrainOptions(),
                              TL.resolve_compute(T.Runtime(device="cpu"), None))
    TL.make_step(learner, T.TrainOptions(), None, {}, None, weight)
    assert learner.step.pos_weight == weight  # what every step's VarCMP.loss receives


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_anomaly_lr_scale_gives_the_anomaly_head_its_own_rate(planted, scale):
    """--anomaly-lr-scale s: AdamW's first step moves every weight by its group's rate (whatever the
    gradient's size), so the anomaly head's weights move s times as far as the others', through
    the schedule's rate of the step; at 1 the optimiser keeps one group (old states resume)."""
    opts = T.TrainOptions(anomaly_lr_scale=scale, weight_decay=0.0, schedule="cosine", epochs=4)
    learner = TL.init_learner(T.TrainOptions(**SMALL).model_config(open_cache(planted).spec), opts,
                              TL.resolve_compute(T.Runtime(device="cpu"), None))
    model, opt = learner.model, learner.optimizer
    assert len(opt.param_groups) == (1 if scale == 1.0 else 2)
    TL.set_learning_rate(opt, opts, 1.5)
    rate = TL.learning_rate(opts, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 10 ** torch.randint(-1, 2, (), generator=g).item()
    opt.step()
    for n, p in model.named_parameters():
        want = rate * (scale if n.startswith("anomaly_head.") else 1.0)
        moved = (p.detach().double() - before[n].double()).abs()
        sure = p.grad.abs() > 1e-3  # Adam's eps (1e-8) is negligible against these gradients
        assert sure.float().mean() > 0.9 and torch.allclose(moved[sure], torch.tensor(want).double(), rtol=1e-2), n


def test_events_only_with_tensorboard_and_replaced_with_the_run(tmp_path, monkeypatch):
    import varcmp.training.curves as C
    from varcmp.training.rundir import prepare_out

    rec = {"epoch": 1, "loss": 1.0, "val": {"q2v": {"r1": 5.0}, "v2q": {"r1": 6.0}}}
    assert C.scalars(rec, ("t2v", "v2t")) == {"loss/loss": 1.0, "r1_validation/t2v": 5.0, "r1_validation/v2t": 6.0}
    log = C.EventLog(tmp_path, ("t2v", "v2t"))
    log.log([rec])
    log.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    prepare_out(tmp_path, ["history.json"])  # --overwrite: the replaced run's events go with it
    assert not list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setattr(C, "tensorboard_available", lambda: False)  # the optional package not installed
    log = C.EventLog(tmp_path / "b", ("t2v", "v2t"))
    log.log([rec])
    log.close()
    assert not (tmp_path / "b").exists()


def test_text_training_lowers_the_loss_and_runs_are_repeatable(planted, tmp_path):
    opts = T.TrainOptions(epochs=3, lr=1e-3, val_fraction=0.25, **SMALL)
    a = T.train(planted, tmp_path / "a", opts, quiet=True)
    b = T.train(planted, tmp_path / "b", opts, quiet=True)
    assert a.history[-1]["loss"] < a.history[1]["loss"]
    assert [r.get("loss") for r in a.history] == [r.get("loss") for r in b.history]  # same seed, same curve
    wa, wb = weights(tmp_path / "a" / "last.safetensors"), weights(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = T.train(planted, tmp_path / "c", T.TrainOptions(epochs=3, lr=1e-3, val_fraction=0.25, seed=1, **SMALL),
                quiet=True)
    assert c.history[1]["loss"] != a.history[1]["loss"]


# ----------------------------------------------------------------------------- resume and checkpoints


def test_resume_equals_an_uninterrupted_run(planted, tmp_path):
    common = [planted, *SMALL_ARGS, "--lr", "1e-3", "--val-fraction", "0.25"]
    cli(*common, "--out", tmp_path / "full", "--epochs", "4")
    cli(*common, "--out", tmp_path / "part", "--epochs", "2")
    first = json.loads((tmp_path / "part" / "history.json").read_text())["epochs"]
    assert checkpoint.read_meta(tmp_path / "part" / "last.safetensors")["epoch"] == 2
    res = cli(*common, "--out", tmp_path / "part", "--epochs", "4", "--resume")
    assert "resuming" in res.stderr and "after epoch 2" in res.stderr
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [r["epoch"] for r in part["epochs"]] == [0, 1, 2, 3, 4]
    assert part["epochs"][:3] == first  # epochs 1-2 kept, not trained again
    for key in ("loss", "val", "train_subset"):
        assert [r.get(key) for r in part["epochs"]] == [r.get(key) for r in full["epochs"]]
    assert events(tmp_path / "part") == events(tmp_path / "full")  # each epoch once, across the two processes
    for name in ("last.safetensors", "best.safetensors"):
        wf, wp = weights(tmp_path / "full" / name), weights(tmp_path / "part" / name)
        assert wf.keys() == wp.keys()
        for k in wf:
            torch.testing.assert_close(wp[k], wf[k], rtol=0, atol=1e-6)
    assert checkpoint.read_meta(tmp_path / "part" / "last.safetensors")["epoch"] == 4
    # resuming a finished run trains nothing
    res = cli(*common, "--out", tmp_path / "part", "--epochs", "4", "--resume")
    assert json.loads((tmp_path / "part" / "history.json").read_text())["epochs"] == part["epochs"]


def test_checkpoint_round_trip_gives_identical_scores(planted, tmp_path):
    s = T.train(planted, tmp_path / "run", T.TrainOptions(epochs=2, lr=1e-3, val_fraction=0.25, **SMALL), quiet=True)
    loaded, meta = checkpoint.load(tmp_path / "run" / "last.safetensors")
    assert meta["epoch"] == 2 and loaded.cfg == s.model.cfg
    trained = scores(s.model, planted)
    assert trained.shape == (14, 14)  # test split: 16 videos, 2 failed
    np.testing.assert_array_equal(scores(loaded, planted), trained)
    untrained = VarCMP(s.model.cfg)
    assert not np.array_equal(scores(untrained, planted), trained)


class _Payload:
    """Unpickling it would create `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_loading_never_executes_code(planted, tmp_path, kind):
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is live under plain pickle...
    assert live.exists()
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    if kind == "torch.save":  # ...also as a torch.save file
        torch.save(_Payload(marker), run / TS.STATE_NAME)
    else:
        (run / TS.STATE_NAME).write_bytes(pickle.dumps(_Payload(marker)))
    (run / "best.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    res = cli(planted, "--out", run, "--resume", *SMALL_ARGS, code=2)
    assert "not a varcmp training state" in error_line(res)
    with pytest.raises(TR.TrainError):
        TS.load_state(run / TS.STATE_NAME)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(run / "best.safetensors")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(run)
    assert not marker.exists()


def test_refuses_other_encoders_and_other_settings(planted, other_encoders, tmp_path):
    run = tmp_path / "run"
    cli(planted, "--out", run, "--epochs", "1", *SMALL_ARGS)
    res = cli(other_encoders, "--out", run, "--epochs", "2", "--resume", *SMALL_ARGS, code=2)
    line = error_line(res)
    assert "other encoders" in line and "another-clip" in line
    with pytest.raises(checkpoint.CheckpointError, match="other encoders"):
        checkpoint.check_compatible(checkpoint.read_meta(run), open_cache(other_encoders), run)
    res = cli(planted, "--out", run, "--epochs", "2", "--resume", *SMALL_ARGS, "--lr", "5e-4", "--tau", "0.2", code=2)
    line = error_line(res)
    assert "lr: 0.0002 there, 0.0005 now" in line and "tau: 0.1 there, 0.2 now" in line
    res = cli(planted, "--out", run, "--epochs", "2", "--resume", *SMALL_ARGS, "--val-fraction", "0.3", code=2)
    assert "val_fraction" in error_line(res)
    # nothing was written by the refused runs
    assert checkpoint.read_meta(run / "last.safetensors")["epoch"] == 1


def test_without_validation_best_is_last(planted, tmp_path):
    s = T.train(planted, tmp_path / "run", T.TrainOptions(epochs=2, val_fraction=0, **SMALL), quiet=True)
    assert [r["epoch"] for r in s.history] == [1, 2] and s.best_epoch == 2
    assert checkpoint.read_meta(tmp_path / "run" / "best.safetensors")["epoch"] == 2
    assert json.loads((tmp_path / "run" / "history.json").read_text())["validation_videos"] == []
    assert png_size(tmp_path / "run" / "curves.png") == (1500, 360)  # the loss alone, and notes


def test_existing_run_needs_resume_or_overwrite(planted, tmp_path):
    run = tmp_path / "run"
    cli(planted, "--out", run, "--epochs", "1", *SMALL_ARGS)
    assert "--resume" in error_line(cli(planted, "--out", run, *SMALL_ARGS, code=2))
    assert "pass one of them" in error_line(cli(planted, "--out", run, "--resume", "--overwrite", code=2))
    cli(planted, "--out", run, "--epochs", "2", "--overwrite", *SMALL_ARGS)
    assert len(json.loads((run / "history.json").read_text())["epochs"]) == 3
    fresh = tmp_path / "fresh"  # --resume with nothing to resume starts a new run
    res = cli(planted, "--out", fresh, "--epochs", "1", "--resume", *SMALL_ARGS)
    assert "nothing to resume" in res.stderr and (fresh / "best.safetensors").is_file()


# ----------------------------------------------------------------------------- options, data, errors


def test_ablation_options_and_streaming(planted, tmp_path):
    args = [planted, "--levels", "coarse,fine", "--no-anomaly-weighting", "--epochs", "2", "--lr", "1e-3",
            *SMALL_ARGS]
    res = cli(*args, "--out", tmp_path / "mem", "--data", "memory")
    assert "best:" in res.stdout and "R@1" in res.stdout
    meta = checkpoint.read_meta(tmp_path / "mem")
    assert meta["model_config"]["levels"] == ["coarse", "fine"] and meta["model_config"]["anomaly_weighting"] is False
    assert meta["train"]["levels"] == ["coarse", "fine"]
    # streamed from the lazy arrays: the same run
    cli(*args, "--out", tmp_path / "stream", "--data", "stream")
    wm, ws = weights(tmp_path / "mem" / "last.safetensors"), weights(tmp_path / "stream" / "last.safetensors")
    assert all(torch.equal(wm[k], ws[k]) for k in wm)
    assert json.loads((tmp_path / "stream" / "history.json").read_text())["runtime"]["data"] == "stream"


OUT = ["--out", "RUN"]
# (the cache, the options, words of the one error line): "RUN" stands for the run directory
CLI_ERRORS = [
    ("nothing.zarr", OUT, "no such cache"),
    ("tmp_path", OUT, "cannot be opened as a varcmp cache"),
    ("planted", [*OUT, "--split", "dev"], "no split 'dev'"),
    ("bare", OUT, "holds no captions"),
    ("bare", [*OUT, "--query", "audio"], "holds no audio features"),
    ("planted", [*OUT, "--levels", "coarse,finest"], "unknown level 'finest'"),
    ("planted", [*OUT, "--val-fraction", "1.5"], "--val-fraction"),
    ("planted", [*OUT, "--batch-size", "1"], "--batch-size"),
    ("planted", [*OUT, "--top-patches", "7"], "top_patches (7) > num_patches (6)"),
    ("planted", [*OUT, "--device", "cuda:7"] if not torch.cuda.is_available() else [*OUT, "--device", "nope"],
     "--device"),
    ("planted", [*OUT, "--precision", "fp16", "--device", "cpu"], "fp16"),
    ("planted", [], "--out"),  # a usage error of click's own
    ("planted", [*OUT, "--query", "video"], "--query"),
]


@pytest.mark.parametrize("cache, args, words", CLI_ERRORS, ids=[w for _, _, w in CLI_ERRORS])
def test_cli_errors_are_one_line_with_exit_code_2(planted, bare, tmp_path, cache, args, words):
    paths = {"planted": planted, "bare": bare, "nothing.zarr": tmp_path / "nothing.zarr", "tmp_path": tmp_path,
             "RUN": tmp_path / "run"}
    line = error_line(cli(paths[cache], *[paths.get(a, a) for a in args], code=2))
    assert words in line, (cache, args, line)
    assert not (tmp_path / "run").exists()


def test_help_shows_examples_and_defaults():
    help_text = cli("--help").stdout
    assert "Examples:" in help_text and "--no-anomaly-weighting" in help_text and "[default: 15]" in help_text


def test_module_entry_point():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "varcmp.train", "-h"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "varcmp-train cache.zarr --out runs/ucf --resume" in res.stdout


def test_non_finite_loss_stops_with_a_message(planted, tmp_path, monkeypatch):
    seen = {}
    batches, loss = TD.epoch_batches, VarCMP.loss

    def record(plan, epoch, seed, bs):
        seen["epoch"] = epoch
        return batches(plan, epoch, seed, bs)

    def poisoned(self, v, q, labels=None, pos_weight=None):
        out = loss(self, v, q, labels, pos_weight)
        if seen["epoch"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(TL, "epoch_batches", record)
    monkeypatch.setattr(VarCMP, "loss", poisoned)
    run = tmp_path / "run"
    line = error_line(cli(planted, "--out", run, "--epochs", "3", *SMALL_ARGS, code=1), alone=False)
    assert "nan at epoch 2, step 1/" in line
    hist = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in hist["epochs"]] == [0, 1] and hist["best_epoch"] in (0, 1)
    assert checkpoint.read_meta(run / "best.safetensors")["epoch"] == hist["best_epoch"]  # epoch 0 competes
    assert checkpoint.read_meta(run / "last.safetensors")["epoch"] == 1


def test_validation_size_has_a_floor_of_val_min_up_to_a_quarter():
    assert TD.validation_size(320, 0.1, 80) == 80      # the demo's 320 training videos: 80, not 32
    assert TD.validation_size(804, 0.1, 80) == 80      # the larger world: the fraction alone gives 80 too
    assert TD.validation_size(2000, 0.1, 80) == 200    # the fraction rules above the floor
    assert TD.validation_size(100, 0.1, 80) == 25      # the floor stops at a quarter
    assert TD.validation_size(320, 0.1, 0) == 32       # --val-min 0: the fraction alone
    assert TD.validation_size(10, 0.1, 0) == 2         # never fewer than 2
    assert TD.validation_size(320, 0.0, 80) == 0       # --val-fraction 0: none
    with pytest.raises(TR.TrainError, match="val-min"):
        T.TrainOptions(val_min=-1)


def test_validation_is_held_out_of_training_and_never_touches_test(planted, tmp_path, monkeypatch):
    opened, batched = [], []
    split, batches = Cache.split, TD.epoch_batches

    def record_split(self, name):
        opened.append(name)
        return split(self, name)

    def record_batches(plan, epoch, seed, bs):
        out = batches(plan, epoch, seed, bs)
        batched.append((epoch, plan, out))
        return out

    monkeypatch.setattr(Cache, "split", record_split)
    monkeypatch.setattr(TL, "epoch_batches", record_batches)
    s = T.train(planted, tmp_path / "run", T.TrainOptions(epochs=2, val_fraction=0.25, **SMALL), quiet=True)
    assert set(opened) == {"train"}
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    val, trained = set(hist["validation_videos"]), set(hist["training_videos"])
    cache = open_cache(planted)
    train_paths, test_paths = set(cache.split("train").paths), set(cache.split("test").paths)
    assert val and trained and not val & trained
    assert val <= train_paths and not val & test_paths and not trained & test_paths
    assert len(val) == round(0.25 * 94) and len(trained) == 94 - len(val)  # 96 videos, 2 failed
    video_of = np.asarray(cache.split("train").array("text/video_index")[:])
    plan = batched[0][1]
    labels = plan.labels[plan.val_rows]
    assert set(labels.tolist()) == {0, 1}  # stratified: both kinds held out
    for epoch, plan, out in batched:
        rows = np.concatenate([v for v, _ in out])
        assert not np.isin(rows, plan.val_rows).any()
        assert np.array_equal(np.sort(rows), plan.train_rows)  # each training video once per epoch
        assert all(len(v) >= 2 for v, _ in out)
        for v, q in out:  # captions of their own videos
            assert np.array_equal(video_of[q], v)
    assert len(s.history) == 3


def test_several_captions_per_video_one_per_batch():
    plan = TD.Plan("text", np.array([f"v{i}" for i in range(6)], dtype=object), np.array([1, 0, 1, 0, 1, 0]),
                  train_rows=np.arange(6), val_rows=np.zeros(0, np.int64),
                  cap_rows=np.arange(12), cap_video=np.repeat(np.arange(6), 2))
    drawn = set()
    for epoch in range(1, 6):
        out = TD.epoch_batches(plan, epoch, 0, 4)
        assert [len(v) for v, _ in out] == [4, 2]
        for v, q in out:
            assert np.array_equal(plan.cap_video[q], v) and len(set(v.tolist())) == len(v)
            drawn |= set(q.tolist())
    assert len(drawn) > 6  # both captions of some videos were used across epochs
    # a trailing single pair is merged into the previous batch (no InfoNCE without a negative)
    plan.train_rows, plan.cap_rows, plan.cap_video = np.arange(5), np.arange(5), np.arange(5)
    assert [len(v) for v, _ in TD.epoch_batches(plan, 1, 0, 4)] == [5]


def test_hdf5_cache_in_memory_and_streamed(tmp_path):
    h5 = write_planted_cache(tmp_path / "p.h5", splits={"train": 32}, seed=3, fail=1)
    runs = {}
    for data in ("memory", "stream"):
        s = T.train(h5, tmp_path / data, T.TrainOptions(query="audio", epochs=2, val_fraction=0.2, **SMALL),
                    T.Runtime(data=data), quiet=True)
        assert s.memory == (data == "memory")
        runs[data] = weights(tmp_path / data / "last.safetensors")
    assert all(torch.equal(runs["memory"][k], runs["stream"][k]) for k in runs["memory"])


def test_read_rows_any_order(planted):
    arr = open_cache(planted).split("train").array("videos/frame_feat")
    rows = np.array([5, 1, 5, 0])
    np.testing.assert_array_equal(read_rows(arr, rows), np.asarray(arr[:])[rows])
    assert TD.available_memory() > 2**20  # Linux: MemAvailable of /proc/meminfo


# ----------------------------------------------------------------------------- schedule and augmentation

def test_learning_rate_schedule_by_hand():
    """constant: --lr throughout; cosine: a linear warm-up over the first --warmup of the steps, then
    lr/2 (1 + cos(pi t')) with t' the share of the decay done; 0 at the end of --epochs."""
    const = T.TrainOptions(lr=2e-3, epochs=10)
    assert [TL.learning_rate(const, d) for d in (0, 3.7, 9.99)] == [2e-3] * 3
    cos = T.TrainOptions(lr=2e-3, epochs=10, schedule="cosine", warmup=0.2)
    assert 0 < TL.learning_rate(cos, 0) < 1e-5
    assert TL.learning_rate(cos, 1) == pytest.approx(1e-3, rel=1e-3)         # half-way up the warm-up
    assert TL.learning_rate(cos, 2) == pytest.approx(2e-3)                    # the peak
    assert TL.learning_rate(cos, 6) == pytest.approx(1e-3)                    # half-way down
    assert TL.learning_rate(cos, 8) == pytest.approx(1e-3 * (1 + np.cos(np.pi * 0.75)))
    assert TL.learning_rate(cos, 10) == pytest.approx(0, abs=1e-12)


def test_token_drop_hides_valid_positions_only_and_never_a_whole_row():
    torch.manual_seed(0)
    mask = torch.ones(400, 32, dtype=torch.bool)
    mask[:, 20:] = False
    mask[0, 1:] = False                                   # one valid position: kept whatever the draw
    assert TP.drop(mask, 0.0) is mask
    out = TP.drop(mask, 0.3)
    assert not (out & ~mask).any() and out.any(-1).all() and out[0, 0]
    assert out[1:].sum().item() / mask[1:].sum().item() == pytest.approx(0.7, abs=0.02)
    assert TP.drop(mask, 0.999).sum(-1).min().item() >= 1


def test_schedule_and_drop_options_checked_in_one_line():
    for bad in (dict(warmup=1.0), dict(frame_drop=-0.1), dict(word_drop=1.5), dict(schedule="linear")):
        with pytest.raises(TR.TrainError, match=next(iter(bad)).replace("_", "-")):
            T.TrainOptions(**bad)


def test_the_untrained_model_is_kept_when_no_epoch_validates_above_it(planted, tmp_path):
    """Epoch 0 (the untrained model, zero-shot) is a candidate for best: here a far too high --lr makes
    every epoch validate below it, so best.safetensors holds the untrained weights, and the run says so."""
    out = tmp_path / "run"
    res = cli(planted, "--out", out, "--query", "text", "--epochs", 2, "--lr", 0.01, "--val-fraction", 0.25,
              "--seed", 0, *SMALL_ARGS[:-1])
    hist = json.loads((out / "history.json").read_text())
    r1 = [r["val_r1"] for r in hist["epochs"]]
    assert max(r1[1:]) < r1[0] and hist["best_epoch"] == 0 and hist["epochs"][0]["best"]
    assert guarded_best(hist["epochs"]) == 0 and not any(r["over_untrained"]["holds"] for r in hist["epochs"][1:])
    assert checkpoint.read_meta(out / "best.safetensors")["epoch"] == 0
    best = checkpoint.load(out)[0]
    assert all(not weights(out / "best.safetensors")[k].any() for k in ("temporal.proj.weight", "anomaly_head.fc.weight",
                                                                         "patch_selector.out.weight"))
    from varcmp.evaluate import zero_shot_model
    zs = zero_shot_model(open_cache(planted).spec, "text")
    torch.testing.assert_close(scores(best, planted), scores(zs, planted))  # the untrained model is zero-shot
    assert checkpoint.read_meta(out / "last.safetensors")["epoch"] == 2
    assert "no epoch validated above the untrained model" in " ".join(res.output.split())
    # a resumed run to more epochs keeps epoch 0 as best while nothing beats it; killed before
    # best.safetensors was written, the resume writes it from the seed's untrained model
    (out / "best.safetensors").unlink()
    res = cli(planted, "--out", out, "--query", "text", "--epochs", 3, "--lr", 0.01, "--val-fraction", 0.25,
              "--seed", 0, "--resume", *SMALL_ARGS[:-1])
    assert "restored" in res.output and "(epoch 0)" in " ".join(res.output.split())
    hist = json.loads((out / "history.json").read_text())
    assert hist["best_epoch"] == guarded_best(hist["epochs"])  # the resumed epoch is guarded against epoch 0 too
    if hist["best_epoch"] == 0:
        torch.testing.assert_close(scores(checkpoint.load(out)[0], planted), scores(zs, planted))


def test_recipe_paper_sets_what_the_command_line_does_not(planted, tmp_path):
    out = tmp_path / "run"
    cli(planted, "--out", out, "--recipe", "paper", "--epochs", 1, "--frame-drop", 0.2, "--val-fraction", 0,
        *SMALL_ARGS)
    used = json.loads((out / "history.json").read_text())["train"]
    paper = T.RECIPES["paper"]
    assert used["epochs"] == 1 and used["frame_drop"] == 0.2  # given on the command line
    assert all(used[k] == v for k, v in paper.items() if k not in ("epochs", "frame_drop"))
    assert used["heads"] == 2                                   # not in the recipe: the command line's
    default = T.TrainOptions()
    cli(planted, "--out", tmp_path / "own", "--epochs", 1, "--val-fraction", 0, *SMALL_ARGS)
    own = json.loads((tmp_path / "own" / "history.json").read_text())["train"]
    assert all(own[k] == getattr(default, k) for k in paper if k != "epochs")


def test_the_logit_scale_follows_the_query_kind_unless_it_is_given():
    """CLIP's 100 for text (both sides come from CLIP), 20 for audio (an encoder trained from scratch);
    a value given wins, and the paper's recipe names 100 for both."""
    assert T.TrainOptions().logit_scale == 100.0
    assert T.TrainOptions(query="audio").logit_scale == 20.0
    assert T.TrainOptions(query="audio", logit_scale=50.0).logit_scale == 50.0
    assert T.TrainOptions(query="audio").model_config(None).logit_scale == 20.0
    assert T.TrainOptions(**{**T.RECIPES["paper"], "query": "audio"}).logit_scale == 100.0


def test_a_run_saved_before_the_new_settings_resumes_with_what_it_was_trained_with(planted, tmp_path):
    """A resume state written before balance_anomaly, schedule, warmup, frame/word drop, topk_relative,
    selector_cos, anomaly_lr_scale, mil_k, temporal_input, anomaly_input and fine_input existed does not name them: it was trained with the unweighted MIL
    loss over VadCLIP's top-k, a constant rate, the selector's cos term and one learning rate, so a resume with today's defaults is refused, naming the setting, and
    one with the old ones continues."""
    out = tmp_path / "run"
    # an old run's optimiser had one group: the anomaly head's rate was the others'; its head scored frames
    cli(planted, "--out", out, "--epochs", 1, "--val-fraction", 0, "--anomaly-lr-scale", 1, "--anomaly-input", "frames",
        *SMALL_ARGS)
    path = out / TS.STATE_NAME
    st = TS.load_state(path)
    for k in ("balance_anomaly", "schedule", "warmup", "frame_drop", "word_drop", "topk_relative", "selector_cos",
              "anomaly_lr_scale", "mil_k", "temporal_input", "anomaly_input", "fine_input"):
        del st["train"][k]
    TS.save_state(st, path)
    res = cli(planted, "--out", out, "--epochs", 2, "--val-fraction", 0, "--resume", *SMALL_ARGS, code=2)
    assert "balance_anomaly: False there, True now" in " ".join(res.output.split())
    cli(planted, "--out", out, "--epochs", 2, "--val-fraction", 0, "--resume", "--no-balance-anomaly",
        "--selector-cos", 1, "--anomaly-lr-scale", 1, "--mil-k", "vadclip", "--temporal-input", "frames", "--anomaly-input", "frames", *SMALL_ARGS)
    assert json.loads((out / "history.json").read_text())["epochs"][-1]["epoch"] == 2


@pytest.mark.parametrize("query", ["text", "audio"])
def test_frame_and_word_drop_reach_the_training_step(query):
    """--frame-drop hides frames of the batch's videos and --word-drop tokens of its queries (words, or
    audio segments): each changes the loss of the same batch, and neither does at 0."""
    from varcmp.model import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(query=query, dim=16, audio_dim=12, num_frames=6, num_patches=5, max_words=7,
                      audio_segments=6, heads=2, ffn_dim=32, selector_dim=8)
    model = VarCMP(cfg).eval()  # no dropout: only the drop options draw
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    B = 4
    vb = {"frame_feat": torch.randn(B, 6, 16), "frame_mask": torch.ones(B, 6, dtype=torch.bool),
          "patch_feat": torch.randn(B, 6, 5, 16), "audio_feat": torch.randn(B, 6, 12),
          "audio_mask": torch.ones(B, 6, dtype=torch.bool)}
    qb = ({"word_feat": torch.randn(B, 7, 16), "word_mask": torch.ones(B, 7, dtype=torch.bool),
           "sentence": torch.randn(B, 16)} if query == "text" else None)
    labels = torch.tensor([1, 0, 1, 0])

    def loss(frame_drop, word_drop):
        torch.manual_seed(1)
        return TP.TrainStep(model, None, None, frame_drop, word_drop)(vb, qb, labels, None, labels)["loss"].item()

    plain = loss(0.0, 0.0)
    assert loss(0.0, 0.0) == plain
    assert loss(0.5, 0.0) != plain and loss(0.0, 0.5) != plain
