"""Bad (or unusual) media, issue 13: rotated phone videos, raw elementary streams without
timestamps, sparse frame times, the audio mix-down, and the per-video notes of the batch job."""

from __future__ import annotations

import av
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import noise_frames, tone
from test_bad_input import all_frames, write_vfr
from varcmp.cache_schema import DONE, ROOT_KEY
from varcmp.cache.writer import CacheWriter
from varcmp.cache.reader import open_cache
from varcmp.extract import main
from varcmp.media.audio import AUDIO_RATE, read_audio
from varcmp.media.video import read_frames, sample_times
from varcmp.media.files import write_video
from varcmp.retrieval.search import read_query_audio

H, W = 48, 64


def extract(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


# --------------------------------------------------------------------------
# Rotation: the frame as a viewer shows it


def corner_frame() -> np.ndarray:
    """Dark, with a bright square in the top-left corner: every quarter turn looks different."""
    img = np.full((H, W, 3), 16, np.uint8)
    img[:16, :16] = 240
    return img


def write_rotated(path, degrees: int, n: int = 5) -> None:
    """An mp4 whose display matrix turns the picture `degrees` counter-clockwise (a phone writes
    -90, i.e. 270, for a portrait video: its `rotate=90` tag)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.set_display_rotation(degrees)
        for _ in range(n):
            for p in v.encode(av.VideoFrame.from_ndarray(corner_frame(), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)


def bright_corner(img: np.ndarray) -> str:
    h, w = img.shape[0] // 2, img.shape[1] // 2
    quarters = {"top-left": img[:h, :w], "top-right": img[:h, w:], "bottom-left": img[h:, :w],
                "bottom-right": img[h:, w:]}
    return max(quarters, key=lambda k: quarters[k].mean())


@pytest.mark.parametrize("degrees, shape, corner", [
    (0, (H, W), "top-left"),
    (90, (W, H), "bottom-left"),  # a quarter turn counter-clockwise
    (180, (H, W), "bottom-right"),
    (270, (W, H), "top-right"),  # a quarter turn clockwise: a phone held upright
])
def test_rotated_video_is_read_as_a_viewer_shows_it(tmp_path, degrees, shape, corner):
    path = tmp_path / f"rot{degrees}.mp4"
    write_rotated(path, degrees)
    assert bright_corner(all_frames(path)[0][1]) == "top-left"  # stored unrotated, as phones do
    got = read_frames(path, 4)
    assert len(got.images) == 4
    for img in got.images:
        assert img.shape[:2] == shape and bright_corner(img) == corner
    seen = []  # the extraction's per-frame preprocessing gets the upright frame too
    read_frames(path, 2, lambda img: seen.append((img.shape[:2], bright_corner(img))))
    assert seen == [(shape, corner)] * 2


# --------------------------------------------------------------------------
# A raw elementary stream (no container, no timestamps) named .mp4


def write_elementary(path, codec: str, fmt: str, n: int = 30, fps: int = 25) -> None:
    with av.open(str(path), "w", format=fmt) as c:
        v = c.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        for img in noise_frames(n, seed=21, h=H, w=W):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)


@pytest.mark.parametrize("codec, fmt", [("libx264", "h264"), ("libx265", "hevc")])
@pytest.mark.parametrize("n", [8, 64])
def test_raw_stream_without_timestamps_is_timed_by_its_rate(tmp_path, codec, fmt, n):
    path = tmp_path / "camera.mp4"
    write_elementary(path, codec, fmt, 30, 25)
    ref = all_frames(path)
    assert len(ref) == 30 and all(t is None for t, _ in ref)  # it decodes, but nothing carries a time
    got = read_frames(path, n)
    assert got.total_frames == 30 and got.fps == pytest.approx(25)
    assert got.duration == pytest.approx(30 / 25)
    want = np.unique(np.floor(sample_times(30 / 25, n) * 25 + 1e-9).astype(int))  # frame k shows from k/25 s
    np.testing.assert_allclose(got.times, want / 25, atol=1e-9)
    assert len(got.images) == len(want) == min(n, 30)
    for k, img in zip(want, got.images):
        np.testing.assert_array_equal(img, ref[k][1])


# --------------------------------------------------------------------------
# Duration: the end of the last frame, not the typical gap between frames


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_sparse_video_lasts_until_its_last_frame_ends(tmp_path, ext):
    path = tmp_path / f"sparse.{ext}"
    write_vfr(path, [0, 3_600_000, 36_000_000], gop=2)  # frames at 0 s, 1 h and 10 h
    got = read_frames(path, 8)
    assert got.total_frames == 3
    assert got.duration == pytest.approx(36_000 + 1 / 25, abs=1e-6)  # the last frame is shown for 1/25 s
    # the frame on screen at each segment centre
    np.testing.assert_allclose(got.times, [0, 3600])
    assert got.fps == pytest.approx(3 / got.duration)


# --------------------------------------------------------------------------
# Audio mix-down: the mean of the channels (as CLAP's own loader, librosa mono=True)


def channel_tones(channels: int, seconds: float = 1.0) -> np.ndarray:
    return np.stack([tone(seconds, 200 + 150 * c) * (1.0 - 0.12 * c) for c in range(channels)])


def write_pcm(path, planes: np.ndarray, layout: str, rate: int = AUDIO_RATE) -> None:
    """Lossless float PCM, so that the decoded channels are exactly `planes`."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_f32le", rate=rate, layout=layout)
        for k in range(0, planes.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, k:k + 1024]), format="fltp", layout=layout)
            fr.sample_rate, fr.pts = rate, k
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("layout, channels", [("stereo", 2), ("5.1", 6)])
def test_audio_is_mixed_down_as_the_mean_of_its_channels(tmp_path, layout, channels):
    planes = channel_tones(channels)
    path = tmp_path / f"{layout}.wav"
    write_pcm(path, planes, layout)
    with av.open(str(path)) as c:
        assert c.streams.audio[0].codec_context.channels == channels
    hand = planes.astype(np.float64).sum(0) / channels
    samples, offset = read_audio(path)
    assert offset == 0 and samples.shape == hand.shape
    np.testing.assert_allclose(samples, hand, atol=1e-6)
    # search encodes an audio query with the same reader, so with the same mix
    (window,) = read_query_audio(path, 1)["windows"]  # one window: the whole 1 s clip
    np.testing.assert_allclose(window, hand, atol=1e-6)


