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

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import click
import numpy as np

from .cache.locks import Locks, process_running
from .cache.reader import Completeness
from .cache.store import fault_point, is_hdf5
from .cache.writer import CacheWriter, probe_target, remove_store
from .cache_schema import DONE, FAILED, SPLIT_KEY, TEXT_CHUNK, CacheError, CacheSpec, CacheWriteError, VideoFeatures
from .cli.common import CommandError, Interrupted, OneLineErrors
from .cli.markup import lit
from .cli.progress import progress_bar
from .media.audio import AUDIO_MIX, AUDIO_RATE
from .media.decoding import decoded, decoders
from .media.plan import Plan, audio_source, looks_local, make_plan

# --------------------------------------------------------------------------
# Main side


@dataclass
class Options:
    root: Path
    out: Path
    annotations: Path | None = None
    split: str = "train"
    clip_model: str = "openai/clip-vit-base-patch32"
    clap_model: str = "laion/clap-htsat-fused"
    audio: str | None = None  # None, "video", or a directory
    frames: int = 32
    max_words: int = 32
    audio_segments: int = 32
    batch_size: int = 64
    device: str = "auto"
    workers: int = 1
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    all_videos: bool = False
    distributed: bool = False  # shards from torchrun's RANK / WORLD_SIZE (set by the CLI, not by API users)
    redo: tuple[str, ...] = ()  # videos (paths relative to the root) to extract again although done


@dataclass
class Summary:
    total: int = 0  # videos in this shard
    already: int = 0  # done before this run
    done: int = 0  # extracted by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this shard
    noted: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # (path, [(kind, text)]), this run
    failed_elsewhere: list[tuple[str, str]] = field(default_factory=list)  # other shards', when this one finalized
    frames: int = 0
    queries: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    video_seconds: float = 0.0  # the video loop alone (decode, encode, write)
    interrupted: bool = False
    plan: Plan | None = None
    final: Completeness | None = None  # the split's state when this process finalized it
    remaining: int = 0  # videos of the split not yet extracted when this process ended (not finalized)
    note: str = ""  # one line about finalization for the report
    exit_code: int | None = None  # decided by the run itself when shards agree on it (torchrun)


class _Group:
    """torchrun's ranks, joined in a gloo process group (CPU only) for the final barrier."""

    def __init__(self, dist, long):
        self.dist, self.long = dist, long
        self.rank = dist.get_rank()

    def barrier(self) -> None:
        self.dist.barrier(group=self.long)

    def peers(self) -> list[tuple[str, int]]:
        """(host, pid) of every rank, in rank order (a collective: every rank calls it)."""
        import socket

        out: list = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, (socket.gethostname(), os.getpid()), group=self.long)
        return [tuple(x) for x in out]

    def max(self, value: int) -> int:
        import torch

        t = torch.tensor([value], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.long)
        return int(t.item())

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


def _join_group(console) -> _Group | None:
    """The process group of a torchrun launch (MASTER_ADDR / MASTER_PORT set), or None. Without
    one the ranks still fill the store; only the exit codes are then each rank's own."""
    from datetime import timedelta

    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return None
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return None
        dist.init_process_group("gloo")
        # shards end hours apart: the final barrier of this group waits up to a week
        long = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    except Exception as e:  # noqa: BLE001 - the store still coordinates the writers
        console.print(f"[yellow]warning[/yellow]: no gloo process group ({type(e).__name__}: "
                      f"{lit(str(e).splitlines()[0]) if str(e) else ''}); ranks coordinate through the store only",
                      highlight=False, soft_wrap=True)
        return None
    return _Group(dist, long)


def _exit_code(summary: Summary) -> int:
    if summary.interrupted:
        return 130
    plan = summary.plan
    return 1 if (summary.failed or summary.failed_elsewhere or plan.rejected or plan.missing) else 0


def run(opt: Options, console=None, group: "_Group | None" = None) -> Summary:
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
    probe_target(opt.out, replace=opt.overwrite, keep=_inputs(opt))

    summary = Summary(plan=plan)
    locks = Locks(opt.out)
    with ExitStack() as stack:
        if group is None and opt.distributed and opt.num_shards > 1:
            group = _join_group(console)
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
    for flag, name in (("--clip-model", opt.clip_model), ("--clap-model", opt.clap_model if opt.audio else None)):
        if name and looks_local(name) and not Path(name).expanduser().is_dir():
            raise click.UsageError(f"{flag} {name}: no such directory (give a local model directory or a hub id)")


