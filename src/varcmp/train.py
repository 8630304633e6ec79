"""`varcmp-train`: learn VarCMP's heads from a feature cache (no encoder runs here).

    varcmp-train cache.zarr --out runs/ucf                       # text queries (UCFCrime-AR)
    varcmp-train cache.zarr --out runs/xd --query audio          # audio queries (XDViolence-AR)
    varcmp-train cache.zarr --out runs/abl --levels coarse,fine --no-anomaly-weighting
    varcmp-train cache.zarr --out runs/ucf --resume              # continue an interrupted run
    torchrun --nproc-per-node 4 -m varcmp.train cache.zarr --out runs/ucf   # DDP, 4 GPUs (batch 32 = 4 x 8)

Decisions (the paper gives the loss, AdamW, lr 1e-4, batch 8, 15 epochs, M = 4; the rest is ours):

- Pairs, text: a video with several captions contributes ONE caption per epoch, drawn anew each
  epoch (seeded). An epoch is thus one pass over the training videos, and two captions of the same
  video never meet in a batch (they would be false negatives of each other in InfoNCE). Captions
  whose video was not extracted are left out. Audio: each extracted video with at least one valid
  CLAP segment is a pair (its own track); videos without audio are left out of training.
- Validation: a subset of the TRAINING split's paired videos (default 10 %, at least 2, and at
  least --val-min 80 videos up to a quarter of the split), drawn with a seeded generator and
  stratified by the normal/anomalous label, held out of every batch.
  Each epoch it is scored with `evaluate`'s own functions (all captions of the validation videos
  as queries); the best epoch is the one with the highest mean of the two R@1 (query->video and
  video->query; the earlier epoch wins ties). The untrained model, which is exactly zero-shot
  CLIP, is scored first (epoch 0) and is a candidate; with --zero-shot-guard (default) an epoch
  replaces it only if it beats it beyond the noise (the one-sided 95 % lower bound of a paired
  bootstrap over the validation videos above 0): a gain of 1.2 mean R@1 on 80 videos chose a
  coarse level that lost 6 points on test. A run none of whose epochs does keeps the untrained
  model as best.safetensors, and says so. The test split is never read. `--val-fraction 0`
  disables model selection: best.safetensors is then the last epoch.
- Optimisation: AdamW (weight decay on all parameters, torch's default 0.01: the paper gives
  none), batch 32 at lr 2e-4 (the paper's 8 at 1e-4 left 7 negatives per query and lost audio
  R@1 to memorisation), with a constant learning rate by default (the paper gives no schedule;
  a constant one also makes a run resumable to more epochs; `--schedule cosine` warms up and
  decays), the anomaly classifier at `--anomaly-lr-scale` times it (10). The batch order of
  epoch e depends only on (seed, e). A trailing batch of a single pair (no negative for
  InfoNCE) is merged into the previous batch.
  `tau` (eq. 7) defaults to 0.1: the paper gives no value.
- Precision: CUDA trains under autocast, bf16 where supported, else fp16 with a GradScaler; MPS and
  CPU train in fp32 (`--precision` overrides). A CPU run with the same --seed is repeatable.
- Data: the needed arrays of the training videos (patch features only when "finer" is active,
  audio only for --query audio) are read into memory when they take under half of the available
  RAM (/proc/meminfo; on CUDA they are moved to the GPU when they fit in half of its free
  memory); otherwise batches are read from the cache's lazy arrays by a background thread
  (`--data stream` forces this). The validation subset is always read into memory.
- Run directory: best.safetensors / last.safetensors (+ .json copies of their metadata), written
  atomically by `checkpoint.save`; last.state.pt (weights, optimiser, GradScaler, RNG states,
  history; plain tensors and Python values only, read back with torch.load(weights_only=True),
  so loading never executes code); history.json, and curves.png (the loss, the validation R@1 and
  the R@1 of as many training videos by epoch, drawn from it), and with `tensorboard` installed the
  same scalars as event files in tensorboard/ (a resumed run purges and re-logs from its state's
  epoch). A non-finite loss stops the run at once: nothing of that epoch is written.
- Faults. Every file is written to a temp file, fsynced and renamed (`checkpoint.atomic_write`):
  a `kill -9`, a crash or a full disk leaves the old file or the new one, never a partial one.
  Each epoch writes last.state.pt FIRST: it commits the epoch; best/last/history follow, and
  --resume rewrites from the state any of them that a kill or a full disk kept from being written,
  so a resumed run ends with the uninterrupted run's files (and temp files of killed writers are
  removed). The run directory is proven writable before any work (a one-line error otherwise); a
  write that fails mid-run (disk full) stops with one line naming the file and what is kept (exit
  code 1). A video whose features hold NaN / infinity, or whose chunk cannot be read (decompression
  fails), is a one-line error naming it: checked when read into memory, and on each streamed batch
  (a float64 sum per row, ~0.6 s per GiB). Garbled bytes that still decompress into finite numbers
  cannot be told from features (the cache holds no checksums).
- Several processes (DDP): under `torchrun` (WORLD_SIZE > 1) each process takes one device, CUDA:
  cuda:LOCAL_RANK with NCCL, else the CPU with gloo; without WORLD_SIZE (or WORLD_SIZE=1) nothing
  changes. --batch-size is the GLOBAL batch (32; the paper's 8): every process builds the same batches
  (seeded by (seed, epoch)), encodes its contiguous share (batch / world_size pairs, the uneven
  trailing batch padded), and all-gathers the video and query embeddings, so the InfoNCE is over the
  whole batch; the gradient then equals one process's on the same batch (see TrainStep). Dropout and
  the perturbed top-k draw per process, seeded by (seed, epoch, rank): a resumed DDP run redraws the
  same. Process 0 alone validates, writes the run directory and prints; every epoch the processes
  compare a hash of their weights (recorded in history.json) and stop if they differ. All processes
  must see the same cache and the same run directory (a shared filesystem across nodes): checked."""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
