"""Tests of varcmp.synth: the synthetic benchmark (feature cache and real media), CPU, small sizes."""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from varcmp.media.captions import label_from_path
from varcmp.cache_schema import DONE, CacheError, text_arrays, video_arrays
from varcmp.cache.reader import open_cache
from varcmp.retrieval.pairs import load_eval_data
from varcmp.retrieval.metrics import retrieval_metrics
from varcmp.evaluate import main as eval_main
from varcmp.evaluate import zero_shot_model
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
from varcmp.synth.world import SynthParams, World, make_synthetic_cache
from varcmp.synth.media import extract_media, render_media
from varcmp.cli.synth import main

# small but structured: 60 videos, half of each kind in test
SMALL = dict(dim=128, frames=8, patches=16, words=16, audio_segments=8)
TINY = dict(dim=32, frames=4, patches=12, words=12, audio_segments=4, object_patches=1)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("synth") / "small.zarr", videos=60, seed=0,
                                test_share=0.5, **SMALL)


def _arrays(path):
    """Every array of every split, read into memory."""
    c = open_cache(path)
    out = {}
    for name in c.splits:
        s = c.split(name)
        keys = [f"videos/{k}" for k in video_arrays(c.spec, 1)] + [f"text/{k}" for k in text_arrays(c.spec, 1)]
        for k in keys:
            out[f"{name}/{k}"] = np.asarray(s.array(k)[:])
    return out


def test_cache_passes_the_schema_reader(small_cache):
    c = open_cache(small_cache)
    assert sorted(c.splits) == ["test", "train"]
    sp = c.spec
    assert (sp.num_frames, sp.num_patches, sp.dim, sp.max_words) == (8, 16, 128, 16)
    assert (sp.audio_segments, sp.audio_dim) == (8, 128)
    assert "varcmp-synth" in c.encoders["clip"]["name"] and c.preprocessing["synthetic"]["seed"] == 0
    sizes = {}
    for name in ("train", "test"):
        s = c.split(name)
        assert s.has_text and s.has_audio
        assert (s.status == DONE).all()
        v = s.load_videos()
        n = len(v.index)
        sizes[name] = n
        assert v.frame_feat.shape == (n, 8, 128) and v.frame_feat.dtype == np.float16
        assert v.patch_feat.shape == (n, 8, 16, 128) and v.patch_feat.dtype == np.float16
        assert v.audio_feat.shape == (n, 8, 128) and v.audio_feat.dtype == np.float16
        assert v.frame_mask.all() and v.audio_mask.all()
        for x in (v.frame_feat, v.patch_feat, v.audio_feat):  # unit vectors, as the encoders' outputs are compared
            np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=-1), 1.0, atol=2e-3)
        for path, label, cat in zip(v.paths, v.labels, v.categories):
            assert label_from_path(path) == (int(label), cat)
        assert set(v.labels.tolist()) == {0, 1}  # both kinds in each split
        d = s.durations
        assert (np.diff(v.frame_time, axis=1) > 0).all() and (v.frame_time[:, -1] < d).all()
        assert (v.audio_time[..., 0] >= 0).all() and (v.audio_time[..., 1] <= d[:, None] + 1e-3).all()

        t = s.load_text()
        assert len(t.text) == n and t.done.all()
        np.testing.assert_array_equal(t.video_index, np.arange(n))
        assert t.word_feat.shape == (n, 16, 128) and t.word_feat.dtype == np.float16
        lengths = t.word_mask.sum(1)
        assert (t.word_mask[:, 0]).all() and len(set(lengths.tolist())) > 1  # variable length
        np.testing.assert_array_equal(t.word_mask, np.arange(16)[None] < lengths[:, None])
        # start token: one vector for every caption; end token: the sentence (as CLIP's EOS)
        np.testing.assert_array_equal(t.word_feat[:, 0], np.broadcast_to(t.word_feat[0, 0], t.word_feat[:, 0].shape))
        np.testing.assert_array_equal(t.word_feat[np.arange(n), lengths - 1], t.sentence)
        assert all(len(x.split()) >= 5 for x in t.text)
    assert sizes == {"train": 30, "test": 30}


