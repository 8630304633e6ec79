"""The synthetic world as real mp4 files with audio, extracted by the real varcmp-extract."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..cli.common import Interrupted
from ..cli.progress import progress_arg
from ..media.audio import AUDIO_RATE
from .world import AMP, SynthParams, VideoPlan, World, check_out

# --------------------------------------------------------------------------
# Real media from the same world

MEDIA_SIZE = 96
MEDIA_FPS = 10
MEDIA_SECONDS = (4.0, 6.0)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p_, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q)][i]) * 255


def media_style(world: World) -> dict[str, list[dict]]:
    """How each concept looks and sounds: scenes are a background colour with stripes (angle,
    period) and an ambience tone; subjects a shape and colour and a voice tone; verbs a marker
    colour, a motion (actions jitter, activities drift) and a tone."""
    gold = 0.6180339887
    scenes = [dict(colour=_hsv((k * gold) % 1, 0.35, 0.55 + 0.1 * (k % 3)), angle=np.deg2rad((k * 37) % 180),
                   period=6 + 3 * (k % 4), freq=80.0 + 15.0 * k) for k in range(len(world.scene_names))]
    subjects = [dict(shape=k % 6, colour=_hsv((0.1 + k * 0.382) % 1, 0.85, 0.95), freq=500.0 + 40.0 * k)
                for k in range(len(world.subject_names))]
    verbs = [dict(colour=_hsv((0.55 + k * gold) % 1, 0.9, 0.35 + 0.5 * (k % 2)), jitter=k < world.params.actions,
                  freq=1500.0 + 120.0 * k) for k in range(len(world.verb_phrases))]
    return {"scene": scenes, "subject": subjects, "verb": verbs}


def _shape_mask(kind: int, yy, xx, cy, cx, r) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return dy ** 2 + dx ** 2 <= r ** 2                        # disc
    if kind == 1:
        return (abs(dy) <= r) & (abs(dx) <= r)                    # square
    if kind == 2:
        return (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)  # triangle
    if kind == 3:
        return abs(dy) + abs(dx) <= r                             # diamond
    if kind == 4:
        d = dy ** 2 + dx ** 2
        return (d <= r ** 2) & (d >= (r / 2) ** 2)                # ring
    return ((abs(dy) <= r / 3) & (abs(dx) <= r)) | ((abs(dx) <= r / 3) & (abs(dy) <= r))  # cross


def _render_video(world: World, plan: VideoPlan, style: dict, seconds: float, size: int, fps: int, rng):
    """The frames (RGB uint8) and the mono audio of one video, drawn from `rng` in a fixed order."""
    n = int(round(seconds * fps))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = _background(style["scene"][plan.scene], yy, xx, rng)
    paths = _event_paths(plan, size, n, rng)
    # bystanders stand still (a smaller shape of their subject, no verb marker)
    for subj in plan.bystanders:
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ss = style["subject"][subj]
        base[_shape_mask(ss["shape"], yy, xx, cy, cx, 0.7 * (size / 10))] = ss["colour"]
    events = [(ev, ev.seconds(seconds, world.params.frames), path) for ev, path in zip(plan.events, paths)]
    frames = [_frame(base, (yy, xx), style, events, (f + 0.5) / fps, f, rng).astype(np.uint8) for f in range(n)]
    return frames, _audio(world, plan, style, seconds, rng)


def _background(scene: dict, yy, xx, rng) -> np.ndarray:
    """[H, W, 3] float: the scene's colour (slightly varied) with its stripes."""
    colour = np.clip(scene["colour"] + rng.normal(0, 8, 3), 0, 255)
    phase = rng.uniform(0, scene["period"])
    stripes = np.sin(2 * np.pi * ((xx * np.cos(scene["angle"]) + yy * np.sin(scene["angle"])) + phase) / scene["period"])
    return np.clip(colour[None, None] * (1 + 0.2 * stripes[..., None]), 0, 255)


