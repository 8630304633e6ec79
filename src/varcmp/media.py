"""Reading (and, for tests and the demo, writing) video and audio with PyAV.

Frame sampling: `N` timestamps at the centres of `N` equal segments of the
whole video; each is served by the frame on screen at that time (the last
frame whose timestamp is <= it). A video with fewer than `N` frames yields
each of its frames once. Every frame is decoded at most once: a packet-level
index of the stream (timestamps and keyframes, no decoding) lets the decoder
jump to the keyframe before a target whenever that skips frames, and decode
straight on otherwise; frames between targets that no other frame refers to are
not decoded at all.

The video lasts from its first frame to the end of its last one: the last frame's
timestamp plus its own duration (from its packet; the typical frame duration when
the packet has none), however far apart the frames are. A stream whose packets
carry no timestamps at all (a raw H.264/HEVC elementary stream) is timed by
counting its frames at its frame rate. Frames come out upright, as a player shows
them: the stream's display matrix (the rotation a phone records) is applied.
Audio is mixed down to mono as the mean of its channels, as CLAP's own loader does
(librosa, `mono=True`), not with FFmpeg's `mono` layout (0.707 (L + R) + C ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".wma")
AUDIO_RATE = 48_000  # CLAP's sampling rate
SILENCE = 1e-4  # peak amplitude under which a track counts as silent
AUDIO_MIX = "mean of the channels (as librosa's mono=True)"  # how read_audio makes mono; recorded in caches


class MediaError(Exception):
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


def _open(path: Path):
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
        raise MediaError(f"not a readable media file ({_why(e)})") from None
    except OSError as e:
        raise MediaError(f"cannot read file ({e.strerror or e})") from None


def _why(e: Exception) -> str:
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
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        idx = _index(container, stream)
        pts, keys, step = idx.pts, idx.keys, idx.step
        if len(pts) == 0:
            raise MediaError("no video frames")
        start = int(pts[0])
        duration = (idx.end - start) * tb
        fps = len(pts) / duration if duration > 0 else 0.0
        targets = start + sample_times(duration, n) / tb
        chosen = np.unique(pts[np.clip(np.searchsorted(pts, targets, side="right") - 1, 0, len(pts) - 1)])
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
                    fpts = frame.pts if frame.pts is not None else (last + step if last is not None else start)
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
                raise MediaError(f"cannot decode video ({_why(e)})") from None
        if not images:
            raise MediaError("no decodable video frames")
        return Frames(images, (np.asarray(times, dtype=np.float64) - start) * tb, float(duration), float(fps), len(pts))


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


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE) -> tuple[np.ndarray, float] | None:
    """Whole first audio track as mono float32 at `rate` (AUDIO_MIX), and its start (s) relative
    to the first video frame (0 for audio-only files); None when the file has no audio stream."""
    import av

    path = Path(path)
    with _open(path) as container:
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
                raise MediaError(f"cannot decode audio ({_why(e)})") from None
        samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return samples, offset


@dataclass
class AudioWindows:
    windows: list[np.ndarray]  # one float32 array per valid window
    mask: np.ndarray  # [Na] bool
    spans: np.ndarray  # [Na, 2] seconds (start, end) relative to the video
    note: str = ""
    kind: str = ""  # what the note is about, a fixed phrase (the report counts notes by it)


def audio_windows(samples: np.ndarray | None, offset: float, duration: float, n: int,
                  rate: int = AUDIO_RATE) -> AudioWindows:
    """`n` windows centred on the sampled frame times, each `clamp(duration / n, 1 s, 10 s)` long,
    shifted to lie inside the track. A window whose centre has no audio is masked; a missing or
    silent track masks every window and says so in `note` (and `kind`)."""
    centres = sample_times(duration, n)
    length = float(np.clip(duration / n, 1.0, 10.0))
    mask = np.zeros(n, dtype=bool)
    spans = np.zeros((n, 2), dtype=np.float32)
    if samples is None:
        return AudioWindows([], mask, spans, "no audio track", "no audio track")
    if len(samples) == 0:
        return AudioWindows([], mask, spans, "empty audio track", "empty audio track")
    if float(np.max(np.abs(samples))) < SILENCE:
        return AudioWindows([], mask, spans, "silent audio track", "silent audio track")
    track = len(samples) / rate
    windows = []
    for i, c in enumerate(centres):
        t = c - offset  # time within the track
        if t < 0 or t >= track:
            continue
        s = min(max(t - length / 2, 0.0), max(track - length, 0.0))
        a, b = int(round(s * rate)), int(round(min(s + length, track) * rate))
        windows.append(samples[a:b])
        mask[i] = True
        spans[i] = (s + offset, (b / rate) + offset)
    if mask.all():
        return AudioWindows(windows, mask, spans)
    return AudioWindows(windows, mask, spans, f"audio too short: covers {int(mask.sum())} of {n} windows",
                        "audio too short")


def within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it once every symbolic link of both is resolved
    (a link that loops or dangles is resolved as far as it goes)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def find_videos(root: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the video files under `root`, sorted. Symbolic links (to folders
    or files) are followed only when their target lies inside `root`; a folder reached a second
    time (a symlink loop, or two links to one folder) is skipped, and so is a folder that cannot
    be listed; each skip appends one line to `notes` (when given) naming the link or folder. The
    walk never hangs on a loop and never raises for one bad folder. A file symlink that loops or
    dangles (no target to read) is listed: reading it then fails with a one-line reason
    (MediaError), like any unreadable video."""
    root = Path(root)
    notes = [] if notes is None else notes
    seen: dict[tuple[int, int], str] = {}
    out = []

    def rel(p) -> str:
        try:
            r = Path(p).relative_to(root).as_posix()
        except ValueError:
            return str(p)
        return "." if r in ("", ".") else r

    def inside(p: Path) -> bool:
        if not os.path.islink(p) or not os.path.exists(p) or within(p, root):
            return True
        notes.append(f"{rel(p)}: symbolic link to {os.path.realpath(p)}, outside the video root, skipped")
        return False

    def unlistable(e: OSError) -> None:
        where = rel(e.filename) if e.filename is not None else "?"
        notes.append(f"{where}: cannot list folder ({e.strerror or e}), skipped")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            notes.append(f"{rel(dirpath)}: cannot read folder ({e.strerror or e}), skipped")
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            first = seen[key]
            here = rel(dirpath)
            loop = first == "." or here.startswith(first + "/")
            why = "symlink loop back to" if loop else "same folder as"
            notes.append(f"{here}: {why} {first!r}, skipped")
            dirnames[:] = []
            continue
        seen[key] = rel(dirpath)
        dirnames[:] = [d for d in sorted(dirnames) if inside(Path(dirpath) / d)]
        for f in filenames:
            if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".") and inside(Path(dirpath) / f):
                out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def write_video(path: str | os.PathLike, frames, fps: int = 10, audio: np.ndarray | None = None,
                audio_rate: int = AUDIO_RATE, gop: int | None = None) -> None:
    """Write RGB uint8 frames (and optional mono float audio) to an H.264/AAC mp4."""
    import av

    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if gop:
            v.codec_context.gop_size = gop
        a = audio_stream(c, audio_rate) if audio is not None else None
        for img in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            mux_audio(c, a, audio, audio_rate)


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