from click.core import ParameterSource

from .cache.reader import open_cache
from .cli.common import Interrupted, OneLineErrors, report_console
from .cli.markup import lit
from .cli.options import cli_options, settings_of
from .cli.progress import progress_bar
from .errors import VarcmpError, first_line
from .model import VarCMP
from .model.losses import balance_weight
from .model.queries import query_kind
from .training import TrainError
from .training.data import plan_data
from .training.distributed import DistInfo, barrier, distributed, env_int_or, is_dist_error, same_weights
from .training.loop import (NO_BEST, beyond_untrained, data_line, epoch_line, init_learner, load_data, make_step,
                            pick_best, resolve_compute, train_epoch, validate_epoch)
from .training.options import RECIPES, Runtime, TrainOptions
from .training.rundir import HISTORY_NAME, RunDir, open_run, saved_run
from .training.state import STATE_NAME


@dataclass
class RunSummary:
    """What `train` returns: the run's history and best epoch, how its data was read, its final model."""

    out: Path
    history: list[dict]
    best_epoch: int | None
    query: str
    load_seconds: float = 0.0
    memory: bool = True
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)
    model: VarCMP | None = None  # the model after the last epoch (eval mode)
    world_size: int = 1


def train(cache_path, out, opts: TrainOptions = TrainOptions(), runtime: Runtime = Runtime(), *,
          resume: bool = False, overwrite: bool = False, console=None, quiet: bool = False,
          dist: DistInfo | None = None) -> RunSummary:
    """Train VarCMP's heads on split `opts.split` of the cache; write checkpoints into `out`.

    Several processes (DDP): every process calls this with the same arguments and its `dist`
    (from `distributed()`); opts.batch_size is the global batch, split across the processes;
    process 0 alone validates, writes the run directory and prints."""
    main_rank, world = dist is None or dist.rank == 0, 1 if dist is None else dist.world_size
    console, quiet = _console(console, quiet, main_rank)
    out = Path(out)
    _check_request(out, opts, resume, overwrite, world)
    cache = open_cache(cache_path)
    split = cache.split(opts.split)
    compute = resolve_compute(runtime, dist)
    plan = plan_data(split, opts.query, opts.val_fraction, opts.seed, opts.val_min)
    cfg = _model_config(opts, cache)

    # ---- the run directory (new, resumed or replaced), then the data
    state = open_run(out, cache, opts, plan, resume, overwrite, prepare=main_rank)
    for line in plan.notes:
        console.print(("[yellow]" if line.startswith("warning") else "[dim]") + lit(line), highlight=False,
                      soft_wrap=True)
    data = load_data(split, plan, cfg, runtime.data, compute.device, dist, validation=main_rank)
    console.print(data_line(data, plan, opts.split, compute, dist, opts.batch_size), highlight=False, soft_wrap=True)
    files = RunDir(out, cache, opts, plan, {"device": str(compute.device), "precision": compute.precision,
                                            "data": "memory" if data.memory else "stream", "world_size": world})

    # ---- init or resume
    learner = init_learner(cfg, opts, compute)
    history, best, start, untrained = [], dict(NO_BEST), 1, None
    if state is not None:
        # the seed's untrained model, should best.safetensors still have to be written from it (epoch 0)
        untrained = copy.deepcopy(learner.model) if main_rank and state["best"]["epoch"] == 0 else None
        learner.load(state)
        history, best, start = list(state["history"]), dict(state["best"]), int(state["epoch"]) + 1
        console.print(f"resuming {lit(out)} after epoch {state['epoch']}", highlight=False, soft_wrap=True)
        if main_rank:
            files.restore(state, learner.model, console, untrained)
        untrained = None
    elif data.val is not None:  # the untrained model (zero-shot) is a candidate: training must beat it
        rec = _validate_untrained(learner, data, opts.query, console)
        rec["best"], best = pick_best(best, 0, rec["val"])
        history.append(rec)
        untrained = copy.deepcopy(learner.model)  # written as best at the first commit if still the best
    make_step(learner, opts, dist, {"start": start, "plan": plan.digest(), "cache": files.fingerprint,
                                    "resumed": state is not None}, out, _pos_weight(opts, plan, console))

    # ---- the epochs: each trained, then (process 0) validated and committed
    with progress_bar(console, not quiet, transient=False,
                      fields=("loss {task.fields[loss]:.4f}", "{task.fields[rate]:.1f} steps/s")) as progress:
        for epoch in range(start, opts.epochs + 1):
            rec = train_epoch(learner, data, plan, opts, epoch, progress, dist, out)
            if dist is not None:
                rec["ranks"] = same_weights(learner.model, dist, epoch)
            if not main_rank:
                history.append(rec)
            else:
                metrics = validate_epoch(learner, data.val, rec, data.probe) if data.val is not None else None
                if metrics is not None and opts.zero_shot_guard and history and history[0]["epoch"] == 0:
                    rec["over_untrained"] = beyond_untrained(rec, history[0])
                rec["best"], best = pick_best(best, epoch, metrics, rec.get("over_untrained", {}).get("holds", True))
                history.append(rec)
                files.commit(epoch, learner.state(), learner.model, metrics, rec["best"], history, best,
                             untrained if best["epoch"] == 0 else None)
                untrained = None
                progress.console.print(epoch_line(rec, opts.epochs, opts.query, metrics, rec["best"]),
                                       highlight=False)
            if dist is not None:
                barrier(dist)  # process 0 validates and writes
    if main_rank:
        files.close()
    return RunSummary(out, history, best["epoch"], opts.query, data.seconds, data.memory,
                      int(state["epoch"]) if state is not None else 0, plan.notes, learner.model.eval(), world)