def _nothing_to_extract(opt: Options, plan: Plan) -> str:
    """Why a plan holds no video, on one line: with a caption file, its first refused rows."""
    if opt.annotations is None:
        return f"{opt.root}: no videos to extract"
    refused = plan.rejected + plan.missing
    if not refused:
        return f"{opt.root}: no videos to extract ({opt.annotations} has no caption rows)"
    shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more rows" if len(refused) > 3 else "")
    return f"{opt.root}: no videos to extract (no caption row of {opt.annotations} is usable: {shown})"


def _reset(sw, plan: Plan, opt: Options, mine: np.ndarray) -> None:
    """--redo: the named videos (of this shard) are pending again, so this run extracts them anew
    (e.g. after a damaged chunk); their old data stays until the new data is written."""
    if not opt.redo:
        return
    row = {v.path: i for i, v in enumerate(plan.videos)}
    ours = set(int(i) for i in mine)
    for name in opt.redo:
        key = PurePosixPath(str(name).replace("\\", "/")).as_posix()
        if key not in row:
            raise click.UsageError(f"--redo {name}: not a video of split '{opt.split}' (give its path relative to "
                                   f"{opt.root}, as the error that named it did)")
        if row[key] in ours:
            sw.reset_video(row[key])


def _inputs(opt: Options) -> list[Path]:
    """What an extraction reads, which --overwrite never deletes: the video root, the caption
    file, the audio folder and local model folders."""
    audio = opt.audio if opt.audio != "video" else None
    models = [Path(m).expanduser() for m in (opt.clip_model, opt.clap_model) if m and looks_local(m)]
    return [Path(p) for p in (opt.root, opt.annotations, audio) if p] + models


def _device_name(opt: Options) -> str:
    """Under torchrun each rank of a node takes its own GPU (LOCAL_RANK) unless --device names one."""
    local = os.environ.get("LOCAL_RANK")
    if opt.distributed and local is not None and local.isdigit() and opt.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % torch.cuda.device_count()}"
    return opt.device


def _extract(opt: Options, plan: Plan, pool, summary: Summary, locks: Locks, group: _Group | None, console) -> None:
    """Load the encoders, open the split, encode this shard's pending videos (and, in shard 0, the
    captions) while `pool` decodes them, then `_finish`. Ctrl-C ends the encoding, not the run."""
    clip, clap = _load_encoders(opt)
    plan.notes.extend(_cut_captions(clip, plan, opt))
    mine = np.arange(opt.shard_index, len(plan.videos), opt.num_shards)
    writer, sw, todo = _open_split(opt, plan, clip, clap, mine, locks)
    try:
        try:
            summary.total, summary.already = len(mine), len(mine) - len(todo)
            paths = [plan.videos[i].path for i in todo]
            jobs = [(i, str(opt.root / p), audio_source(opt.audio, opt.root, p, plan.notes)) for i, p in zip(todo, paths)]
            results = decoded(jobs, pool, opt.workers)  # decoding starts now, text encoding overlaps it
            if opt.shard_index == 0 and plan.queries:
                summary.queries = _encode_text(sw, clip, [q.text for q in plan.queries], opt.max_words)
            _encode_videos(opt, sw, clip, clap, results, len(jobs), summary, console)
        except KeyboardInterrupt:
            summary.interrupted = True
        _finish(opt, plan, writer, sw, mine, locks, group, summary)
    finally:
        writer.close()


def _load_encoders(opt: Options):
    """(CLIP, CLAP or None) on the run's device."""
    from .encoders.frozen import ClapEncoder, ClipEncoder, resolve_device

    try:
        device = resolve_device(_device_name(opt))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    clip = ClipEncoder(opt.clip_model, device)
    return clip, (ClapEncoder(opt.clap_model, device) if opt.audio else None)


