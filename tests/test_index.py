"""The stored video index (varcmp.retrieval.index) and `varcmp-index`: the index equals a fresh
encoding, search on it equals the exhaustive ranking of freshly encoded videos, a stale index is
never used, and a build killed with -9 finishes to the uninterrupted index."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SPEC, one_line_error, write_planted_cache

from varcmp.cache.reader import open_cache
from varcmp.cli.index import main as index_main
from varcmp.evaluate import zero_shot_model
from varcmp.model import VideoEmb, checkpoint
from varcmp.retrieval.index import INDEX_DIR, fast_bfloat16, open_index
from varcmp.retrieval.pairs import load_eval_data
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
from varcmp.retrieval.search import search_features
from varcmp.retrieval.videos import CacheVideos

HALF_TOL = 2e-3  # a score from float16 e_v, frames and patches against the float32 encoding

pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(model, cache_path: Path, out: Path) -> Path:
    with open_cache(cache_path) as c:
        return checkpoint.save(out, model, {"cache": checkpoint.cache_fingerprint(c)})


def trained_like(seed: int = 1):
    """Heads with other weights than zero-shot, some videos predicted anomalous (so that anomaly-biased
    weighting changes frame and patch weights)."""
    model = zero_shot_model(SPEC, "text")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.anomaly_head.fc.bias.sub_(0.1)  # video scores around 0.5: some videos above, some below
    return model.eval()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_cache(tmp_path_factory.mktemp("ix") / "planted.zarr", {"test": 30}, seed=5, noise=0.1)


@pytest.fixture(scope="module")
def ckpt(planted, tmp_path_factory) -> Path:
    return save_checkpoint(trained_like(), planted, tmp_path_factory.mktemp("ix-run") / "best.safetensors")


def fresh(model, cache_path: Path, split: str = "test") -> VideoEmb:
    with open_cache(cache_path) as c:
        data = load_eval_data(c.split(split), "text")
    return encode_videos(model, data.videos, "cpu")


def test_the_index_is_the_model_encoding_of_every_video(planted, ckpt):
    """Every stored part equals `encode_videos` of the raw features: float16 parts to float16
    rounding, weights, anomaly scores, masks and the first-stage vectors to float32 rounding."""
    model, _ = checkpoint.load(ckpt)
    v = fresh(model, planted)
    assert 0 < int(v.anomalous.sum()) < len(v)  # both branches of eq. 6-7 are exercised
    with open_cache(planted) as c:
        src = CacheVideos(c.split("test"))
        idx, info = open_index(model, c, src, ckpt, "cpu", chunk=8)
        times = c.split("test").read(["videos/frame_time"], src.rows)["frame_time"]
    assert info.built and info.chunks_built == 4 and idx.n == 30
    got, unit = idx.embed(np.arange(30), "cpu"), v.unit_length()
    assert got.unit and unit.unit
    for f, stored, rtol in (("video", np.float16, 1e-3), ("frames", np.float16, 1e-3), ("patches", np.int16, 4e-3)):
        a, b = getattr(got, f).float().numpy(), getattr(unit, f).numpy()
        assert idx.array(f, [0]).dtype == stored
        assert np.allclose(a, b, rtol=rtol, atol=1e-4), f  # 16-bit rounding of the unit-length parts
        norms = np.linalg.norm(b, axis=-1)
        assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and np.allclose(b * np.linalg.norm(
            getattr(v, f).numpy(), axis=-1, keepdims=True), getattr(v, f).numpy(), atol=1e-5), f
    # the patches are stored as the bits of their bfloat16 rounding, and come back as bfloat16 (on a
    # device that computes in it fast; see the next test)
    assert got.patches.dtype == (torch.bfloat16 if fast_bfloat16("cpu") else torch.float32)
    assert torch.equal(torch.from_numpy(idx.array("patches", np.arange(30))).view(torch.bfloat16),
                       unit.patches.to(torch.bfloat16))
    for f in ("frame_weights", "anomaly", "video_score", "patch_weights"):
        assert np.allclose(getattr(got, f).numpy(), getattr(v, f).numpy(), atol=1e-6), f
    for f in ("frame_mask", "anomalous", "patch_mask"):
        assert torch.equal(getattr(got, f), getattr(v, f)), f
    assert np.allclose(idx.array("vectors", np.arange(30)), model.video_vectors(v).numpy(), atol=1e-6)
    assert np.array_equal(idx.frame_time, times)
    # any order of positions, across chunks
    pos = np.array([29, 3, 17, 8, 8])
    assert torch.equal(idx.embed(pos, "cpu").frames, got.frames[pos])


def test_patches_come_as_float32_where_bfloat16_is_not_fast(planted, ckpt, monkeypatch):
    """A CPU without oneDNN bfloat16 kernels (or an MPS device) gets the same patches as float32."""
    import varcmp.retrieval.index as I

    model, _ = checkpoint.load(ckpt)
    with open_cache(planted) as c:
        idx, _ = open_index(model, c, CacheVideos(c.split("test")), ckpt, "cpu")
    monkeypatch.setattr(I, "fast_bfloat16", lambda device: True)
    fast = idx.embed(np.arange(30), "cpu")
    monkeypatch.setattr(I, "fast_bfloat16", lambda device: False)
    slow = idx.embed(np.arange(30), "cpu")
    assert fast.patches.dtype == torch.bfloat16 and slow.patches.dtype == torch.float32
    assert torch.equal(slow.patches, fast.patches.float()) and torch.equal(slow.frames, fast.frames)


def test_search_on_the_index_equals_the_exhaustive_ranking_of_fresh_encodings(planted, ckpt):
    """Both modes read the index; the hits are those of scoring freshly encoded raw features with
    `score_matrix`, in the same order, the scores within float16 rounding."""
    model, _ = checkpoint.load(ckpt)
    with open_cache(planted) as c:
        t = c.split("test").load_text()
    feats = {"word_feat": t.word_feat, "word_mask": t.word_mask, "sentence": t.sentence}
    total = score_matrix(model, fresh(model, planted), encode_queries(model, feats, "cpu"))["total"]  # [V, Q]
    for mode in ("exhaustive", "two-stage"):
        r = search_features(planted, ckpt, feats, top=3, device="cpu", mode=mode, candidates=30)
        assert r["splits"][0]["index"] is not None
        for qi, q in enumerate(r["queries"]):
            want = sorted(range(30), key=lambda row: (-total[row, qi], row))[:3]
            assert [h["row"] for h in q["hits"]] == want, (mode, qi)
            assert np.allclose([h["score"] for h in q["hits"]], total[want, qi], atol=HALF_TOL)
        planted_first = sum(q["hits"][0]["row"] == t.video_index[qi] for qi, q in enumerate(r["queries"]))
        assert planted_first >= 20, planted_first  # real rankings, not ties


def test_a_stale_index_is_rebuilt_never_used(planted, tmp_path):
    """Features extracted again under the same paths (the key cannot see it): the stored index no
    longer matches its first videos and is rebuilt, saying so; other weights get another index."""
    import zarr

    work = tmp_path / "c.zarr"
    shutil.copytree(planted, work, ignore=shutil.ignore_patterns(INDEX_DIR))
    ck = save_checkpoint(trained_like(seed=3), work, tmp_path / "run" / "best.safetensors")
    with open_cache(work) as c:
        t = c.split("test").load_text()
    feats = {"word_feat": t.word_feat[:2], "word_mask": t.word_mask[:2], "sentence": t.sentence[:2]}
    first = search_features(work, ck, feats, device="cpu")
    g = zarr.open_group(str(work), mode="r+", use_consolidated=False)
    g["test/videos/frame_feat"][0] = g["test/videos/frame_feat"][1]  # video 0 now looks like video 1
    with open_cache(work) as c:
        model, _ = checkpoint.load(ck)
        idx, info = open_index(model, c, CacheVideos(c.split("test")), ck, "cpu")
    assert info.built and "no longer matches the cache: rebuilt" in info.note
    assert np.array_equal(idx.array("frames", [0]), idx.array("frames", [1]))
    again = search_features(work, ck, feats, device="cpu")
    assert again["splits"][0]["index"]["built"] is False and again["queries"] != first["queries"]


KILLER = """
import sys