def _event_paths(plan: VideoPlan, size: int, n: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """(start, drift per frame) of each event's shape: the anomaly on the right-hand side, the
    background activity on the left when there is one."""
    paths = []
    for e, ev in enumerate(plan.events):
        lo, hi = (0.2, 0.45) if (e == 0 and len(plan.events) > 1) else (0.2, 0.8)
        if ev.anomalous:
            lo, hi = 0.55, 0.8
        start = rng.uniform(lo, hi, 2) * size
        drift = rng.uniform(-1, 1, 2) * size * 0.15 / max(n, 1)
        paths.append((start, drift))
    return paths


def _frame(base: np.ndarray, grid, style: dict, events, t: float, f: int, rng) -> np.ndarray:
    """Frame `f`, at `t` s: each of `events` ((event, (on, off) seconds, path)) that is on at `t`
    as its subject's shape with its verb's marker beside it, moved along its path (actions jitter)."""
    yy, xx = grid
    size = base.shape[0]
    r = size / 10
    img = base.copy()
    for ev, (t0, t1), (start, drift) in events:
        if not t0 <= t < t1:
            continue
        vs = style["verb"][ev.verb]
        cy, cx = start + drift * f
        if vs["jitter"]:
            cy, cx = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
        cy, cx = float(np.clip(cy, r, size - 2 * r)), float(np.clip(cx, r, size - 2 * r))
        ss = style["subject"][ev.subject]
        img[_shape_mask(ss["shape"], yy, xx, cy, cx, r)] = ss["colour"]
        img[(abs(yy - cy - 1.4 * r) <= r / 2) & (abs(xx - cx - 1.4 * r) <= r / 2)] = vs["colour"]
    return img


def _audio(world: World, plan: VideoPlan, style: dict, seconds: float, rng) -> np.ndarray:
    """Mono float32 at AUDIO_RATE: the scene's ambience tone and faint noise everywhere, and each
    event's tones (verb, subject) while it is visible."""
    ts = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    audio = 0.05 * np.sin(2 * np.pi * style["scene"][plan.scene]["freq"] * ts) + 0.005 * rng.standard_normal(len(ts))
    for ev in plan.events:
        t0, t1 = ev.seconds(seconds, world.params.frames)
        on = (ts >= t0) & (ts < t1)
        loud = 1.0 if ev.anomalous else AMP["activity_loudness"]
        audio += on * loud * (0.25 * np.sin(2 * np.pi * style["verb"][ev.verb]["freq"] * ts)
                              + 0.12 * np.sin(2 * np.pi * style["subject"][ev.subject]["freq"] * ts))
    return audio.astype(np.float32)


def render_media(world_or_params=None, out_dir=".", videos: int | None = None, seed: int | None = None,
                 size: int = MEDIA_SIZE, fps: int = MEDIA_FPS, seconds: tuple[float, float] = MEDIA_SECONDS,
                 progress=False, **knobs) -> tuple[Path, Path]:
    """Render the world's videos as small real mp4 files (H.264 video, AAC mono 48 kHz audio)
    under `out_dir/videos/` and write the captions: `out_dir/captions.csv` (all, columns
    `video,text`) and `captions_train.csv` / `captions_test.csv` (one per split).

    A scene is a striped background colour with an ambience tone; an event is its subject's
    shape (shape + colour) with a marker of its verb's colour next to it, visible (and
    audible as two tones) only while the event lasts: the anomalous span of an anomalous
    video, the whole video for the background activity; bystanders are smaller still shapes.
    Frames are `size` x `size` pixels at `fps`, each video `seconds` long (uniform in the
    range; the world's durations are not used). `world_or_params`: a World, a
    SynthParams, or None (then `videos`, `seed` and `knobs` make the params).
    Returns (video_root, captions_csv)."""
    world = _world_of(world_or_params, videos, seed, knobs)
    if not (16 <= size <= 1024 and size % 2 == 0):
        raise ValueError(f"size must be an even number of pixels in [16, 1024], got {size}")
    if not 0 < seconds[0] <= seconds[1]:
        raise ValueError(f"seconds must be (min, max) with 0 < min <= max, got {seconds}")
    from ..media.files import write_video

    out_dir = Path(out_dir)
    root = out_dir / "videos"
    style = media_style(world)
    rows = {"train": [], "test": []}
    with progress_arg(progress) as prog:
        task = prog.add_task("render media", total=len(world.videos)) if prog is not None else None
        for plan in world.videos:
            rng = np.random.default_rng([world.params.seed, 4, plan.index])
            secs = float(rng.uniform(*seconds))
            frames, audio = _render_video(world, plan, style, secs, size, fps, rng)
            (root / plan.path).parent.mkdir(parents=True, exist_ok=True)
            write_video(root / plan.path, frames, fps=fps, audio=audio, audio_rate=AUDIO_RATE)
            rows[plan.split].append((plan.path, plan.caption))
            if prog is not None:
                prog.update(task, advance=1)
    _write_captions(out_dir, rows)
    (out_dir / "README.txt").write_text(
        "Rendered by varcmp-synth from a synthetic world (coloured shapes and tones).\n"
        "Extracted with tiny randomly initialised encoders, the resulting scores are meaningless;\n"
        "real retrieval needs the pre-trained CLIP/CLAP checkpoints.\n"
        f"World: {json.dumps(asdict(world.params))}\n")
    return root, out_dir / "captions.csv"


def _world_of(world_or_params, videos: int | None, seed: int | None, knobs: dict) -> World:
    """The World given, or the one of SynthParams (default ones) with `videos`, `seed`, `knobs` applied."""
    if isinstance(world_or_params, World):
        if videos is not None or seed is not None or knobs:
            raise ValueError("pass videos/seed/knobs through the World, not with it")
        return world_or_params
    base = world_or_params or SynthParams()
    over = {k: v for k, v in (("videos", videos), ("seed", seed)) if v is not None}
    return World(replace(base, **over, **knobs))


def _write_captions(out_dir: Path, rows: dict[str, list[tuple[str, str]]]) -> None:
    """captions.csv (every split) and captions_<split>.csv, columns video,text."""
    for name, data in (("captions.csv", rows["train"] + rows["test"]), ("captions_train.csv", rows["train"]),
                       ("captions_test.csv", rows["test"])):
        with open(out_dir / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["video", "text"])
            w.writerows(data)


def extract_media(media_dir, out, clip_model=None, clap_model=None, frames: int = 32, words: int = 32,
                  audio_segments: int = 32, workers: int = 0, overwrite: bool = False, console=None) -> Path:
    """Run the real `varcmp-extract` (video + own audio track + captions) on what `render_media`
    wrote in `media_dir`, one run per split (`train`, `test`) into the cache `out`.
    Without `clip_model` / `clap_model`, tiny *randomly initialised* encoders are created in
    `media_dir/models/` (see `varcmp.encoders.tiny`): the pipeline runs from files on disk, but
    retrieval scores from random encoders are meaningless."""
    from ..extract import Options, run

    media_dir, out = Path(media_dir), Path(out)
    check_out(out, overwrite, keep=[media_dir])
    if clip_model is None:
        from ..encoders.tiny import make_tiny_clip

        clip_model = make_tiny_clip(media_dir / "models" / "tiny-clip")
    if clap_model is None:
        from ..encoders.tiny import make_tiny_clap

        clap_model = make_tiny_clap(media_dir / "models" / "tiny-clap")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    for n, split in enumerate(("train", "test")):
        opt = Options(root=media_dir / "videos", out=out, annotations=media_dir / f"captions_{split}.csv", split=split,
                      clip_model=str(clip_model), clap_model=str(clap_model), audio="video", frames=frames,
                      max_words=words, audio_segments=audio_segments, device="cpu", workers=workers,
                      overwrite=overwrite and n == 0)
        summary = run(opt, console)
        if summary.interrupted:
            raise Interrupted(f"interrupted: {out} is not complete; run the same command with --overwrite to make it")
        problems = summary.failed + [(x, "") for x in summary.plan.rejected + summary.plan.missing]
        if problems:
            raise RuntimeError(f"{out}: extraction of split {split} had problems: {problems[:3]}")
    return out


def make_media_cache(out, media_dir, videos: int = 40, seed: int = 0, overwrite: bool = False, progress=False,
                     clip_model=None, clap_model=None, workers: int = 0, size: int = MEDIA_SIZE, fps: int = MEDIA_FPS,
                     seconds: tuple[float, float] = MEDIA_SECONDS, console=None, **knobs) -> Path:
    """`render_media` then `extract_media`: the whole pipeline from real files, with tiny random
    encoders unless models are given (scores then meaningless). `knobs` as for the world; the
    feature shapes (dim, patches) come from the encoders, so `dim`/`patches` are not accepted."""
    for k in ("dim", "patches"):
        if k in knobs:
            raise ValueError(f"--{k} is fixed by the encoders with --media")
    out = Path(out)
    check_out(out, overwrite, keep=[media_dir])
    params = SynthParams(videos=videos, seed=seed, **knobs)
    render_media(World(params), media_dir, size=size, fps=fps, seconds=seconds, progress=progress)
    return extract_media(media_dir, out, clip_model, clap_model, frames=params.frames, words=params.words,
                         audio_segments=params.audio_segments, workers=workers, overwrite=overwrite, console=console)