def test_default_world_plan_matches_the_documented_split():
    w = World(SynthParams(dim=16))  # the plan does not depend on the dims; keep it cheap
    assert len(w.split_indices("train")) == 480 and len(w.split_indices("test")) == 120
    labels = np.array([v.label for v in w.videos])
    assert labels.sum() == 300
    spans = [v.span for v in w.videos if v.label]
    assert all(b - a == 4 for a, b in spans)
    assert all(v.span is None for v in w.videos if not v.label)
    assert len({v.path for v in w.videos}) == 600


def test_same_seed_same_cache_other_seed_other_cache(tmp_path):
    a = _arrays(make_synthetic_cache(tmp_path / "a.zarr", videos=16, seed=3, **TINY))
    b = _arrays(make_synthetic_cache(tmp_path / "b.zarr", videos=16, seed=3, **TINY))
    c = _arrays(make_synthetic_cache(tmp_path / "c.zarr", videos=16, seed=4, **TINY))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["train/videos/frame_feat"], c["train/videos/frame_feat"])
    assert not np.array_equal(a["test/text/text"], c["test/text/text"])


def test_feature_space_identity_follows_the_concepts_not_the_sampling(tmp_path):
    """A checkpoint may move between worlds of one feature space (e.g. to test on another span),
    never across seeds or dims: the cache's encoder hashes say which."""
    base = SynthParams(**TINY)
    same = [replace(base, span=2), replace(base, noise=0.5, videos=99), replace(base, normal_share=0.2)]
    other = [replace(base, seed=1), replace(base, dim=48), replace(base, align=0.9), replace(base, scenes=5)]
    assert all(p.space_fingerprint() == base.space_fingerprint() for p in same)
    assert len({p.space_fingerprint() for p in other} | {base.space_fingerprint()}) == len(other) + 1
    w1, w2 = World(base), World(replace(base, span=2, noise=0.5))
    np.testing.assert_array_equal(w1.visual["verb"], w2.visual["verb"])
    np.testing.assert_array_equal(w1.rotation, w2.rotation)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = make_synthetic_cache(tmp_path / "x.zarr", videos=10, **TINY)
    with pytest.raises(CacheError, match="already exists"):
        make_synthetic_cache(out, videos=10, **TINY)
    make_synthetic_cache(out, videos=12, overwrite=True, **TINY)
    c = open_cache(out)
    assert c.split("train").num_videos + c.split("test").num_videos == 12


@pytest.mark.parametrize("knobs, match", [
    (dict(span=9, frames=8), "--span"),
    (dict(test_share=1.0), "--test-share"),
    (dict(patches=5, object_patches=1), "--patches"),
    (dict(actions=14), "--actions"),
    (dict(videos=1), "--videos"),
])
def test_bad_knobs_name_the_option(knobs, match):
    with pytest.raises(ValueError, match=match):
        SynthParams(**knobs)


def test_planted_structure_at_each_level():
    """Zero-shot cosines see the caption's own video (coarse), its span frames (fine), the
    action word's patches (finer), and the action's sound in the span (audio)."""
    w = World(SynthParams(videos=60, seed=0, **SMALL))
    idx = list(range(60))
    words, mask, sent = w.text_features(idx)
    feats = [w.video_features(i) for i in idx]

    mean = np.stack([f.frame_feat.mean(0) for f in feats])
    S = (mean / np.linalg.norm(mean, axis=1, keepdims=True)) @ sent.T  # [video, caption]
    own = np.diag(S)
    assert own.mean() - S[~np.eye(60, dtype=bool)].mean() > 0.05
    ranks = (S >= own[None]).sum(0)
    assert ranks.mean() < 15  # chance: 30.5

    frame_gap, patch_gap, audio_gap = [], [], []
    for i, (plan, f) in enumerate(zip(w.videos, feats)):
        if plan.span is None:
            continue
        inside = np.zeros(8, bool)
        inside[slice(*plan.span)] = True
        c = f.frame_feat @ sent[i]
        frame_gap.append(c[inside].mean() - c[~inside].mean())
        k = 1 + next(n for n, (_, role, _) in enumerate(w.caption_tokens(plan)) if role == "verb")  # after [start]
        best_patch = (f.patch_feat @ words[i, k]).max(1)
        patch_gap.append(best_patch[inside].mean() - best_patch[~inside].mean())
        snd = w.sound["verb"][plan.described.verb]
        a = f.audio_feat @ snd
        audio_gap.append(a[inside].mean() - a[~inside].mean())
    for gap in (frame_gap, patch_gap, audio_gap):
        assert len(gap) == 30
        assert np.mean(gap) > 0.03 and np.mean(np.array(gap) > 0) >= 0.8


