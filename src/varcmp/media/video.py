"""Sampled frames of a video (PyAV): N_v frames at segment centres, decoded once each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VarcmpError


class MediaError(VarcmpError):
    """A file that cannot be used; the message says why in a few words."""


@dataclass
class Frames:
    images: list[np.ndarray]  # RGB uint8 [H, W, 3], one per distinct sampled frame (<= N)
    times: np.ndarray  # [K] seconds from the start of the video
    duration: float  # seconds
    fps: float
    total_frames: int


def sample_times(duration: float, n: int) -> np.ndarray:
    """Centres of `n` equal segments of [0, duration)."""
    return (np.arange(n) + 0.5) * (duration / n)


def open_media(path: Path):
    import av

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(f"not a readable media file ({ffmpeg_reason(e)})") from None
    except OSError as e:
        raise MediaError(f"cannot read file ({e.strerror or e})") from None


def ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return msg.split(":")[0].strip() if msg else type(e).__name__


@dataclass
class _Index:
    pts: np.ndarray  # presentation timestamps of the frames, sorted (stream time base)
    keys: np.ndarray  # timestamps of the keyframes
    step: float  # typical frame duration
    end: float  # when the last frame stops being shown
    timed: bool = True  # False: the packets carry no timestamps (cannot seek by time)


def _index(container, stream) -> _Index:
    """The frames' timestamps from the packets alone (no decoding). A stream whose packets carry
    no timestamp at all is timed by counting them (see `_counted`)."""
    import av

    pts, keys, durs, untimed = [], [], {}, []
    try:
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            t = pkt.pts if pkt.pts is not None else pkt.dts
            if t is None:
                untimed.append(pkt.duration or 0)
                continue
            pts.append(t)
            durs[t] = pkt.duration or 0
            if pkt.is_keyframe:
                keys.append(t)
    except av.FFmpegError:
        pass  # a truncated file: keep the packets that were read
    if not pts and untimed:
        return _counted(stream, untimed)
    pts_a = np.unique(np.asarray(pts, dtype=np.int64))
    step = float(np.median(np.diff(pts_a))) if len(pts_a) > 1 else float(max(durs.values(), default=0) or 1)
    end = float(pts_a[-1]) + (durs[int(pts_a[-1])] or step) if len(pts_a) else 0.0
    return _Index(pts_a, np.unique(np.asarray(keys, dtype=np.int64)), step, end)


def _counted(stream, durations: list[int]) -> _Index:
    """A stream without timestamps: frame k is shown from k frame durations on, the duration
    being the packets' own or else one over the stream's frame rate. Decoded from the start."""
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    step = float(np.median([d for d in durations if d > 0] or [0])) or (
        round(1 / (rate * stream.time_base)) if rate else 1.0)
    pts = np.arange(len(durations), dtype=np.int64) * int(step)
    return _Index(pts, pts[:1], float(int(step)), float(len(durations) * int(step)), timed=False)


def read_frames(path: str | os.PathLike, n: int, transform=None) -> Frames:
    """Decode the `n` uniformly sampled frames of a video (fewer if it has fewer frames).
    `transform(rgb_uint8_array)`, when given, is applied to each frame as it is decoded and its
    result kept instead: a 4K frame (25 MB) then never outlives its own decoding."""
    path = Path(path)
    with open_media(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        idx = _index(container, stream)
        pts = idx.pts
        if len(pts) == 0:
            raise MediaError("no video frames")
        start = int(pts[0])
        duration = (idx.end - start) * tb
        fps = len(pts) / duration if duration > 0 else 0.0
        targets = start + sample_times(duration, n) / tb
        chosen = np.unique(pts[np.clip(np.searchsorted(pts, targets, side="right") - 1, 0, len(pts) - 1)])
        images, times = _decode_chosen(container, stream, idx, chosen, transform)
        return Frames(images, (np.asarray(times, dtype=np.float64) - start) * tb, float(duration), float(fps), len(pts))


def _decode_chosen(container, stream, idx: _Index, chosen: np.ndarray, transform) -> tuple[list, list[int]]:
    """(images, timestamps) of the `chosen` frames (the ones on screen at the sample times), each
    decoded once, from the keyframe before it: upright RGB, `transform`ed when given. A stream
    that ends early (a truncated file) keeps what was decoded; nothing decoded is a MediaError."""
    import av

    start, keys = int(idx.pts[0]), idx.keys
    if len(keys) == 0 or keys[0] > chosen[0]:
        keys = np.concatenate([[start], keys])
    images, times = [], []
    decoder, last = None, None
    wanted = set(int(p) for p in chosen)
    try:
        for want in chosen:
            key = keys[np.searchsorted(keys, want, side="right") - 1]
            if decoder is None or last is None or key > last:
                decoder = _decode_from(container, stream, int(key), wanted, idx.timed)
            for frame in decoder:
                fpts = frame.pts if frame.pts is not None else (last + idx.step if last is not None else start)
                last = fpts
                if fpts >= want:
                    if not times or fpts > times[-1]:
                        img = _upright(frame.to_ndarray(format="rgb24"), frame.rotation)
                        images.append(img if transform is None else transform(img))
                        times.append(fpts)
                    break
            else:
                break  # stream ended early (truncated file): keep what was decoded
    except av.FFmpegError as e:
        if not images:
            raise MediaError(f"cannot decode video ({ffmpeg_reason(e)})") from None
    if not images:
        raise MediaError("no decodable video frames")
    return images, times


def _upright(img: np.ndarray, rotation: float) -> np.ndarray:
    """A decoded frame as a player shows it: turned `rotation` degrees counter-clockwise (the
    display matrix's angle, as PyAV reads it), to the nearest quarter turn."""
    k = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def _decode_from(container, stream, key: int, wanted: set[int], timed: bool = True):
    """Frames from keyframe `key` on. Packets of frames that are not wanted are decoded with
    skip_frame=NONREF: a frame no other frame refers to is then not decoded at all (most
    B-frames), one that others need still is, so every wanted frame comes out exactly. A stream
    without timestamps is decoded from its first byte."""
    if timed:
        container.seek(key, stream=stream, backward=True, any_frame=False)
    else:
        container.seek(0, unsupported_byte_offset=True)
    ctx = stream.codec_context
    for pkt in container.demux(stream):
        ctx.skip_frame = "DEFAULT" if pkt.pts is None or pkt.pts in wanted else "NONREF"
        yield from pkt.decode()
