"""`varcmp-synth`: write the synthetic benchmark as a cache (or as media files)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..media.captions import AnnotationError
from ..synth.media import make_media_cache
from ..synth.world import (ACTIONS, ACTIVITIES, SCENES, SUBJECTS, SynthParams, label_counts, make_synthetic_cache,
                           split_sizes)
from .common import CommandError, OneLineErrors

# --------------------------------------------------------------------------
# CLI


_KNOB_OPTIONS = [
    ("--span", click.IntRange(1), "Length of the anomalous span, in sampled frames."),
    ("--normal-share", click.FloatRange(0, 1), "Share of normal videos."),
    ("--test-share", click.FloatRange(0, 1, min_open=True, max_open=True),
     "Share of each kind of video in the test split (the rest is train)."),
    ("--noise", click.FloatRange(0), "Multiplier of every noise amplitude (0: noiseless)."),
    ("--align", click.FloatRange(0, 1), "Cosine between a concept's text and visual vectors."),
    ("--salience", click.FloatRange(0), "How strongly a frame's [CLS] shows an event in it (scene = 1)."),
    ("--scenes", click.IntRange(1, len(SCENES)), "Number of scenes (shared by many videos)."),
    ("--subjects", click.IntRange(1, len(SUBJECTS)), "Number of subjects."),
    ("--actions", click.IntRange(1, len(ACTIONS)), "Number of anomalous actions (UCF-Crime categories)."),
    ("--activities", click.IntRange(1, len(ACTIVITIES)), "Number of normal activities."),
    ("--object-patches", click.IntRange(1), "Patches showing an event's subject (and as many its verb)."),
    ("--bystanders", click.IntRange(0), "Subjects standing around in every frame of a video (not captioned)."),
    ("--frames", click.IntRange(1, 1024), "Sampled frames per video (N_v)."),
    ("--patches", click.IntRange(4), "Patch tokens per frame (feature cache only)."),
    ("--dim", click.IntRange(8), "Feature dimension C (feature cache only)."),
    ("--words", click.IntRange(8, 77), "Tokens per caption incl. start/end."),
    ("--audio-segments", click.IntRange(1, 256), "Audio segments per video (N_a)."),
]
_DEFAULTS = SynthParams()


def _knob_options(f):
    for opt, rng, text in reversed(_KNOB_OPTIONS):
        name = opt[2:].replace("-", "_")
        f = click.option(opt, name, type=rng, default=getattr(_DEFAULTS, name), show_default=True, help=text)(f)
    return f


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--videos", "-n", type=click.IntRange(2), default=_DEFAULTS.videos, show_default=True,
              help="Number of videos (train + test).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seed: the same seed gives the same cache.")
@_knob_options
@click.option("--media", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Render real mp4 files (+ captions CSV) into this folder and extract OUT from them with tiny "
                   "RANDOM encoders (scores meaningless; the pipeline runs from files on disk).")
@click.option("--clip-model", default=None, help="With --media: CLIP directory to extract with (default: tiny random).")
@click.option("--clap-model", default=None, help="With --media: CLAP directory to extract with (default: tiny random).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and files in --media) if they exist.")
def main(out, videos, seed, media, clip_model, clap_model, overwrite, **knobs):
    """Write a synthetic video anomaly retrieval benchmark as a feature cache OUT.

    The world has planted structure at each level VarCMP aligns: long videos (32 frames)
    sharing scenes; in anomalous videos the caption's subject and action appear only in a
    short span and only in a few patches; captions with words and a sentence; audio
    segments aligned in time with the frames (the event's sound during the span); labels
    and train/test splits. Features are drawn directly in a CLIP-like space (no encoder),
    so OUT is read by varcmp-train / varcmp-eval like an extracted cache. See the module
    docstring of varcmp.synth for the full design.

    \b
    Examples:
      varcmp-synth demo.zarr --videos 600 --seed 0
      varcmp-synth short.zarr --span 2 --overwrite          # shorter anomalies
      varcmp-synth small.zarr -n 40 --dim 64 --patches 16 --frames 8
      varcmp-synth media.zarr -n 20 --media media/          # real mp4 files, tiny random encoders
      varcmp-train demo.zarr --out runs/demo                # then train and evaluate on it
      varcmp-eval demo.zarr --checkpoint runs/demo
    """
    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        if media is not None:
            _make_media(out, media, videos, seed, clip_model, clap_model, overwrite, knobs, console)
        else:
            if clip_model or clap_model:
                raise CommandError("--clip-model / --clap-model only apply with --media")
            make_synthetic_cache(out, videos=videos, seed=seed, overwrite=overwrite, progress=True, **knobs)
    except ValueError as e:
        raise CommandError(str(e).splitlines()[0]) from None
    except (RuntimeError, AnnotationError, click.UsageError) as e:  # the --media extraction went wrong
        msg = e.format_message() if isinstance(e, click.UsageError) else str(e)
        click.echo(f"varcmp-synth: error: {' '.join(msg.split())}", err=True)
        sys.exit(1)
    _report(out, media, SynthParams(videos=videos, seed=seed, **knobs), time.perf_counter() - t0, console)


def _make_media(out: Path, media: Path, videos: int, seed: int, clip_model, clap_model, overwrite: bool, knobs: dict,
                console) -> None:
    """--media: render the world as files into `media`, then extract OUT from them."""
    src = click.get_current_context().get_parameter_source
    fixed = [k for k in ("dim", "patches") if src(k) != click.core.ParameterSource.DEFAULT]
    if fixed:
        raise CommandError(f"--{fixed[0]} cannot be used with --media (the encoders fix it)")
    if media.exists() and any(media.iterdir()) and not overwrite:
        raise CommandError(f"{media}: exists and is not empty; pass --overwrite or choose another --media folder")
    params = {k: v for k, v in knobs.items() if k not in ("dim", "patches")}
    make_media_cache(out, media, videos=videos, seed=seed, overwrite=overwrite, progress=True,
                     clip_model=clip_model, clap_model=clap_model, console=console, **params)


def _report(out: Path, media: Path | None, p: SynthParams, seconds: float, console) -> None:
    """What was written, in one line (and, with --media, where the files are)."""
    from .markup import lit

    n_train, n_test = split_sizes(p)
    n_normal, n_anom = label_counts(p)
    console.print(f"wrote {lit(out)}: {n_train} train / {n_test} test videos ({n_anom} anomalous, {n_normal} normal), "
                  f"text and audio queries, in {seconds:.1f} s", highlight=False)
    if media is not None:
        console.print(f"media: {lit(media / 'videos')}, captions {lit(media / 'captions.csv')}. Features come from "
                      "RANDOM tiny encoders: retrieval scores on this cache are meaningless.", highlight=False)


if __name__ == "__main__":
    main()