def test_audio_segments_and_frame_times_follow_the_extraction_rule():
    """The world's audio segments are the windows extraction cuts (media.audio) from a track as
    long as the video, clamped and shifted alike; its frame times are extraction's sample times."""
    from varcmp.media.audio import audio_windows
    from varcmp.media.video import sample_times

    w = World(SynthParams(videos=8, seed=1, **{**TINY, "audio_segments": 64}))  # 1 s windows, shifted at the ends
    rate = 1000
    for i in range(8):
        f = w.video_features(i)
        win = audio_windows(np.ones(int(round(f.duration * rate)), np.float32), 0.0, f.duration, 64, rate)
        assert win.mask.all()
        np.testing.assert_allclose(f.audio_time, win.spans, atol=2e-3)
        np.testing.assert_allclose(f.frame_time, sample_times(f.duration, len(f.frame_mask)), rtol=1e-6)


def test_audio_is_not_in_the_visual_space():
    """Audio is a rotation of the concepts: zero-shot cosines with the visual/text vectors carry
    no more than chance information, unlike the rotated vectors."""
    w = World(SynthParams(videos=4, **SMALL))
    direct = np.abs(w.sound["verb"] @ w.text["verb"].T)
    rotated = w.sound["verb"] @ (w.text["verb"] @ w.rotation.T).T
    np.testing.assert_allclose(np.diag(rotated), 1.0, atol=1e-5)
    assert direct.max() < 0.5


def test_frame_labels_are_the_planted_spans_and_eval_reports_their_auc(small_cache, tmp_path):
    c = open_cache(small_cache)
    w = World(SynthParams(videos=60, seed=0, test_share=0.5, **SMALL))
    s = c.split("test")
    assert s.has_frame_labels
    labels = s.frame_labels(np.arange(s.num_videos))
    by_path = {p.path: p for p in w.videos}
    for path, row in zip(s.paths, labels):
        span = by_path[path].span
        want = np.zeros(8, np.int8)
        if span:
            want[span[0]:span[1]] = 1
        np.testing.assert_array_equal(row, want)
    assert labels.sum() > 0 and (labels == 0).sum() > 0
    out = tmp_path / "e.json"
    r = CliRunner().invoke(eval_main, [str(small_cache), "--zero-shot", "--bootstrap", "0", "--json", str(out)])
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())["anomaly"]
    assert a["frame_labels"] == {"source": "cache", "videos": 30, "frames": 240}
    assert a["frame_auc"] == 0.5  # untrained head: A = 0.5 on every frame, all tied
    assert "frame-level AUC 0.500 over 240 sampled frames of 30 videos (frame labels from the cache)" in r.output


def test_zero_shot_model_is_above_chance_on_the_cache(small_cache):
    c = open_cache(small_cache)
    d = load_eval_data(c.split("test"), "text")
    m = zero_shot_model(c.spec, "text")
    sims = score_matrix(m, encode_videos(m, d.videos, "cpu"), encode_queries(m, d.query_feats, "cpu"))
    for level in ("coarse", "fine", "finer", "total"):
        r = retrieval_metrics(sims[level], d.query_video, metrics=("r1", "r5", "mnr"))["q2v"]
        assert r["r5"] >= 2 * 100 * 5 / 30, (level, r)  # chance R@5 on 30 videos: 16.7 %
        assert r["mnr"] < 0.5 * 15.5, (level, r)         # chance mean rank: 15.5