import varcmp.retrieval.index as I
from varcmp.cli.index import main

I.CHUNK_VIDEOS = 8
main(sys.argv[1:], prog_name="varcmp-index")
"""


def index_arrays(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("chunk-*/*.npy"))}


def test_kill_9_mid_build_then_the_same_command_gives_the_uninterrupted_index(planted, ckpt, tmp_path):
    script = tmp_path / "index.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    caches = {}
    for name, fault in (("whole", ""), ("killed", "index-chunk:3")):
        caches[name] = work = tmp_path / f"{name}.zarr"
        shutil.copytree(planted, work, ignore=shutil.ignore_patterns(INDEX_DIR))
        cmd = [sys.executable, str(script), str(work), "--checkpoint", str(ckpt), "--device", "cpu", "-q"]
        res = subprocess.run(cmd, env={**env, "VARCMP_FAULT": fault}, capture_output=True, text=True, timeout=300)
        if fault:
            assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
            folder, = (work / INDEX_DIR).glob("test.*")
            assert sorted(p.name for p in folder.iterdir() if p.name.startswith("chunk-")) == ["chunk-00000",
                                                                                              "chunk-00001"]
            assert not (folder / "index.json").exists() and list(folder.glob(".chunk-00002.*.tmp"))
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert "built 2 of 4 chunks" in res.stdout, res.stdout + res.stderr
        assert res.returncode == 0, res.stderr[-2000:]
    a, = (caches["whole"] / INDEX_DIR).glob("test.*")
    b, = (caches["killed"] / INDEX_DIR).glob("test.*")
    assert a.name == b.name and index_arrays(a) == index_arrays(b) and len(index_arrays(a)) == 4 * 12  # 10 VideoEmb parts, vectors, frame times
    assert not list(b.glob(".*.tmp"))
    ma, mb = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in ("built", "build_seconds")} == \
           {k: v for k, v in mb.items() if k not in ("built", "build_seconds")}


def test_varcmp_index_command(planted, ckpt, tmp_path):
    work = tmp_path / "c.zarr"
    shutil.copytree(planted, work, ignore=shutil.ignore_patterns(INDEX_DIR))
    run = lambda *a: CliRunner().invoke(index_main, [str(x) for x in a])  # noqa: E731
    r = run(work, "--checkpoint", ckpt.parent, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    folder, = (work / INDEX_DIR).glob("test.*")
    assert "test: 30 videos, built 1 of 1 chunks in" in r.output and str(folder) in r.output
    r = run(work, "--checkpoint", ckpt, "--device", "cpu")
    assert r.exit_code == 0 and "test: 30 videos, up to date" in r.output, r.output
    # a checkpoint of a cache of other encoders: one line, nothing built
    other = write_planted_cache(tmp_path / "other.zarr", {"test": 6}, seed=9)
    root = json.loads((other / "zarr.json").read_text())
    root["attributes"]["varcmp"]["encoders"]["clip"]["weights_hash"] = "sha256:retrained"
    (other / "zarr.json").write_text(json.dumps(root))
    foreign = save_checkpoint(trained_like(), other, tmp_path / "foreign" / "best.safetensors")
    before = sorted((work / INDEX_DIR).iterdir())
    one_line_error(run(work, "--checkpoint", foreign, "--device", "cpu"), str(foreign), "other encoders")
    assert sorted((work / INDEX_DIR).iterdir()) == before


def test_varcmp_eval_reads_a_matching_index_instead_of_encoding(planted, tmp_path, monkeypatch):
    """With a stored index of the checkpoint, evaluation encodes no video and ranks as the index's
    embeddings score; without one, or for an ablation the index does not hold, it encodes them."""
    import varcmp.evaluate as E

    work = tmp_path / "c.zarr"
    shutil.copytree(planted, work, ignore=shutil.ignore_patterns(INDEX_DIR))
    ck = save_checkpoint(trained_like(seed=8), work, tmp_path / "run" / "best.safetensors")
    kw = dict(split="test", device="cpu", bootstrap=0)
    fresh_run = E.evaluate_split(work, ck, **kw)
    assert fresh_run["index"] is None
    assert CliRunner().invoke(index_main, [str(work), "--checkpoint", str(ck), "--device", "cpu", "-q"]).exit_code == 0

    encoded, real = [], E.encode_videos

    def counting(*a, **k):  # the real encoding, counted
        encoded.append(1)
        return real(*a, **k)

    monkeypatch.setattr(E, "encode_videos", counting)
    on_index = E.evaluate_split(work, ck, **kw)
    folder, = (work / INDEX_DIR).glob("test.*")
    assert on_index["index"] == str(folder) and encoded == []
    for key, m in fresh_run["metrics"].items():  # float16 rounding does not move a planted ranking
        assert m == on_index["metrics"][key], key
    # the ranks are exactly those of the index's embeddings through the scoring engine
    model, _ = checkpoint.load(ck)
    with open_cache(work) as c:
        idx = open_index(model, c, CacheVideos(c.split("test")), ck, "cpu")[0]
        t = c.split("test").load_text()
    feats = {"word_feat": t.word_feat, "word_mask": t.word_mask, "sentence": t.sentence}
    total = score_matrix(model, idx.embed(np.arange(30), "cpu"), encode_queries(model, feats, "cpu"))["total"]
    r1 = 100 * np.mean([(total[:, q] >= total[t.video_index[q], q]).sum() == 1 for q in range(30)])
    assert on_index["metrics"]["t2v"]["r1"] == pytest.approx(r1)
    # an ablation the index does not hold (weighting off) encodes the videos
    off = E.evaluate_split(work, ck, anomaly_weighting=False, **kw)
    assert off["index"] is None and encoded


def test_a_cache_where_the_index_cannot_be_stored(planted, ckpt, tmp_path):
    """varcmp-index refuses in one line; a search builds the index in memory, says so, and finds the
    same hits as with a stored index."""
    work = tmp_path / "c.zarr"
    shutil.copytree(planted, work, ignore=shutil.ignore_patterns(INDEX_DIR))
    (work / INDEX_DIR).write_text("a file where the index folder would go (root ignores permissions)")
    r = CliRunner().invoke(index_main, [str(work), "--checkpoint", str(ckpt), "--device", "cpu", "-q"])
    one_line_error(r, f"{work / INDEX_DIR}: cannot store the index there")
    with open_cache(planted) as c:
        t = c.split("test").load_text()
    feats = {"word_feat": t.word_feat[:3], "word_mask": t.word_mask[:3], "sentence": t.sentence[:3]}
    memory = search_features(work, ckpt, feats, device="cpu")
    stored = search_features(planted, ckpt, feats, device="cpu")
    assert memory["splits"][0]["index"]["stored"] is False and memory["splits"][0]["index"]["path"] is None
    assert [[h["row"] for h in q["hits"]] for q in memory["queries"]] == \
           [[h["row"] for h in q["hits"]] for q in stored["queries"]]


def test_a_chunk_array_written_in_pieces_is_the_npy_of_their_concatenation():
    """`_save_pieces` (a chunk's per-batch pieces, never concatenated in memory) writes the bytes
    np.save writes for the whole array, for every dtype the index stores."""
    import io

    from varcmp.retrieval.index import _save_pieces

    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.int16, np.float32, bool):
        pieces = [rng.standard_normal((n, 4, 3)).astype(dtype) for n in (16, 16, 5)]
        got, want = io.BytesIO(), io.BytesIO()
        _save_pieces(got, pieces)
        np.save(want, np.concatenate(pieces))
        assert got.getvalue() == want.getvalue(), dtype