def _records(opt: Options, plan: Plan, clip, clap) -> tuple[CacheSpec, dict, dict, dict]:
    """What the store records of this run: its spec, encoders and preprocessing, and the split's attributes."""
    spec = CacheSpec(num_frames=opt.frames, num_patches=clip.num_patches, dim=clip.dim, max_words=opt.max_words,
                     audio_segments=opt.audio_segments if clap else 0, audio_dim=clap.dim if clap else 512)
    encoders = {"clip": clip.info(), "clap": clap.info() if clap else None}
    preprocessing = {
        "frames": "centres of N equal segments of the video (first frame to the end of the last); the frame on "
                  "screen at each, upright (display rotation applied); fewer frames -> mask",
        "image_processor": {k: v for k, v in clip.processor.to_dict().items() if not k.startswith("_")},
        "text": f"CLIP tokenizer, {opt.max_words} tokens incl. start/end, words = text_projection(last_hidden_state)",
        "audio": (f"{AUDIO_MIX}, {AUDIO_RATE} Hz; {opt.audio_segments} windows centred on the frame times, "
                  "clamp(duration/N_a, 1 s, 10 s) long; CLAP get_audio_features, is_longer=False") if clap else None,
    }
    split_attrs = {"root": str(opt.root.resolve()), "annotations": str(opt.annotations) if opt.annotations else None,
                   "audio": opt.audio, "rejected": plan.rejected, "missing": plan.missing,
                   "plan_notes": plan.notes}
    return spec, encoders, preprocessing, split_attrs


def _open_split(opt: Options, plan: Plan, clip, clap, mine: np.ndarray, locks: Locks):
    """(writer, split writer, this shard's videos still to extract), under the metadata lock: the
    store made or checked, the split made or checked, --redo applied, the split unfinalized when
    this run writes to it."""
    spec, encoders, preprocessing, split_attrs = _records(opt, plan, clip, clap)
    with locks.meta():
        if opt.overwrite:
            remove_store(opt.out, keep=_inputs(opt))
        writer = CacheWriter(opt.out, spec, encoders, preprocessing)
        try:
            sw = writer.split(opt.split, plan.videos, plan.queries, split_attrs)
            _reset(sw, plan, opt, mine)
            status = sw.video_status()
            todo = [int(i) for i in mine if status[i] != DONE]
            text_status = sw.text_status()
            if todo or (opt.shard_index == 0 and text_status is not None and (text_status != DONE).any()):
                sw.mark_unfinished()  # no longer final: this run writes to it
            writer.consolidate()
        except BaseException:
            writer.close()
            raise
    return writer, sw, todo


def _cut_captions(clip, plan: Plan, opt: Options) -> list[str]:
    """A note naming the captions longer than --max-words tokens: they are encoded cut to it
    (as search cuts a query, and says so)."""
    cut = clip.cut([q.text for q in plan.queries], opt.max_words) if plan.queries else []
    if not cut:
        return []
    rows = ", ".join(str(plan.queries[i].row) for i in cut[:5]) + (" ..." if len(cut) > 5 else "")
    return [f"{len(cut)} of {len(plan.queries)} captions cut to {opt.max_words} tokens (--max-words, start and end "
            f"included): {opt.annotations.name} row{'s' if len(cut) > 1 else ''} {rows}"]


def _finish(opt: Options, plan: Plan, writer: CacheWriter, sw, mine: np.ndarray, locks: Locks,
            group: _Group | None, summary: Summary) -> None:
    """After this process's videos: finalize the split if this process is the one to (see the
    module docstring), say where the split stands, and decide the exit code."""
    summary.failed = _failed(sw.store, opt.split, mine)
    states = _finalize_if_last(opt, writer, locks, group)
    own = next((c for c in states or [] if c.split == opt.split), None)
    if own is not None and own.complete:
        _finalized(opt, plan, sw, own, group, summary)
    else:
        _unfinished(opt, own or sw.completeness(), group, summary)
    code = _exit_code(summary)
    # the ranks agree on one code (after rank 0 finalized); see _exit_together for who exits with it
    summary.exit_code = group.max(code) if group is not None else code