def _console(console, quiet: bool, main_rank: bool):
    """(console, quiet) of this process: process 0 alone prints."""
    from rich.console import Console

    if not main_rank:
        return Console(stderr=True, quiet=True), True
    return console or Console(stderr=True), quiet


def _check_request(out: Path, opts: TrainOptions, resume: bool, overwrite: bool, world: int) -> None:
    """The checks that need no cache: --resume/--overwrite, --out, the global batch over the processes."""
    if resume and overwrite:
        raise TrainError("--resume continues a run and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a directory")
    if opts.batch_size % world:
        raise TrainError(f"--batch-size {opts.batch_size} is the global batch and must be divisible by the {world} "
                         f"processes (each encodes batch-size / {world} pairs of every step)")


def _model_config(opts: TrainOptions, cache):
    try:
        return opts.model_config(cache.spec)
    except ValueError as e:  # e.g. --top-patches above the cache's patches per frame
        raise TrainError(f"{cache.path}: {e}") from None


def _pos_weight(opts: TrainOptions, plan, console) -> float | None:
    """The anomalous videos' weight in the MIL loss: n_normal / n_anomalous of the training videos
    (--balance-anomaly, the default), None for the paper's unweighted loss."""
    if not opts.balance_anomaly:
        return None
    labels = plan.labels[plan.train_rows]
    weight = balance_weight(labels)
    console.print(f"[dim]MIL loss: anomalous videos weighted {weight:.3g} (n_normal / n_anomalous = "
                  f"{int((labels == 0).sum())} / {int((labels > 0).sum())} training videos; --no-balance-anomaly: "
                  "unweighted)", highlight=False, soft_wrap=True)
    return weight


