"""`varcmp-extract`: frozen CLIP (and CLAP) features of a folder of videos into a cache.

Worker processes decode and preprocess videos (PyAV, the checkpoint's own image
processor, CLAP's log-mel front end) while the main process runs the encoders
and writes each finished video's chunks, then its done flag. A killed run is
resumed by running the same command again.

Several processes (shards) fill one Zarr store: `--num-shards N --shard-index i`,
or under `torchrun`, where RANK / WORLD_SIZE give them. Shard i takes videos
i, i+N, ...; each video's chunks are its own. Two lock files in the store
coordinate them: `.varcmp.run.lock` is held by every writer for its whole run
(shared by shards; exclusive for a single-process run and for `--finalize`), and
`.varcmp.lock` serialises the short metadata sections (creating the store or a
split, finalizing). Finalization (see `cache_schema`) checks that every video of
the split is done or failed and every caption encoded, records that, and writes
the consolidated metadata. Who does it:
- a single-process run, at its end;
- under torchrun, rank 0, after every rank has finished (a gloo barrier, CPU
  only; no NCCL). The ranks agree on the run's exit code; because torchrun stops
  the other ranks as soon as one exits non-zero, the others exit 0 and rank 0
  exits last with that code;
- otherwise (SLURM array, processes started by hand) the last shard to finish:
  the one that, after releasing its shared run lock, gets it exclusively;
- or `varcmp-extract --out STORE --finalize [--split NAME]`, run once all shards
  have ended (it reports what is missing, exit code 2, if a shard did not finish)."""


from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

import click
import numpy as np

from .cache.locks import Locks
from .cache.store import is_hdf5
from .cache.writer import probe_target
from .cli.common import CommandError, Interrupted, OneLineErrors
from .extraction.encode import cut_captions, encode_text, encode_videos, load_encoders
from .extraction.finalize import finalize, finish
from .extraction.group import Group, default_workers, exit_together, join_group, shards_from_env
from .extraction.options import Options, Summary
from .extraction.report import interrupted_line, report
from .extraction.split import inputs_of, open_split
from .media.decoding import decoded, decoders
from .media.plan import Plan, audio_source, make_plan

# --------------------------------------------------------------------------
# The run


def run(opt: Options, console=None, group: "Group | None" = None) -> Summary:
    """Extract one split (or one shard of it). Raises CacheError / AnnotationError / RuntimeError /
    click.UsageError for problems of the whole run; per-video problems are recorded and returned.
    With `opt.distributed` the ranks join a process group (`group`, when the caller joined it)."""
    from rich.console import Console

    from .encoders.frozen import quiet_transformers

    quiet_transformers()
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    _check_options(opt)
    plan = make_plan(opt.root, opt.annotations, opt.all_videos)
    if not plan.videos:
        raise click.UsageError(_nothing_to_extract(opt, plan))
    # something that is not a cache is refused, whatever the flags, before a lock file is made in it
    probe_target(opt.out, replace=opt.overwrite, keep=inputs_of(opt))

    summary = Summary(plan=plan)
    locks = Locks(opt.out)
    with ExitStack() as stack:
        if group is None and opt.distributed and opt.num_shards > 1:
            group = join_group(console)
            if group is not None:
                stack.callback(group.close)
        locks.start(exclusive=opt.num_shards == 1, console=console)
        stack.callback(locks.stop)
        # decoding workers start first: they load their preprocessors while this process loads the encoders
        init = (opt.clip_model, opt.clap_model if opt.audio else None, opt.frames, opt.audio_segments)
        pool = stack.enter_context(decoders(opt.workers, init))
        _extract(opt, plan, pool, summary, locks, group, console)
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_options(opt: Options) -> None:
    """The usage errors of a run's options (click.UsageError), before anything is read or written."""
    if not (0 <= opt.shard_index < opt.num_shards):
        raise click.UsageError(f"--shard-index must be in [0, {opt.num_shards})")
    sharded = opt.num_shards > 1
    if sharded and is_hdf5(opt.out):
        raise click.UsageError("HDF5 output is written by one process; use a Zarr store (--out NAME.zarr) with shards")
    if sharded and opt.overwrite:
        raise click.UsageError("--overwrite cannot be combined with shards; delete the store before starting them")
    if opt.audio and opt.audio != "video" and not Path(opt.audio).is_dir():
        raise click.UsageError(f"--audio {opt.audio}: expected 'video' or a directory of audio files")
    from .encoders.frozen import model_path_problem

    for flag, name in (("--clip-model", opt.clip_model), ("--clap-model", opt.clap_model if opt.audio else None)):
        if problem := model_path_problem(flag, name):
            raise click.UsageError(problem)