def _failed(store, split: str, rows=None) -> list[tuple[str, str]]:
    """(path, reason) of the videos of `split` that failed, among `rows` (default: all), in their order."""
    status = np.asarray(store.array(f"{split}/videos/status")[:])
    rows = np.flatnonzero(status == FAILED) if rows is None else [i for i in rows if status[i] == FAILED]
    paths, errors = store.read_str(f"{split}/videos/path"), store.read_str(f"{split}/videos/error")
    return [(paths[i], errors[i]) for i in rows]


def _finalize_if_last(opt: Options, writer: CacheWriter, locks: Locks, group: _Group | None):
    """Finalize when this process is the one to: under torchrun rank 0, once every rank has
    finished; otherwise the only writer, or the last one (no other run holds the store). The
    others write the consolidated metadata only. The splits' states, None when not finalized."""
    if group is not None:
        locks.stop()
        group.barrier()
        if group.rank != 0:
            return None
        with locks.meta():
            return writer.finalize([opt.split])
    if opt.num_shards == 1 or locks.last_writer():
        with locks.meta():
            return writer.finalize()
    with locks.meta():
        writer.consolidate()
    return None


def _finalized(opt: Options, plan: Plan, sw, own: Completeness, group: _Group | None, summary: Summary) -> None:
    """This process finalized the split: the last shard's report covers every shard's failures."""
    summary.final = own
    if opt.num_shards == 1:
        return
    if group is None:
        others = [i for i in range(len(plan.videos)) if i % opt.num_shards != opt.shard_index]
        summary.failed_elsewhere = _failed(sw.store, opt.split, others)
    summary.note = (f"finalized split '{opt.split}': {own.videos} videos, {own.done} extracted, "
                    f"{own.failed} failed" + (f", {own.captions} captions" if own.captions else ""))


def _unfinished(opt: Options, state: Completeness, group: _Group | None, summary: Summary) -> None:
    """The split is not final after this process: what is missing, and who finishes it."""
    summary.remaining = len(state.missing)
    if opt.num_shards == 1:
        return
    if state.complete and group is None:
        summary.note = (f"split '{opt.split}': every video is extracted or recorded as failed; the "
                        "varcmp-extract still writing to the store finalizes it")
    elif not summary.interrupted and (group is None or group.rank == 0):
        summary.note = (f"split '{opt.split}': {len(state.missing)} of {state.videos} videos not extracted yet"
                        + (" (by other shards; the last shard to finish finalizes the store)" if group is None
                           else "") + f"; check with: varcmp-extract --out {opt.out} --finalize --split {opt.split}")


def _exit_together(group: _Group, code: int) -> None:
    """torchrun stops the other ranks (SIGTERM) as soon as one exits non-zero. So the ranks meet
    once every report is printed; the others then exit 0 at once and rank 0, last, exits with the
    code they agreed on (torchrun reports that one failure, if any)."""
    import socket

    sys.stdout.flush()
    sys.stderr.flush()
    peers = group.peers()  # also the meeting point: every rank has printed its report
    group.close()
    if group.rank != 0:
        os._exit(0)  # nothing is left to clean up: the run has ended and its output is flushed
    if code:  # let the others be gone before torchrun sees this exit code
        here = socket.gethostname()
        local = [pid for host, pid in peers[1:] if host == here]
        deadline = time.monotonic() + 10
        while any(process_running(pid) for pid in local) and time.monotonic() < deadline:
            time.sleep(0.02)
        if len(local) < len(peers) - 1 or not os.path.isdir("/proc"):
            time.sleep(0.5)  # ranks on other hosts (or no /proc to look at): a moment
    sys.exit(code)


def _encode_text(sw, clip, texts: list[str], max_words: int) -> int:
    status = sw.text_status()
    chunks = [s for s in range(0, len(texts), TEXT_CHUNK) if not (status[s:s + TEXT_CHUNK] == DONE).all()]
    for s in chunks:
        words, mask, sentence = clip.encode_text(texts[s:s + TEXT_CHUNK], max_words)
        try:
            sw.write_text(s, words.numpy(), mask.numpy(), sentence.numpy())
        except CacheWriteError as e:
            raise CacheWriteError(f"{e} while saving captions {s}-{s + len(words) - 1}; make room (or make the store "
                                  "writable) and run the same command again to resume") from None
    return len(texts)