def _validate_untrained(learner, data, query: str, console) -> dict:
    """Epoch 0 of the history: the untrained model's validation metrics (zero-shot; the best until an
    epoch validates above it)."""
    rec = {"epoch": 0}
    m = validate_epoch(learner, data.val, rec, data.probe)
    q, v = query_kind(query).metric_keys
    console.print(f"epoch 0 (untrained): val R@1 {q} {m['q2v']['r1']:.1f} {v} {m['v2q']['r1']:.1f}", highlight=False)
    return rec


# ----------------------------------------------------------------------------- report and CLI

def report(summary: RunSummary, console) -> None:
    """The final table (epoch, loss, validation R@1 both ways, best marker) and where things are."""
    from rich.table import Table

    q, v = query_kind(summary.query).metric_keys
    t = Table(title=lit(f"varcmp-train: {summary.out} (R@1 on the validation subset, %; train mean: the mean "
                        "R@1 on as many training videos, the memorisation gap's other side)"))
    for col in ("epoch", "loss", "bce", f"{q} R@1", f"{v} R@1", "mean", "train mean", "time", "best"):
        t.add_column(col, justify="right", no_wrap=True)
    for rec in summary.history:
        m = rec.get("val")
        r1 = (f"{m['q2v']['r1']:.1f}", f"{m['v2q']['r1']:.1f}", f"{rec['val_r1']:.1f}") if m else ("-", "-", "-")
        r1 += (f"{rec['train_r1']:.1f}" if "train_r1" in rec else "-",)
        secs = rec.get("seconds", 0.0) + rec.get("val_seconds", 0.0)
        t.add_row("0 (init)" if rec["epoch"] == 0 else str(rec["epoch"]),
                  f"{rec['loss']:.4f}" if "loss" in rec else "-", f"{rec['bce']:.4f}" if "bce" in rec else "-",
                  *r1, f"{secs:.1f} s", "*" if rec["epoch"] == summary.best_epoch else "")
    console.print(t)
    last = max((r["epoch"] for r in summary.history), default=0)
    if summary.best_epoch is not None:
        picked = ("by the mean validation R@1" if any(r.get("val") for r in summary.history)
                  else "the last one: --val-fraction 0 holds out no validation videos to choose by")
        console.print(f"best: {lit(summary.out / 'best.safetensors')} (epoch {summary.best_epoch}, {picked})",
                      highlight=False, soft_wrap=True)
        if summary.best_epoch == 0:
            guarded = any("over_untrained" in r for r in summary.history)
            console.print("[yellow]warning: no epoch validated above the untrained model"
                          + (" beyond the noise (--zero-shot-guard)" if guarded else "")
                          + ", so best.safetensors is the untrained model (zero-shot); see curves.png, and try "
                          "fewer epochs or a lower --lr", highlight=False, soft_wrap=True)
    console.print(f"last: {lit(summary.out / 'last.safetensors')} (epoch {last}); resume state "
                  f"{lit(summary.out / STATE_NAME)}; history {lit(summary.out / HISTORY_NAME)}", highlight=False,
                  soft_wrap=True)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Run directory: checkpoints, resume state and history.json.")
