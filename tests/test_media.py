import os

import av
import numpy as np
import pytest

from conftest import noise_frames, tone
from varcmp.media.audio import AUDIO_RATE, audio_windows, read_audio
from varcmp.media.video import MediaError, read_frames, sample_times
from varcmp.media.files import find_videos, write_video


def all_frames(path):
    with av.open(str(path)) as c:
        return [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def test_sample_times_are_segment_centres():
    np.testing.assert_allclose(sample_times(8.0, 4), [1.0, 3.0, 5.0, 7.0])


@pytest.mark.parametrize("gop", [2, 250])  # short GOP: seeks; long GOP: decodes straight on
def test_read_frames_picks_the_frame_on_screen_at_each_sample_time(tmp_path, gop):
    n, fps = 97, 10
    path = tmp_path / "v.mp4"
    write_video(path, noise_frames(n, seed=1), fps=fps, gop=gop)
    ref = all_frames(path)
    got = read_frames(path, 16)
    assert got.total_frames == n and got.duration == pytest.approx(n / fps)
    want = [int(np.floor(t * fps)) for t in sample_times(n / fps, 16)]
    assert len(got.images) == 16
    np.testing.assert_allclose(got.times, [ref[k][0] for k in want])
    for k, img in zip(want, got.images):
        np.testing.assert_array_equal(img, ref[k][1])


def test_short_video_yields_each_frame_once(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, noise_frames(5, seed=2), fps=10)
    got = read_frames(path, 32)
    ref = all_frames(path)
    assert len(got.images) == 5
    for (t, img), gt, gimg in zip(ref, got.times, got.images):
        assert gt == pytest.approx(t)
        np.testing.assert_array_equal(gimg, img)


def test_bad_files_give_one_line_reasons(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello\n" * 100)
    for name, why in [("zero.mp4", "empty file"), ("text.mp4", "not a readable media file"),
                      ("missing.mp4", "cannot read file")]:
        with pytest.raises(MediaError, match=why) as e:
            read_frames(tmp_path / name, 8)
        assert "\n" not in str(e.value)


def test_read_audio_is_mono_48k(tmp_path):
    path = tmp_path / "a.mp4"
    write_video(path, noise_frames(20, seed=3), fps=10, audio=tone(2.0, 440))
    samples, offset = read_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / AUDIO_RATE - 2.0) < 0.1
    # the tone survives: its dominant frequency is 440 Hz
    spec = np.abs(np.fft.rfft(samples[AUDIO_RATE // 2: AUDIO_RATE // 2 + AUDIO_RATE]))
    assert abs(np.argmax(spec) - 440) <= 2
    assert abs(offset) < 0.1
    silent = tmp_path / "v.mp4"
    write_video(silent, noise_frames(10, seed=3), fps=10)
    assert read_audio(silent) is None


def test_audio_windows_follow_the_design_rule():
    rate = 1000
    samples = np.ones(60 * rate, np.float32)  # one minute of "sound"
    w = audio_windows(samples, 0.0, 60.0, 4, rate)  # duration/N = 15 s -> clamped to 10 s
    assert w.mask.all()
    np.testing.assert_allclose(w.spans, [[2.5, 12.5], [17.5, 27.5], [32.5, 42.5], [47.5, 57.5]])
    assert all(len(x) == 10 * rate for x in w.windows)
    w = audio_windows(samples[: 3 * rate], 0.0, 3.0, 6, rate)  # 0.5 s -> clamped to 1 s, shifted inside
    np.testing.assert_allclose(w.spans[0], [0.0, 1.0])
    np.testing.assert_allclose(w.spans[-1], [2.0, 3.0])
    # audio that stops half-way: the windows whose centre has no audio are masked
    w = audio_windows(samples[: 30 * rate], 0.0, 60.0, 4, rate)
    assert w.mask.tolist() == [True, True, False, False] and len(w.windows) == 2
    assert "2 of 4" in w.note
    assert audio_windows(None, 0.0, 10.0, 4, rate).note == "no audio track"
    assert audio_windows(np.zeros(10 * rate, np.float32), 0.0, 10.0, 4, rate).note == "silent audio track"


def test_find_videos_survives_a_symlink_loop(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.mp4").write_bytes(b"0")
    (tmp_path / "a" / "notes.txt").write_text("x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    assert find_videos(tmp_path) == ["a/b/x.mp4"]