def _encode_videos(opt: Options, sw, clip, clap, results, total: int, summary: Summary, console) -> None:
    if not total:
        return
    start, handled = time.perf_counter(), 0
    with progress_bar(console, transient=False,
                      fields=("{task.fields[vps]:.2f} videos/s  {task.fields[fps]:.1f} frames/s",)) as progress:
        task = progress.add_task(f"extract {lit(opt.split)}", total=total, vps=0.0, fps=0.0)
        for res in results:
            try:
                if "error" in res:
                    sw.fail_video(res["index"], res["error"])
                else:
                    feats = _features(res, clip, clap, opt)
                    sw.write_video(res["index"], feats)
                    summary.frames += int(feats.frame_mask.sum())
                    summary.done += 1
                    if res["notes"]:
                        summary.noted.append((summary.plan.videos[res["index"]].path, res["notes"]))
            except CacheWriteError as e:
                path = summary.plan.videos[res["index"]].path
                raise CacheWriteError(f"{e} while saving {path!r}; the videos finished before are kept: make room "
                                      "(or make the store writable) and run the same command again to resume") from None
            handled += 1
            dt = max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, vps=handled / dt, fps=summary.frames / dt)
    summary.video_seconds = time.perf_counter() - start


def _features(res: dict, clip, clap, opt: Options) -> VideoFeatures:
    import torch

    pixels = res["pixels"]
    cls, patches = [], []
    for s in range(0, len(pixels), opt.batch_size):
        c, p = clip.encode_images(pixels[s:s + opt.batch_size])
        cls.append(c)
        patches.append(p)
        if s == 0:
            fault_point("forward")
    cls_t, patch_t = torch.cat(cls).numpy(), torch.cat(patches).numpy()
    k, n = len(cls_t), opt.frames
    frame_feat = np.zeros((n, cls_t.shape[1]), np.float32)
    patch_feat = np.zeros((n,) + patch_t.shape[1:], np.float32)
    frame_feat[:k], patch_feat[:k] = cls_t, patch_t
    frame_mask = np.zeros(n, bool)
    frame_mask[:k] = True
    frame_time = np.zeros(n, np.float32)
    frame_time[:k] = res["times"]
    feats = VideoFeatures(duration=res["duration"], fps=res["fps"], frame_time=frame_time, frame_mask=frame_mask,
                          frame_feat=frame_feat, patch_feat=patch_feat,
                          note="; ".join(text for _, text in res["notes"]))
    if clap is not None:
        na = opt.audio_segments
        audio_feat = np.zeros((na, clap.dim), np.float32)
        mask = res["audio_mask"]
        if mask.any():
            audio_feat[mask] = clap.encode_windows(res["audio"], opt.batch_size)
        feats.audio_feat, feats.audio_mask, feats.audio_time = audio_feat, mask, res["audio_spans"]
    return feats


# --------------------------------------------------------------------------
# CLI


def report(summary: Summary, opt: Options, console) -> int:
    """Print the summary table and one line per problem; return the exit code."""
    from rich.table import Table

    plan = summary.plan
    t = Table(title=lit(f"varcmp-extract: {opt.out} [{opt.split}]" + (
        f" shard {opt.shard_index + 1}/{opt.num_shards}" if opt.num_shards > 1 else "")))
    for col in ("videos", "before", "new", "failed", "frames", "captions", "time", "frames/s"):
        t.add_column(col, justify="right")
    t.add_row(str(summary.total), str(summary.already), str(summary.done), str(len(summary.failed)),
              str(summary.frames), str(summary.queries), f"{summary.seconds:.1f} s",
              f"{summary.frames / max(summary.seconds, 1e-9):.1f}")
    console.print(t)
    for path, why in summary.failed:
        console.print(f"[red]failed[/red] {lit(path)}: {lit(why)}", highlight=False, soft_wrap=True)
    for path, why in summary.failed_elsewhere:
        console.print(f"[red]failed[/red] {lit(path)}: {lit(why)} (another shard)", highlight=False, soft_wrap=True)
    for line in plan.rejected:
        console.print(f"[red]rejected[/red] {lit(line)}", highlight=False, soft_wrap=True)
    for line in plan.missing:
        console.print(f"[yellow]missing[/yellow] {lit(line)}", highlight=False, soft_wrap=True)
    for line in plan.notes:
        console.print(f"[dim]note[/dim] {lit(line)}", highlight=False, soft_wrap=True)
    _report_notes(summary.noted, console)
    if plan.uncaptioned:
        console.print(f"{plan.uncaptioned} videos have no caption (kept as distractors)")
    if summary.note:
        console.print(lit(summary.note), highlight=False, soft_wrap=True)
    if summary.interrupted:
        console.print(lit(interrupted_line(summary, opt)), highlight=False, soft_wrap=True)
    return summary.exit_code if summary.exit_code is not None else _exit_code(summary)


