import json

import numpy as np
import pytest

from varcmp.cache_schema import DONE, FAILED, PENDING, SCHEMA_VERSION, CacheError, CacheSpec, DamagedCacheError, QueryEntry, VideoEntry, VideoFeatures
from varcmp.cache.writer import CacheWriter
from varcmp.cache.reader import open_cache

SPEC = CacheSpec(num_frames=4, num_patches=3, dim=8, max_words=5, audio_segments=2, audio_dim=6)
ENC = {"clip": {"name": "tiny-clip", "config_hash": "sha256:1"}, "clap": {"name": "tiny-clap", "config_hash": "sha256:2"}}
PRE = {"frames": "uniform"}


def feats(seed: int, valid: int = 4) -> VideoFeatures:
    rng = np.random.default_rng(seed)
    mask = np.arange(4) < valid
    return VideoFeatures(
        duration=3.5, fps=25.0, frame_time=np.linspace(0, 3, 4).astype(np.float32), frame_mask=mask,
        frame_feat=rng.standard_normal((4, 8)).astype(np.float32), patch_feat=rng.standard_normal((4, 3, 8)).astype(np.float32),
        audio_feat=rng.standard_normal((2, 6)).astype(np.float32), audio_mask=np.array([True, False]),
        audio_time=np.array([[0, 1], [0, 0]], np.float32), note="hello")


def build(path):
    w = CacheWriter(path, SPEC, ENC, PRE)
    videos = [VideoEntry("a/x y é.mp4", 1, "Abuse"), VideoEntry("n.mp4", 0, "Normal"), VideoEntry("bad.mp4", 1, "")]
    queries = [QueryEntry("a man", 0, 2), QueryEntry("nothing", 1, 3)]
    sw = w.split("test", videos, queries, {"root": "/data"})
    sw.write_video(0, feats(0))
    sw.write_video(1, feats(1, valid=2))
    sw.fail_video(2, "empty file (0 bytes)")
    sw.write_text(0, np.ones((2, 5, 8), np.float32), np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], bool), np.ones((2, 8)))
    w.finish()


