"""Bad (or unusual) media, issue 13: rotated phone videos, raw elementary streams without
timestamps, sparse frame times, the audio mix-down, and the per-video notes of the batch job."""

from __future__ import annotations

import av
import numpy as np
import pytest

from conftest import noise_frames
from test_bad_input import all_frames, write_vfr
from varcmp.media import read_frames, sample_times

H, W = 48, 64


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
