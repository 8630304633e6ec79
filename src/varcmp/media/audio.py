"""Audio as CLAP is fed: mono (the mean of the channels) at 48 kHz, and the windows centred on the frame times."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .video import MediaError, ffmpeg_reason, open_media, sample_times

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".wma")
AUDIO_RATE = 48_000  # CLAP's sampling rate
SILENCE = 1e-4  # peak amplitude under which a track counts as silent
AUDIO_MIX = "mean of the channels (as librosa's mono=True)"  # how read_audio makes mono; recorded in caches


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE) -> tuple[np.ndarray, float] | None:
    """Whole first audio track as mono float32 at `rate` (AUDIO_MIX), and its start (s) relative
    to the first video frame (0 for audio-only files); None when the file has no audio stream."""
    import av

    path = Path(path)
    with open_media(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        offset = 0.0
        if container.streams.video and stream.start_time is not None:
            v = container.streams.video[0]
            if v.start_time is not None:
                offset = float(stream.start_time * stream.time_base - v.start_time * v.time_base)
        resampler = av.AudioResampler(format="fltp", rate=rate)  # the track's own channels, resampled
        chunks = []
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples, not trust timestamps
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
        except av.FFmpegError as e:
            if not chunks:
                raise MediaError(f"cannot decode audio ({ffmpeg_reason(e)})") from None
        samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return samples, offset


@dataclass
class AudioWindows:
    windows: list[np.ndarray]  # one float32 array per valid window
    mask: np.ndarray  # [Na] bool
    spans: np.ndarray  # [Na, 2] seconds (start, end) relative to the video
    note: str = ""
    kind: str = ""  # what the note is about, a fixed phrase (the report counts notes by it)


def window_spans(duration: float, n: int, offset: float = 0.0, track: float | None = None):
    """The audio-window rule, shared by extraction and the synthetic world: the `n` windows of a
    video `duration` s long are centred on its sampled frame times, `clamp(duration / n, 1 s, 10 s)`
    long, and shifted to lie inside the audio track, which starts `offset` s after the video and
    lasts `track` s (default: the video's duration). Returns the windows' (start, end) seconds
    within the track and whether each window's centre lies on the track."""
    track = duration if track is None else track
    centres = sample_times(duration, n) - offset  # times within the track
    length = float(np.clip(duration / n, 1.0, 10.0))
    start = np.clip(centres - length / 2, 0.0, max(track - length, 0.0))
    return start, np.minimum(start + length, track), (centres >= 0) & (centres < track)


def audio_windows(samples: np.ndarray | None, offset: float, duration: float, n: int,
                  rate: int = AUDIO_RATE) -> AudioWindows:
    """The samples of the `n` windows of `window_spans` (a window whose centre has no audio is
    masked; spans in seconds of the video). A missing or silent track masks every window and
    says so in `note` (and `kind`)."""
    mask = np.zeros(n, dtype=bool)
    spans = np.zeros((n, 2), dtype=np.float32)
    if samples is None:
        return AudioWindows([], mask, spans, "no audio track", "no audio track")
    if len(samples) == 0:
        return AudioWindows([], mask, spans, "empty audio track", "empty audio track")
    if float(np.max(np.abs(samples))) < SILENCE:
        return AudioWindows([], mask, spans, "silent audio track", "silent audio track")
    start, end, mask = window_spans(duration, n, offset, len(samples) / rate)
    windows = []
    for i in np.flatnonzero(mask):
        a, b = int(round(start[i] * rate)), int(round(end[i] * rate))
        windows.append(samples[a:b])
        spans[i] = (start[i] + offset, (b / rate) + offset)
    if mask.all():
        return AudioWindows(windows, mask, spans)
    return AudioWindows(windows, mask, spans, f"audio too short: covers {int(mask.sum())} of {n} windows",
                        "audio too short")


def audio_stream(container, rate: int = AUDIO_RATE):
    """A mono AAC stream of an open PyAV output container (before anything is muxed)."""
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    return stream


def mux_audio(container, stream, samples: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Encode mono float `samples` into `stream` (see `audio_stream`) of an open PyAV output
    `container`, flushing it at the end."""
    import av

    samples = np.asarray(samples, dtype=np.float32).reshape(1, -1)
    for k in range(0, samples.shape[1], 1024):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + 1024]), format="flt", layout="mono")
        fr.sample_rate, fr.pts = rate, k
        for p in stream.encode(fr):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