def _nothing_to_extract(opt: Options, plan: Plan) -> str:
    """Why a plan holds no video, on one line: with a caption file, its first refused rows."""
    if opt.annotations is None:
        return f"{opt.root}: no videos to extract"
    refused = plan.rejected + plan.missing
    if not refused:
        return f"{opt.root}: no videos to extract ({opt.annotations} has no caption rows)"
    shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more rows" if len(refused) > 3 else "")
    return f"{opt.root}: no videos to extract (no caption row of {opt.annotations} is usable: {shown})"


def _extract(opt: Options, plan: Plan, pool, summary: Summary, locks: Locks, group: Group | None, console) -> None:
    """Load the encoders, open the split, encode this shard's pending videos (and, in shard 0, the
    captions) while `pool` decodes them, then `finish`. Ctrl-C ends the encoding, not the run."""
    clip, clap = load_encoders(opt)
    plan.notes.extend(cut_captions(clip, plan, opt))
    mine = np.arange(opt.shard_index, len(plan.videos), opt.num_shards)
    writer, sw, todo = open_split(opt, plan, clip, clap, mine, locks)
    try:
        try:
            summary.total, summary.already = len(mine), len(mine) - len(todo)
            paths = [plan.videos[i].path for i in todo]
            jobs = [(i, str(opt.root / p), audio_source(opt.audio, opt.root, p, plan.notes)) for i, p in zip(todo, paths)]
            results = decoded(jobs, pool, opt.workers)  # decoding starts now, text encoding overlaps it
            if opt.shard_index == 0 and plan.queries:
                summary.queries = encode_text(sw, clip, [q.text for q in plan.queries], opt.max_words)
            encode_videos(opt, sw, clip, clap, results, len(jobs), summary, console)
        except KeyboardInterrupt:
            summary.interrupted = True
        finish(opt, plan, writer, sw, mine, locks, group, summary)
    finally:
        writer.close()


# --------------------------------------------------------------------------
# CLI