def _report_notes(noted: list[tuple[str, list[tuple[str, str]]]], console) -> None:
    """One line per extracted video with remarks (as stored in its `note`), then their count by kind."""
    from collections import Counter

    for path, notes in noted:
        console.print(f"[dim]note[/dim] {lit(path)}: {lit('; '.join(text for _, text in notes))}",
                      highlight=False, soft_wrap=True)
    kinds = Counter(kind for _, notes in noted for kind, _ in notes)
    if kinds:
        console.print("notes: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())),
                      highlight=False, soft_wrap=True)


def interrupted_line(summary: Summary, opt: Options) -> str:
    """What an interrupted run saved, in one line."""
    return (f"interrupted: finished videos are saved in {opt.out} ({summary.already + summary.done} of this run's "
            f"{summary.total} extracted, {len(summary.failed)} failed); run the same command again to resume")


def finalize(out: Path, split: str | None = None, plan: Plan | None = None, console=None) -> int:
    """`varcmp-extract --out STORE --finalize`: check and finalize split `split` (default: every
    split) once no extraction is writing to the store; print what each split holds and what is
    missing. With `plan` (the videos and captions of an extraction command) the split must hold
    exactly those. Returns the exit code: 0, 1 when videos failed or caption rows were refused
    (as the extraction itself), 2 when a split is incomplete. Raises CacheError for a store that
    cannot be finalized."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not out.exists():
        raise CacheError(f"{out}: no such cache")
    probe_target(out)
    states, problems = _finalize_splits(out, split, plan)
    return _report_finalized(out, states, problems, console)


def _finalize_splits(out: Path, split: str | None, plan: Plan | None) -> tuple[list[Completeness], dict]:
    """Finalize under the exclusive run lock (no extraction may be running) and the metadata
    lock: the state of each split, and its (failed videos, rejected rows, missing rows)."""
    locks = Locks(out)
    locks.start(exclusive=True, busy=f"{out}: a varcmp-extract is still writing to this store; run --finalize "
                                     "once every shard has ended")
    try:
        with locks.meta():
            writer = CacheWriter.open(out)
            try:
                states = writer.finalize(_splits_to_finalize(writer, out, split, plan))
                return states, {c.split: _problems(writer.store, c.split) for c in states}
            finally:
                writer.close()
    finally:
        locks.stop()


def _splits_to_finalize(writer: CacheWriter, out: Path, split: str | None, plan: Plan | None) -> list[str]:
    """Every split, or `split`, which must exist (and hold `plan`'s videos and captions, when given)."""
    names = writer.splits()
    if split is None:
        return names
    if split not in names:
        raise CacheError(f"{out}: no split '{split}' (splits: {', '.join(names) or 'none'})")
    if plan is not None:
        writer.split(split, plan.videos, plan.queries)  # refuses another list of videos or captions
    return [split]


def _problems(store, name: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(failed videos with their reasons, rejected caption rows, missing caption rows) of split `name`."""
    attrs = store.get_attrs(name).get(SPLIT_KEY, {})
    return _failed(store, name), list(attrs.get("rejected") or []), list(attrs.get("missing") or [])


def _report_finalized(out: Path, states: list[Completeness], problems: dict, console) -> int:
    """The --finalize table, one line per problem and per video not extracted (20 per split at
    most); the exit code."""
    from rich.table import Table

    t = Table(title=lit(f"varcmp-extract --finalize: {out}"))
    for col in ("split", "videos", "done", "failed", "pending", "captions", "encoded", "state"):
        t.add_column(col, justify="left" if col in ("split", "state") else "right", no_wrap=col == "state")
    for c in states:
        t.add_row(lit(c.split), str(c.videos), str(c.done), str(c.failed), str(len(c.missing)), str(c.captions),
                  str(c.captions_encoded), "finalized" if c.complete else "incomplete")
    console.print(t)
    for c in states:
        failed, rejected, missing = problems[c.split]
        for path, why in failed:
            console.print(f"[red]failed[/red] {lit(c.split)}: {lit(path)}: {lit(why)}", highlight=False, soft_wrap=True)
        for line in rejected:
            console.print(f"[red]rejected[/red] {lit(c.split)}: {lit(line)}", highlight=False, soft_wrap=True)
        for line in missing:
            console.print(f"[yellow]missing[/yellow] {lit(c.split)}: {lit(line)}", highlight=False, soft_wrap=True)
    incomplete = [c for c in states if not c.complete]
    for c in incomplete:
        for path in c.missing[:20]:
            console.print(f"[yellow]not extracted[/yellow] {lit(c.split)}: {lit(path)}", highlight=False,
                          soft_wrap=True)
        if len(c.missing) > 20:
            console.print(f"[yellow]not extracted[/yellow] {lit(c.split)}: ... and {len(c.missing) - 20} more")
    for c in incomplete:
        console.print(f"[red]error[/red]: {lit(c.describe(out))}; run the extraction (every shard) again: it resumes; "
                      "then --finalize", highlight=False, soft_wrap=True)
    if incomplete:
        return 2
    return 1 if any(any(p) for p in problems.values()) else 0


def _finalize_command(ctx, videos, out, annotations, split, all_videos, overwrite, console) -> int:
    """`--finalize`: of every split, unless --split or VIDEOS names one (VIDEOS, with --annotations,
    also gives the videos and captions the split must hold). The exit code."""
    if overwrite:
        raise click.UsageError("--finalize checks a store; it cannot be combined with --overwrite")
    whole = videos is None and ctx.get_parameter_source("split") in (None, click.core.ParameterSource.DEFAULT)
    plan = make_plan(videos, annotations, all_videos) if videos is not None else None
    return finalize(out, None if whole else split, plan, console)


def _shards_from_env(ctx) -> tuple[int, int] | None:
    """(WORLD_SIZE, RANK) of a torchrun launch, unless --num-shards / --shard-index are given."""
    from click.core import ParameterSource

    if any(ctx.get_parameter_source(p) not in (ParameterSource.DEFAULT, None) for p in ("num_shards", "shard_index")):
        return None
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is None or rank is None:
        return None
    if not (world.isdigit() and rank.isdigit() and int(rank) < int(world)):
        raise click.UsageError(f"RANK={rank} WORLD_SIZE={world}: not a rank of a world (as torchrun sets them)")
    return int(world), int(rank)


def _default_workers() -> int:
    """Half the cores (at most 8) for decoding, divided among the ranks of a torchrun node."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    per_node = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(8, (os.cpu_count() or 2) // 2 // per_node))


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
@click.option("--workers", default=_default_workers(), type=click.IntRange(0),
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
    env = _shards_from_env(ctx)
    if env is not None:
        num_shards, shard_index = env
    opt = Options(root=videos, out=out, annotations=annotations, split=split, clip_model=clip_model,
                  clap_model=clap_model, audio=audio, frames=frames, max_words=max_words,
                  audio_segments=audio_segments, batch_size=batch_size, device=device, workers=workers,
                  overwrite=overwrite, num_shards=num_shards, shard_index=shard_index, all_videos=all_videos,
                  distributed=env is not None and env[0] > 1, redo=tuple(redo))
    # under torchrun: the ranks' process group lives until every rank has printed its report
    group = _join_group(console) if opt.distributed else None
    try:  # a VarcmpError is one line and exit code 2 (OneLineErrors): under torchrun the others then stop
        summary = run(opt, console, group)
    except RuntimeError as e:  # an encoder that cannot be loaded, a decoding pool that broke
        raise CommandError(str(e)) from None
    if summary.interrupted and group is None:  # one line, as every command (torchrun's ranks report together)
        raise Interrupted(interrupted_line(summary, opt))
    code = report(summary, opt, console)
    if group is not None:
        _exit_together(group, code)
    sys.exit(code)


if __name__ == "__main__":
    main()
