import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import BAD, CAPTIONS, GOOD, noise_frames, tone
from helpers import ctrl_c_as_in_a_terminal
from varcmp.cache_schema import DONE, FAILED
from varcmp.cache.reader import open_cache
from varcmp.extract import main
from varcmp.media.video import read_frames
from varcmp.media.files import write_video


def extract(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, video_root, captions_xlsx, tiny_clip):
    out = tmp_path_factory.mktemp("caches") / "ucf.zarr"
    code, log = extract(video_root, "--out", out, "--annotations", captions_xlsx, "--split", "test",
                        "--clip-model", tiny_clip, "--workers", 1)
    return out, code, log


@pytest.fixture(scope="module")
def audio_cache(tmp_path_factory, video_root, tiny_clip, tiny_clap):
    out = tmp_path_factory.mktemp("caches") / "xd.zarr"
    code, log = extract(video_root, "--out", out, "--audio", "video", "--clip-model", tiny_clip,
                        "--clap-model", tiny_clap, "--workers", 0, "--frames", 8, "--audio-segments", 6)
    return out, code, log


def test_text_cache_shapes_dtypes_and_report(text_cache, video_root):
    out, code, log = text_cache
    assert code == 1  # something failed, and the exit code says so
    cache = open_cache(out)
    assert cache.spec.num_frames == 32 and cache.spec.num_patches == 49 and cache.spec.dim == 512
    s = cache.split("test")
    paths = s.paths.tolist()
    assert paths == [p for p in CAPTIONS]  # videos named by the caption file, in its order
    done = s.done_index()
    assert [paths[i] for i in done] == list(GOOD)
    v = s.load_videos()
    assert v.frame_feat.shape == (4, 32, 512) and v.frame_feat.dtype == np.float16
    assert v.patch_feat.shape == (4, 32, 49, 512) and v.patch_feat.dtype == np.float16
    assert v.frame_mask.sum(1).tolist() == [32, 32, 32, 12]  # the 12-frame video is masked, not padded with copies
    assert not v.frame_feat[3, 12:].any() and not v.patch_feat[3, 12:].any()
    assert v.labels.tolist() == [1, 1, 0, 1] and v.categories.tolist() == ["Abuse", "Fighting", "Normal", "Arson"]
    np.testing.assert_allclose(s.durations[done], [6.0, 3.0, 5.0, 1.2], atol=1e-6)
    # failures: recorded in the store with a reason, and named in the summary
    status, errors = s.status, s.errors
    i = paths.index("Abuse/notes.mp4")
    assert status[i] == FAILED and errors[i].startswith("not a readable media file")
    assert "failed Abuse/notes.mp4: not a readable media file" in log
    # caption rows: the path escaping the root is rejected, the missing video reported
    assert any("escapes" not in r and "points outside the video root" in r for r in s.attrs["rejected"])
    assert "rejected ucf_crime_test.xlsx row 7: path '../outside/evil.mp4' points outside the video root" in log
    assert "missing ucf_crime_test.xlsx row 8: video 'Abuse/Abuse999_x264.mp4' not found" in log