def test_cli_writes_a_cache_and_rejects_bad_arguments_in_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    args = [str(out), "-n", "10", "--seed", "1", "--dim", "32", "--frames", "4", "--patches", "12",
            "--object-patches", "1", "--words", "12", "--audio-segments", "4"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert open_cache(out).preprocessing["synthetic"]["seed"] == 1

    for bad, word in ((args, "already exists"),
                      ([str(tmp_path / "b.zarr"), "--span", "0"], "--span"),
                      ([str(tmp_path / "b.zarr"), "--frames", "4", "--span", "5"], "--span"),
                      ([str(tmp_path / "b.zarr"), "--no-such-option"], "no-such-option"),
                      ([str(tmp_path / "b.zarr"), "--media", str(tmp_path / "m"), "--dim", "64"], "--dim")):
        r = runner.invoke(main, bad)
        assert r.exit_code == 2, (bad, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
    assert not (tmp_path / "b.zarr").exists()

    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0
    for text in ("varcmp-synth demo.zarr --videos 600 --seed 0", "--span", "--noise", "--normal-share", "--media",
                 "RANDOM"):
        assert text in r.output


def _tone_level(samples, rate, freq, t0, t1):
    x = samples[int(t0 * rate):int(t1 * rate)]
    t = np.arange(len(x)) / rate
    return 2 * abs(np.dot(x, np.exp(-2j * np.pi * freq * t))) / max(len(x), 1)


def test_media_renders_real_files_and_extracts_with_tiny_encoders(tmp_path, tiny_clip, tiny_clap):
    from varcmp.media.audio import AUDIO_RATE, read_audio
    from varcmp.media.video import read_frames
    from varcmp.synth.media import media_style

    world = World(SynthParams(videos=6, seed=0, test_share=0.34, frames=8, span=2, audio_segments=4))
    media = tmp_path / "media"
    root, captions = render_media(world, media, size=64, seconds=(2.0, 2.5))
    assert captions == media / "captions.csv"
    with open(captions, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == [v.path for v in world.videos if v.split == "train"] + \
        [v.path for v in world.videos if v.split == "test"]
    assert {r["text"] for r in rows} == {v.caption for v in world.videos}

    style = media_style(world)
    for plan in world.videos:
        fr = read_frames(root / plan.path, 8)
        assert len(fr.images) == 8 and fr.images[0].shape == (64, 64, 3)
        audio, _ = read_audio(root / plan.path)
        assert audio is not None and np.abs(audio).max() > 0.01
        if plan.span is not None:  # the action's tone sounds during the span only
            ev = plan.described
            freq = style["verb"][ev.verb]["freq"]
            a, b = (x * fr.duration / 8 for x in plan.span)
            inside = _tone_level(audio, AUDIO_RATE, freq, a + 0.05, b - 0.05)
            outside = [_tone_level(audio, AUDIO_RATE, freq, lo, hi)
                       for lo, hi in ((0.0, a - 0.15), (b + 0.15, fr.duration)) if hi - lo >= 0.2]
            assert outside and inside > 0.1 and inside > 5 * max(outside), (plan.path, inside, outside)

    out = extract_media(media, tmp_path / "media.zarr", tiny_clip, tiny_clap, frames=8, words=16, audio_segments=4)
    c = open_cache(out)
    assert sorted(c.splits) == ["test", "train"]
    assert (c.spec.num_frames, c.spec.num_patches, c.spec.dim, c.spec.audio_segments) == (8, 49, 512, 4)
    for name in ("train", "test"):
        s = c.split(name)
        assert (s.status == DONE).all() and s.has_text and s.has_audio
        v = s.load_videos()
        assert v.audio_mask.any(1).all() and set(v.labels.tolist()) == {0, 1}
        assert s.load_text().done.all()

    import varcmp.train as T  # one epoch of real training on the extracted cache, then evaluation

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = T.train(out, tmp_path / "run", T.TrainOptions(epochs=1, batch_size=2, val_fraction=0.0, heads=2,
                                                            ffn_dim=64, topk_samples=10), T.Runtime(device="cpu"),
                      quiet=True)
    finally:
        torch.set_num_threads(before)
    assert [h["epoch"] for h in run.history if "loss" in h] == [1] and np.isfinite(run.history[-1]["loss"])
    d = load_eval_data(c.split("test"), "text")
    m = run.model
    sims = score_matrix(m, encode_videos(m, d.videos, "cpu"), encode_queries(m, d.query_feats, "cpu"))
    assert sims["total"].shape == (2, 2) and np.isfinite(sims["total"]).all()


def test_evidence_patches_are_the_described_events_patches():
    """The mask marks 2 x object_patches patches in exactly the frames the described event is on
    (its span for an anomaly, every frame for a normal video), and those patches carry the
    caption's subject or action: their cosine with that concept's visual vector is high, and few
    others' is (bystanders and the background event may show the same subject)."""
    w = World(SynthParams(videos=20, seed=3, **SMALL))
    k = w.params.object_patches
    others = []
    for i, plan in enumerate(w.videos):
        ev = w.evidence_patches(i)
        on = np.zeros(w.params.frames, bool)
        on[plan.described.start:plan.described.stop] = True
        assert ev.shape == (8, 16) and (ev.sum(1) == np.where(on, 2 * k, 0)).all()
        p = w.video_features(i).patch_feat
        concept = np.maximum(p @ w.visual["subject"][plan.described.subject], p @ w.visual["verb"][plan.described.verb])
        assert concept[ev].min() > 0.3, i
        others.append((concept[~ev] > 0.3).mean())
    assert np.mean(others) < 0.05, others
    assert {p.label for p in w.videos} == {0, 1}


def test_selector_hits_by_hand(small_cache):
    """selector_hits counts, over the frames that show the described event, the evidence patches
    among the M patches the selector keeps, out of min(M, evidence patches): checked against the
    same count done here in numpy for an untrained selector (the M patches closest to [CLS])."""
    from varcmp.synth.probe import selector_hits, world_of
    from varcmp.model import VarCMP
    from varcmp.model.config import ModelConfig

    c = open_cache(small_cache)
    m = VarCMP(ModelConfig(dim=128, num_frames=8, num_patches=16, max_words=16, audio_segments=8, top_patches=3,
                           heads=2, ffn_dim=64))
    got = selector_hits(m, c, "test", batch=7)
    w, sp = world_of(c), c.split("test")
    per_row = []  # (label, hits, possible) of each video of the split
    for row, i in enumerate(w.split_indices("test")):
        f = np.asarray(sp.array("videos/frame_feat")[row], np.float64)
        p = np.asarray(sp.array("videos/patch_feat")[row], np.float64)
        cos = np.einsum("npc,nc->np", p, f) / np.linalg.norm(p, axis=-1) / np.linalg.norm(f, axis=-1)[:, None]
        ev = w.evidence_patches(i)
        shown = np.flatnonzero(ev.any(1))
        kept = [np.argsort(-cos[n], kind="stable")[:3] for n in shown]
        per_row.append((w.videos[i].label, sum(ev[n, k].sum() for n, k in zip(shown, kept)),
                        sum(min(3, ev[n].sum()) for n in shown)))

    def rate(rows, label=None):
        picked = [per_row[r] for r in rows if label is None or per_row[r][0] == label]
        return sum(h for _, h, _ in picked) / sum(n for _, _, n in picked)
    every = range(len(per_row))
    assert got["normal"] == pytest.approx(rate(every, 0))
    assert got["anomalous"] == pytest.approx(rate(every, 1))
    assert got["hit_rate"] == pytest.approx(rate(every))
    assert got["chance"] == 3 / 16
    some = [len(per_row) - 1, 0, 2]  # rows: only those videos, in any order
    assert selector_hits(m, c, "test", batch=2, rows=some)["hit_rate"] == pytest.approx(rate(some))
    assert rate(some) != pytest.approx(rate(every))
    with pytest.raises(ValueError, match="not a varcmp-synth cache"):
        world_of(open_cache(write_tiny_extracted(small_cache.parent)))


def write_tiny_extracted(folder):
    """A cache that no World drew (the planted cache of the training tests)."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import write_planted_cache
    return write_planted_cache(folder / "planted.zarr", splits={"test": 4}, seed=0)