@cli_options(TrainOptions, Runtime)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="varcmp",
              help="paper: the paper's recipe (constant lr 1e-4 for every head, batch 8, 15 epochs, the unweighted "
                   "MIL loss, no augmentation, TS2-Net's patch selector and top-k noise, no zero-shot guard) for "
                   "the settings not given on the command line; varcmp: the defaults shown here.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def main(cache, out, recipe, resume, overwrite, quiet, **settings):
    """Train VarCMP's heads on the features in CACHE (written by varcmp-extract).

    Defaults are the paper's (AdamW, 15 epochs, M = 4, logit scale 100 for text) and what our
    study found to help (batch 32 at lr 2e-4 instead of 8 at 1e-4, --selector-cos 0.001,
    --anomaly-lr-scale 10, the balanced MIL loss, --mil-k max, --temporal-input centred,
    --anomaly-input split, logit scale 20 for audio, --val-min 80, the zero-shot guard);
    --recipe paper gives the paper's alone.
    The best epoch is chosen on a validation subset held out of the training split (never
    the test split) by the mean of the two R@1; OUT receives best.safetensors,
    last.safetensors, last.state.pt (for --resume), history.json and curves.png (the learning
    curves).

    \b
    Examples:
      varcmp-train cache.zarr --out runs/ucf
      varcmp-train cache.zarr --out runs/xd --query audio
      varcmp-train cache.zarr --out runs/ablation --levels coarse,fine --no-anomaly-weighting
      varcmp-train cache.zarr --out runs/ucf --resume
      varcmp-train cache.h5 --out runs/ucf --epochs 30 --lr 5e-5 --seed 1 --device cpu
      torchrun --nproc-per-node 4 -m varcmp.train cache.zarr --out runs/ucf --batch-size 64

    Under torchrun (DDP: NCCL on CUDA, one GPU per process; gloo on CPU) --batch-size stays the
    global batch; process 0 alone writes OUT and prints.
    """
    with _errors_of_this_process(out) as (err, rank):
        ctx = click.get_current_context()  # the recipe's settings, where the command line gives none
        chosen = {k: v for k, v in settings.items()
                  if k not in RECIPES[recipe] or ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
        opts, runtime = settings_of(TrainOptions, {**RECIPES[recipe], **chosen}), settings_of(Runtime, settings)
        with distributed(runtime.device) as dist:
            summary = train(cache, out, opts, runtime, resume=resume, overwrite=overwrite,
                            console=err, quiet=quiet, dist=dist)
    if summary.world_size == 1 or rank == 0:
        report(summary, report_console())
    sys.exit(0)


@contextmanager
def _errors_of_this_process(out: Path):
    """How `main` ends on an error: as OneLineErrors does, with the process named under torchrun (a
    process whose peers went away says so); Ctrl-C says what `out` keeps. Yields (the stderr
    console, this process's rank)."""
    from rich.console import Console

    err = Console(stderr=True)
    world, rank = env_int_or("WORLD_SIZE", 1), env_int_or("RANK", 0)
    tag = f" (process {rank} of {world})" if world > 1 and rank else ""
    try:
        yield err, rank
    except VarcmpError as e:
        err.print(f"[red]error[/red]{tag}: {lit(e)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        raise Interrupted("" if tag else f"interrupted: {saved_run(out)}") from None
    except Exception as e:  # noqa: BLE001
        if world > 1 and is_dist_error(e):  # another process failed first: its own error says why
            err.print(f"[red]error[/red]{tag}: lost the other processes ({lit(first_line(e, 160))})",
                      highlight=False, soft_wrap=True)
            sys.exit(1)
        raise

if __name__ == "__main__":
    main()