def _finalize_command(ctx, videos, out, annotations, split, all_videos, overwrite, console) -> int:
    """`--finalize`: of every split, unless --split or VIDEOS names one (VIDEOS, with --annotations,
    also gives the videos and captions the split must hold). The exit code."""
    if overwrite:
        raise click.UsageError("--finalize checks a store; it cannot be combined with --overwrite")
    whole = videos is None and ctx.get_parameter_source("split") in (None, click.core.ParameterSource.DEFAULT)
    plan = make_plan(videos, annotations, all_videos) if videos is not None else None
    return finalize(out, None if whole else split, plan, console)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("videos", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Cache to write or add to: a Zarr directory, or NAME.h5 for HDF5.")
@click.option("--annotations", "-a", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Caption file (.xlsx in the UCFCrime-AR layout, .csv or .jsonl with video,text).")
@click.option("--split", default="train", help="Name of the split this run extracts (one store holds several).")
@click.option("--audio", default=None, metavar="video|DIR",
              help="Audio queries: 'video' uses each video's own track; DIR holds files named by video stem.")
@click.option("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP hub id or local directory.")
@click.option("--clap-model", default="laion/clap-htsat-fused", help="CLAP hub id or local directory (with --audio).")
@click.option("--frames", default=32, type=click.IntRange(1, 1024), help="Frames sampled per video (N_v).")
@click.option("--max-words", default=32, type=click.IntRange(3, 77), help="Text tokens per caption, start/end included.")
@click.option("--audio-segments", default=32, type=click.IntRange(1, 256), help="Audio windows per video (N_a).")
@click.option("--batch-size", default=64, type=click.IntRange(1), help="Frames (or audio windows) per encoder forward.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps. "
                                               "Under torchrun, auto and cuda mean cuda:LOCAL_RANK.")
@click.option("--workers", default=default_workers(), type=click.IntRange(0),
              help="Decoding processes (0: decode in the main process).")
@click.option("--all-videos", is_flag=True, help="With --annotations, also extract videos no caption names (distractors).")
@click.option("--overwrite", is_flag=True, help="Start the store over instead of resuming.")
@click.option("--redo", multiple=True, metavar="VIDEO",
              help="Extract this video again although it is done (its path relative to VIDEOS, as an error "
                   "naming a damaged video gives it); repeat for several. The rest resumes as usual.")
@click.option("--num-shards", default=1, type=click.IntRange(1),
              help="Split the videos among this many processes (default under torchrun: WORLD_SIZE).")
@click.option("--shard-index", default=0, type=click.IntRange(0),
              help="Which shard this process extracts (default under torchrun: RANK).")
@click.option("--finalize", "finalize_only", is_flag=True,
              help="Extract nothing: check that every video of the split (of every split without --split) is "
                   "extracted or recorded as failed, record it, consolidate the metadata. After a SLURM array.")
@click.pass_context
def main(ctx, videos, out, annotations, split, audio, clip_model, clap_model, frames, max_words, audio_segments,
         batch_size, device, workers, all_videos, overwrite, redo, num_shards, shard_index, finalize_only):
    """Extract frozen CLIP (and CLAP) features of the videos under VIDEOS into a cache.

    \b
    Examples:
      varcmp-extract videos/ --out cache.zarr --annotations ucf_crime_test.xlsx --split test
      varcmp-extract videos/ --out cache.zarr --audio video --split test
      varcmp-extract videos/ --out cache.zarr --clip-model /models/clip-vit-base-patch32

    \b
    Several processes, one store:
      torchrun --nproc-per-node 4 -m varcmp.extract videos/ --out cache.zarr --split train
      varcmp-extract videos/ --out cache.zarr --num-shards 8 --shard-index $SLURM_ARRAY_TASK_ID
      varcmp-extract --out cache.zarr --finalize --split train     # once, after the array

    Re-running the same command resumes: finished videos are kept, failed ones are retried.
    The last shard to finish (rank 0 under torchrun) finalizes the split; --finalize checks it
    and reports the videos that are missing.
    """
    from rich.console import Console

    console = Console(stderr=True)

    if finalize_only:
        sys.exit(_finalize_command(ctx, videos, out, annotations, split, all_videos, overwrite, console))
    if videos is None:
        raise click.UsageError("missing argument VIDEOS, the folder of videos (only --finalize runs without it)")
    env = shards_from_env(ctx)
    if env is not None:
        num_shards, shard_index = env
    opt = Options(root=videos, out=out, annotations=annotations, split=split, clip_model=clip_model,
                  clap_model=clap_model, audio=audio, frames=frames, max_words=max_words,
                  audio_segments=audio_segments, batch_size=batch_size, device=device, workers=workers,
                  overwrite=overwrite, num_shards=num_shards, shard_index=shard_index, all_videos=all_videos,
                  distributed=env is not None and env[0] > 1, redo=tuple(redo))
    # under torchrun: the ranks' process group lives until every rank has printed its report
    group = join_group(console) if opt.distributed else None
    try:  # a VarcmpError is one line and exit code 2 (OneLineErrors): under torchrun the others then stop
        summary = run(opt, console, group)
    except RuntimeError as e:  # an encoder that cannot be loaded, a decoding pool that broke
        raise CommandError(str(e)) from None
    if summary.interrupted and group is None:  # one line, as every command (torchrun's ranks report together)
        raise Interrupted(interrupted_line(summary, opt))
    code = report(summary, opt, console)
    if group is not None:
        exit_together(group, code)
    sys.exit(code)


if __name__ == "__main__":
    main()