def test_stored_features_equal_the_model_outputs(text_cache, video_root, tiny_clip):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    out, _, _ = text_cache
    s = open_cache(out).split("test")
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")
    v = s.load_videos()
    for row, rel in enumerate(v.paths):
        frames = read_frames(video_root / rel, 32)
        pixels = proc(images=frames.images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            cls = model.get_image_features(pixel_values=pixels).pooler_output
            hidden = model.vision_model(pixel_values=pixels).last_hidden_state
            patches = model.visual_projection(model.vision_model.post_layernorm(hidden))[:, 1:]
        k = len(frames.images)
        np.testing.assert_allclose(v.frame_feat[row, :k].astype(np.float32), cls.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(v.patch_feat[row, :k].astype(np.float32), patches.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(v.frame_time[row, :k], frames.times, atol=1e-6)

    t = s.load_text()
    assert t.text.tolist() == list(CAPTIONS.values()) and t.done.all()
    assert t.video_index.tolist() == list(range(len(CAPTIONS)))
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    enc = tok(t.text.tolist(), padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        sent = model.get_text_features(**enc).pooler_output
    np.testing.assert_allclose(t.sentence.astype(np.float32), sent.numpy(), rtol=2e-3, atol=2e-3)
    # the character-level tokenizer makes one token per non-blank character, plus start and end
    expected = [min(len("".join(x.split())) + 2, 32) for x in t.text]
    assert t.word_mask.sum(1).tolist() == expected
    assert t.word_mask[:, 0].all()  # masks are prefix masks
    assert all(m[: n].all() and not m[n:].any() for m, n in zip(t.word_mask, expected))


def test_audio_cache(audio_cache, video_root, tiny_clap):
    from transformers import ClapFeatureExtractor, ClapModel

    from varcmp.media.audio import audio_windows, read_audio

    out, code, log = audio_cache
    assert code == 1
    cache = open_cache(out)
    assert cache.spec.audio_segments == 6 and cache.encoders["clap"]["name"] == str(tiny_clap)
    s = cache.split("train")
    assert sorted(s.paths.tolist()) == sorted(list(GOOD) + list(BAD))  # no caption file: every video
    v = s.load_videos()
    assert v.audio_feat.shape == (4, 6, 512) and v.audio_feat.dtype == np.float16
    by_path = {p: i for i, p in enumerate(v.paths)}
    no_audio = by_path["Normal_Videos_event/Normal_Videos_003_x264.mp4"]
    assert not v.audio_mask[no_audio].any() and not v.audio_feat[no_audio].any()
    assert "no audio track" in s.notes[v.index[no_audio]]
    model = ClapModel.from_pretrained(tiny_clap).eval()
    fe = ClapFeatureExtractor.from_pretrained(tiny_clap)
    for rel in ("Abuse/Abuse001_x264.mp4", "Arson/Arson 04 café_x264.mp4"):
        row = by_path[rel]
        samples, offset = read_audio(video_root / rel)
        win = audio_windows(samples, offset, float(s.durations[v.index[row]]), 6)
        assert v.audio_mask[row].tolist() == win.mask.tolist() and win.mask.any()
        feats = fe(win.windows, sampling_rate=48000, return_tensors="pt")["input_features"]
        with torch.no_grad():
            ref = model.get_audio_features(input_features=feats, is_longer=torch.zeros(len(feats), 1, dtype=torch.bool))
        np.testing.assert_allclose(v.audio_feat[row][win.mask].astype(np.float32), ref.pooler_output.numpy(),
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(v.audio_time[row], win.spans, atol=1e-6)
    reasons = dict(zip(s.paths.tolist(), s.errors.tolist()))
    for rel, why in BAD.items():
        assert reasons[rel].startswith(why), (rel, reasons[rel])


def test_rerun_finishes_nothing_twice_and_overwrite_starts_over(text_cache, video_root, captions_xlsx, tiny_clip):
    out, _, _ = text_cache
    chunk = out / "test" / "videos" / "patch_feat" / "c" / "0" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    code, log = extract(video_root, "--out", out, "--annotations", captions_xlsx, "--split", "test",
                        "--clip-model", tiny_clip, "--workers", 0)
    assert code == 1, log
    assert chunk.stat().st_mtime_ns == before  # a finished video is not extracted again
    assert open_cache(out).split("test").status.tolist().count(DONE) == 4


def test_redo_extracts_a_damaged_video_again_and_nothing_else(text_cache, video_root, captions_xlsx, tiny_clip,
                                                               tmp_path):
    """The damaged-cache error says: run the same command with --redo VIDEO. That video alone is
    extracted again, and the store is whole again."""
    import zarr

    from varcmp.cache_schema import DamagedCacheError

    src, _, _ = text_cache
    out = tmp_path / "copy.zarr"
    shutil.copytree(src, out)
    s = open_cache(out).split("test")
    row = int(s.done_index()[1])
    path, want = s.paths[row], s.load_videos()
    zarr.open_group(str(out), mode="r+", use_consolidated=False)["test/videos/frame_feat"][row, 3, 5] = np.nan
    with pytest.raises(DamagedCacheError, match=rf"video {re.escape(path)} .*--redo"):
        open_cache(out).split("test").load_videos()
    other = out / "test" / "videos" / "patch_feat" / "c" / str(int(s.done_index()[0])) / "0" / "0" / "0"
    before = other.stat().st_mtime_ns
    args = (video_root, "--out", out, "--annotations", captions_xlsx, "--split", "test", "--clip-model", tiny_clip,
            "--workers", 0)
    code, log = extract(*args, "--redo", path)
    assert code == 1, log  # the fixture's broken files are still failed
    got = open_cache(out).split("test").load_videos()
    for key in ("frame_feat", "patch_feat", "frame_mask", "frame_time"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert other.stat().st_mtime_ns == before  # the other videos were not extracted again
    code, log = extract(*args, "--redo", "Abuse/nowhere.mp4")
    assert code == 2 and "--redo Abuse/nowhere.mp4: not a video of split 'test'" in log, log


def test_second_split_adds_to_the_store_and_hdf5_matches_zarr(tmp_path, video_root, captions_csv, tiny_clip):
    z, h = tmp_path / "c.zarr", tmp_path / "c.h5"
    for out in (z, h):
        assert extract(video_root, "--out", out, "--annotations", captions_csv, "--split", "test",
                       "--clip-model", tiny_clip, "--workers", 0)[0] == 1
    code, _ = extract(video_root / "Fighting", "--out", z, "--split", "train", "--clip-model", tiny_clip, "--workers", 0)
    assert code == 0
    cz, ch = open_cache(z), open_cache(h)
    assert cz.splits == ["test", "train"] and ch.splits == ["test"]
    assert cz.split("train").paths.tolist() == ["Fighting002_x264.mp4"]
    a, b = cz.split("test").load_videos(), ch.split("test").load_videos()
    for key in ("frame_feat", "patch_feat", "frame_mask", "frame_time", "labels"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.paths.tolist() == b.paths.tolist()
    np.testing.assert_array_equal(cz.split("test").load_text().sentence, ch.split("test").load_text().sentence)
    # a different model into the same store is refused with a clear message
    from varcmp.encoders.tiny import make_tiny_clip

    other = make_tiny_clip(tmp_path / "other", seed=1)
    code, log = extract(video_root, "--out", z, "--split", "x", "--clip-model", other, "--workers", 0)
    assert code == 2 and "was extracted with other encoders" in log and "\n" not in log.strip()
    code, log = extract(video_root, "--out", z, "--split", "x", "--clip-model", tiny_clip, "--workers", 0, "--frames", 8)
    assert code == 2 and "was extracted with other spec (num_frames: 32 stored, 8 now)" in log


def test_shards_fill_one_store_like_a_single_run(tmp_path, video_root, captions_csv, tiny_clip):
    single, sharded = tmp_path / "single.zarr", tmp_path / "sharded.zarr"
    args = ["--annotations", captions_csv, "--clip-model", tiny_clip, "--workers", 0, "--frames", 8]
    extract(video_root, "--out", single, *args)
    for i in range(2):
        extract(video_root, "--out", sharded, *args, "--num-shards", 2, "--shard-index", i)
    assert_same_split(single, sharded, "train")


def assert_same_split(a_path, b_path, split):
    a, b = open_cache(a_path).split(split), open_cache(b_path).split(split)
    np.testing.assert_array_equal(a.status, b.status)
    va, vb = a.load_videos(), b.load_videos()
    for key in ("frame_feat", "patch_feat", "frame_mask", "frame_time", "audio_feat", "audio_mask"):
        np.testing.assert_array_equal(getattr(va, key), getattr(vb, key))
    assert a.errors.tolist() == b.errors.tolist()
    if a.has_text:
        ta, tb = a.load_text(), b.load_text()
        np.testing.assert_array_equal(ta.word_feat, tb.word_feat)
        np.testing.assert_array_equal(ta.done, tb.done)


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_killed_mid_run_resumes_to_the_same_store(tmp_path, tiny_clip, sig, code):
    """kill -9, or Ctrl-C (which exits 130 after saving what is finished)."""
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(14):
        write_video(root / f"Abuse{i:03d}_x264.mp4", noise_frames(40, seed=100 + i), fps=10, audio=tone(4.0, 300 + 20 * i))
    args = ["--clip-model", str(tiny_clip), "--workers", "0", "--frames", "32"]
    ref = tmp_path / "ref.zarr"
    assert extract(root, "--out", ref, *args)[0] == 0
    killed = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "varcmp.extract", str(root), "--out", str(killed), *args]
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
                                preexec_fn=ctrl_c_as_in_a_terminal)
        status = None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                status = open_cache(killed).split("train", incomplete="ignore").status
            except Exception:  # noqa: BLE001 - the store may not exist yet
                status = None
            if status is not None and (status == DONE).sum() >= 2:
                proc.send_signal(sig)
                break
            time.sleep(0.01)
        proc.wait()
        after = open_cache(killed).split("train", incomplete="ignore").status
        if proc.returncode == code and (after != DONE).any():
            break
        shutil.rmtree(killed)  # the run finished before the kill: try again
    else:
        pytest.fail("could not kill the run before it finished")
    assert 2 <= (after == DONE).sum() < 14
    code, log = extract(root, "--out", killed, *args)
    assert code == 0
    assert f"{int((after == DONE).sum())}" in log
    assert_same_split(ref, killed, "train")


def test_bad_arguments_are_one_line_errors(tmp_path, video_root, tiny_clip):
    for workers in (0, 1):
        code, log = extract(video_root, "--out", tmp_path / "c.zarr", "--clip-model", tmp_path / "nowhere",
                            "--workers", workers)
        assert code == 2 and f"--clip-model {tmp_path / 'nowhere'}: no such directory" in log, log
    empty = tmp_path / "empty_model"
    empty.mkdir()
    code, log = extract(video_root, "--out", tmp_path / "c.zarr", "--clip-model", empty, "--workers", 1)
    assert code == 2 and f"cannot load CLIP from '{empty}'" in log and "no config.json" in log, log
    assert "hub id" not in log and len(log.strip().splitlines()) == 1
    (empty / "config.json").write_text((tiny_clip / "config.json").read_text())
    code, log = extract(video_root, "--out", tmp_path / "c.zarr", "--clip-model", empty, "--workers", 1)
    assert code == 2 and f"cannot load CLIP from '{empty}'" in log and "no file named model.safetensors" in log, log
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    code, log = extract(video_root, "--out", tmp_path / "junk", "--clip-model", tiny_clip, "--workers", 0)
    assert code == 2 and "exists and is not a varcmp cache" in log
    code, log = extract(tmp_path / "junk", "--out", tmp_path / "d.zarr", "--clip-model", tiny_clip)
    assert code == 2 and "no videos to extract" in log


def test_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for opt in ("--annotations", "--split", "--audio", "--clip-model", "--clap-model", "--frames", "--max-words",
                "--audio-segments", "--batch-size", "--device", "--workers", "--overwrite", "--num-shards"):
        assert opt in result.output


def test_audio_from_a_folder_of_files_named_by_video_stem(tmp_path, video_root, tiny_clip, tiny_clap):
    import av

    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    samples = tone(3.0, 500).reshape(1, -1)
    with av.open(str(audio_dir / "Fighting002_x264.wav"), "w") as c:  # the stem of Fighting/Fighting002_x264.mp4
        s = c.add_stream("pcm_s16le", rate=48000)
        s.layout = "mono"
        fr = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16), format="s16", layout="mono")
        fr.sample_rate = 48000
        for p in s.encode(fr):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = tmp_path / "c.zarr"
    code, log = extract(video_root / "Fighting", "--out", out, "--audio", audio_dir, "--clip-model", tiny_clip,
                        "--clap-model", tiny_clap, "--workers", 0, "--frames", 8, "--audio-segments", 4)
    assert code == 0, log
    v = open_cache(out).split("train").load_videos()
    assert v.paths.tolist() == ["Fighting002_x264.mp4"] and v.audio_mask[0].all() and v.audio_feat[0].any()
    # a video whose folder has no file of its stem: recorded, not fatal
    code, log = extract(video_root / "Arson", "--out", tmp_path / "d.zarr", "--audio", audio_dir,
                        "--clip-model", tiny_clip, "--clap-model", tiny_clap, "--workers", 0, "--frames", 8,
                        "--audio-segments", 4)
    s = open_cache(tmp_path / "d.zarr").split("train")
    assert code == 0 and s.notes.tolist() == ["no audio file"]
    assert not s.load_videos().audio_mask.any()