def test_store_of_the_old_mix_down_is_refused_in_one_line(tmp_path, tiny_clip, tiny_clap):
    root = tmp_path / "videos"
    root.mkdir()
    write_video(root / "a.mp4", noise_frames(10, seed=1), fps=10, audio=tone(1.0, 300))
    out = tmp_path / "c.zarr"
    args = [root, "--out", out, "--audio", "video", "--clip-model", tiny_clip, "--clap-model", tiny_clap,
            "--workers", 0, "--frames", 4, "--audio-segments", 2]
    code, log = extract(*args)
    assert code == 0, log
    w = CacheWriter.open(out)
    meta = w.store.get_attrs("")[ROOT_KEY]
    audio = meta["preprocessing"]["audio"]
    assert audio.startswith("mean of the channels")
    # a store written before: FFmpeg's `mono` layout (0.707 (L + R) + C ...)
    meta["preprocessing"]["audio"] = "mono 48000 Hz;" + audio.split(";", 1)[1]
    w.store.set_attrs("", {ROOT_KEY: meta})
    w.finish()
    code, log = extract(*args)
    line = log.strip()
    assert code == 2 and "\n" not in line, log
    assert line.startswith(f"error: {out}: was extracted with other preprocessing (audio: 'mono 48000 Hz;")
    assert "--overwrite" in line


# --------------------------------------------------------------------------
# Per-video notes: in the store, in the report, counted


NOTES = {  # video -> (its audio file, the note it gets)
    "unreadable.mp4": ("unreadable.wav", "audio unreadable (not a readable media file"),
    "no_file.mp4": (None, "no audio file"),
    "no_track.mp4": ("no_track.m4a", "no audio track"),
    "short.mp4": ("short.wav", "audio too short: covers 1 of 4 windows"),
}


def test_audio_notes_are_recorded_reported_and_counted(tmp_path, tiny_clip, tiny_clap):
    root, audio = tmp_path / "videos", tmp_path / "audio"
    root.mkdir()
    audio.mkdir()
    for i, name in enumerate(NOTES):
        write_video(root / name, noise_frames(40, seed=i), fps=10)  # 4 s each
    (audio / "unreadable.wav").write_text("not a sound\n" * 40)
    write_video(audio / "no_track.m4a", noise_frames(5, seed=9), fps=10)  # a container without audio
    write_pcm(audio / "short.wav", tone(0.6, 440).reshape(1, -1), "mono")  # 0.6 s of a 4 s video
    code, log = extract(root, "--out", tmp_path / "c.zarr", "--audio", audio, "--clip-model", tiny_clip,
                        "--clap-model", tiny_clap, "--workers", 0, "--frames", 4, "--audio-segments", 4)
    assert code == 0, log  # notes are not failures: every video is extracted
    s = open_cache(tmp_path / "c.zarr").split("train")
    assert (s.status == DONE).all()
    lines = log.splitlines()
    for name, (_, note) in NOTES.items():
        stored = s.notes[s.paths.tolist().index(name)]
        assert stored.startswith(note), stored
        assert f"note {name}: {stored}" in lines, log
    assert "notes: 1 audio too short, 1 audio unreadable, 1 no audio file, 1 no audio track" in lines, log
    v = s.load_videos()
    assert {p: int(m.sum()) for p, m in zip(v.paths, v.audio_mask)} == {n: int(n == "short.mp4") for n in NOTES}