@pytest.mark.parametrize("name", ["c.zarr", "c.h5"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    build(path)
    c = open_cache(path)
    assert c.spec == SPEC and c.encoders == ENC and c.splits == ["test"]
    s = c.split("test")
    assert s.paths.tolist() == ["a/x y é.mp4", "n.mp4", "bad.mp4"]
    assert s.labels.tolist() == [1, 0, 1] and s.categories.tolist() == ["Abuse", "Normal", ""]
    assert s.status.tolist() == [DONE, DONE, FAILED]
    assert s.errors.tolist() == ["", "", "empty file (0 bytes)"]
    assert s.attrs == {"root": "/data"}
    v = s.load_videos()
    assert v.index.tolist() == [0, 1]
    assert v.frame_feat.dtype == np.float16 and v.patch_feat.shape == (2, 4, 3, 8)
    np.testing.assert_array_equal(v.frame_feat[1], feats(1).frame_feat.astype(np.float16))
    assert v.frame_mask[1].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(v.audio_mask[0], [True, False])
    t = s.load_text()
    assert t.text.tolist() == ["a man", "nothing"] and t.video_index.tolist() == [0, 1] and t.done.all()
    assert t.word_mask.sum(1).tolist() == [2, 3]
    one = s.load_videos([1], patches=False, audio=False)
    assert one.patch_feat is None and one.paths.tolist() == ["n.mp4"]


def test_reopen_resumes_and_refuses_other_inputs(tmp_path):
    path = tmp_path / "c.zarr"
    build(path)
    w = CacheWriter(path, SPEC, ENC, PRE)
    videos = [VideoEntry("a/x y é.mp4", 1, "Abuse"), VideoEntry("n.mp4", 0, "Normal"), VideoEntry("bad.mp4", 1, "")]
    queries = [QueryEntry("a man", 0, 2), QueryEntry("nothing", 1, 3)]
    sw = w.split("test", videos, queries)
    assert sw.video_status().tolist() == [DONE, DONE, FAILED]  # nothing lost on reopening
    with pytest.raises(CacheError, match="different list of videos"):
        w.split("test", videos[:2], queries)
    with pytest.raises(CacheError, match="other captions"):
        w.split("test", videos, queries[:1])
    train = w.split("train", videos[:1], None)  # a second split beside the first
    assert train.video_status().tolist() == [PENDING]
    w.finish()
    assert open_cache(path).splits == ["test", "train"]
    # the same encoders under another name (a local copy of a hub checkpoint) are welcome
    CacheWriter(path, SPEC, {k: {**v, "name": "/models/" + v["name"]} for k, v in ENC.items()}, PRE).finish()
    with pytest.raises(CacheError, match="other encoders"):
        CacheWriter(path, SPEC, {**ENC, "clip": {"name": "other", "config_hash": "sha256:9"}}, PRE)
    with pytest.raises(CacheError, match="other spec"):
        CacheWriter(path, CacheSpec(num_frames=8, num_patches=3, dim=8, max_words=5, audio_segments=2, audio_dim=6), ENC, PRE)


def _set_root_attr(path, **change):
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["varcmp"].update(change)
    meta.pop("consolidated_metadata", None)
    meta_file.write_text(json.dumps(meta))


def test_wrong_version_missing_arrays_and_bad_dims_are_clear_errors(tmp_path):
    path = tmp_path / "c.zarr"
    build(path)
    _set_root_attr(path, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(CacheError, match="newer than this varcmp"):
        open_cache(path)
    _set_root_attr(path, schema_version=0)
    with pytest.raises(CacheError, match="schema 0 is not supported"):
        open_cache(path)

    path = tmp_path / "d.zarr"
    build(path)
    import shutil

    shutil.rmtree(path / "test" / "videos" / "patch_feat")
    (path / "zarr.json").write_text(json.dumps({k: v for k, v in json.loads((path / "zarr.json").read_text()).items()
                                                if k != "consolidated_metadata"}))
    with pytest.raises(CacheError, match="missing array 'videos/patch_feat'"):
        open_cache(path)

    path = tmp_path / "e.zarr"
    build(path)
    _set_root_attr(path, spec={**SPEC.__dict__, "dim": 16})
    with pytest.raises(CacheError, match=r"'test/videos/frame_feat' has shape \(3, 4, 8\), expected \(3, 4, 16\)"):
        open_cache(path)


def test_not_a_cache(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(CacheError, match="not a varcmp cache|cannot be opened"):
        open_cache(tmp_path / "junk")
    with pytest.raises(CacheError, match="exists and is not a varcmp cache"):
        CacheWriter(tmp_path / "junk", SPEC, ENC, PRE)
    with pytest.raises(CacheError, match="no such cache"):
        open_cache(tmp_path / "nothing.zarr")
    build(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match=r"no split 'train' \(splits: test\)"):
        open_cache(tmp_path / "c.zarr").split("train")


@pytest.mark.parametrize("name", ["c.zarr", "c.h5"])
def test_read_rows_in_any_order_checked_and_named(tmp_path, name):
    """Split.read: rows in any order with repeats, by name; a NaN names the video (video keys) or
    the caption (text keys) it belongs to, and the store."""
    path = tmp_path / name
    build(path)
    with open_cache(path) as c:
        s = c.split("test")
        got = s.read(["videos/frame_feat", "videos/frame_mask"], [1, 0, 1])
        assert sorted(got) == ["frame_feat", "frame_mask"]
        np.testing.assert_array_equal(got["frame_feat"], np.asarray(s.array("videos/frame_feat")[:])[[1, 0, 1]])
        assert got["frame_mask"].sum(1).tolist() == [2, 4, 2]

    w = CacheWriter(path, SPEC, ENC, PRE)
    sw = w.split("test", [VideoEntry("a/x y é.mp4", 1, "Abuse"), VideoEntry("n.mp4", 0, "Normal"),
                          VideoEntry("bad.mp4", 1, "")], [QueryEntry("a man", 0, 2), QueryEntry("nothing", 1, 3)])
    bad = feats(1, valid=2)
    bad.frame_feat[0, 0] = np.nan
    sw.write_video(1, bad)
    sw.write_text(0, np.full((2, 5, 8), np.inf, np.float32), np.ones((2, 5), bool), np.ones((2, 8)))
    w.finish()
    s = open_cache(path).split("test")
    with pytest.raises(DamagedCacheError, match=r"video n\.mp4 \(row 1 of split 'test'\): its videos/frame_feat "
                                                r"holds NaN or infinite values"):
        s.read(["videos/frame_feat"], [0, 1])
    with pytest.raises(DamagedCacheError, match=r"caption 1 \('nothing', video n\.mp4\) of split 'test': its "
                                                r"text/word_feat holds NaN"):
        s.read(["text/word_feat"], [1])
    with pytest.raises(DamagedCacheError, match="row 1 read by the test"):
        s.read(["videos/frame_feat"], [1], lambda r: f"row {r} read by the test")
