"""`varcmp-train`: learn VarCMP's heads from a feature cache (no encoder runs here).

    varcmp-train cache.zarr --out runs/ucf                       # text queries (UCFCrime-AR)
    varcmp-train cache.zarr --out runs/xd --query audio          # audio queries (XDViolence-AR)
    varcmp-train cache.zarr --out runs/abl --levels coarse,fine --no-anomaly-weighting
    varcmp-train cache.zarr --out runs/ucf --resume              # continue an interrupted run
    torchrun --nproc-per-node 4 -m varcmp.train cache.zarr --out runs/ucf   # DDP, 4 GPUs (batch 8 = 4 x 2)

Decisions (the paper gives the loss, AdamW, lr 1e-4, batch 8, 15 epochs, M = 4; the rest is ours):

- Pairs, text: a video with several captions contributes ONE caption per epoch, drawn anew each
  epoch (seeded). An epoch is thus one pass over the training videos, and two captions of the same
  video never meet in a batch (they would be false negatives of each other in InfoNCE). Captions
  whose video was not extracted are left out. Audio: each extracted video with at least one valid
  CLAP segment is a pair (its own track); videos without audio are left out of training.
- Validation: a subset of the TRAINING split's paired videos (default 10 %, at least 2), drawn
  with a seeded generator and stratified by the normal/anomalous label, held out of every batch.
  Each epoch it is scored with `evaluate`'s own functions (all captions of the validation videos
  as queries); the best epoch is the one with the highest mean of the two R@1 (query->video and
  video->query; the earlier epoch wins ties). The untrained model is scored too (epoch 0, for
  reference; not eligible). The test split is never read. `--val-fraction 0` disables model
  selection: best.safetensors is then the last epoch.
- Optimisation: AdamW (weight decay on all parameters, torch's default 0.01: the paper gives
  none) with a constant learning rate (the paper gives no schedule; a constant one also makes a
  run resumable to more epochs). The batch order of epoch e depends only on (seed, e). A trailing
  batch of a single pair (no negative for InfoNCE) is merged into the previous batch.
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
  so loading never executes code); history.json. A non-finite loss stops the run at once: nothing
  of that epoch is written.
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
  changes. --batch-size is the GLOBAL batch (the paper's 8): every process builds the same batches
  (seeded by (seed, epoch)), encodes its contiguous share (batch / world_size pairs, the uneven
  trailing batch padded), and all-gathers the video and query embeddings, so the InfoNCE is over the
  whole batch; the gradient then equals one process's on the same batch (see TrainStep). Dropout and
  the perturbed top-k draw per process, seeded by (seed, epoch, rank): a resumed DDP run redraws the
  same. Process 0 alone validates, writes the run directory and prints; every epoch the processes
  compare a hash of their weights (recorded in history.json) and stop if they differ. All processes
  must see the same cache and the same run directory (a shared filesystem across nodes): checked."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
import click
import numpy as np
import torch

from .cache.reader import open_cache
from .model.checkpoint import CheckpointError, cache_fingerprint, check_compatible, save
from .atomic import atomic_write, stale_temp_files
from .cli.common import Interrupted, OneLineErrors
from .training.distributed import DistInfo, all_gather_object, barrier, distributed, env_int_or, is_dist_error, local_rows, rank_seed
from .encoders.frozen import resolve_device, weights_hash
from .cli.markup import lit
from .cli.options import cli_options, settings_of
from .cli.progress import progress_bar
from .model import VarCMP
from .training import NonFiniteLoss, OutputError, TrainError
from .training.options import Runtime, TrainOptions
from .training.data import Plan, Rows, TEXT_KEYS, available_memory, bytes_needed, describe_caption, describe_video, epoch_batches, load_validation, plan_data, video_keys
from .training.state import STATE_FORMAT, STATE_NAME, holds_epoch, rng_state, save_state, set_rng_state, load_state
from .training.step import TrainStep, autocast, resolve_precision, val_score, validate
from .errors import VarcmpError, first_line


HISTORY_NAME = "history.json"
RUN_FILES = ("best.safetensors", "best.json", "last.safetensors", "last.json", STATE_NAME, HISTORY_NAME)
RESUMABLE = ("epochs",)  # the only hyper-parameter that --resume may change
PARTS = ("loss", "v2q", "q2v", "bce", "sim_total")  # loss parts averaged per epoch


# ----------------------------------------------------------------------------- options

def _check_resume(st: dict, path: Path, cache, opts: TrainOptions, plan: Plan) -> None:
    try:
        check_compatible({"cache": st.get("cache")}, cache, path)
    except CheckpointError as e:
        raise TrainError(f"cannot resume: {e}") from None
    stored, now = st.get("train") or {}, opts.jsonable()
    diff = [k for k in sorted(set(stored) | set(now)) if k not in RESUMABLE and stored.get(k) != now.get(k)]
    if diff:
        what = ", ".join(f"{k}: {stored.get(k)!r} there, {now.get(k)!r} now" for k in diff[:5])
        raise TrainError(f"cannot resume {path}: it was trained with other settings ({what}); pass the same "
                         "options, or --overwrite to start over")
    if st.get("plan") != plan.digest():
        raise TrainError(f"cannot resume {path}: the videos of split '{opts.split}' differ from those the run "
                         "started with (another cache?); use --overwrite to start over")


# ----------------------------------------------------------------------------- training

@dataclass
class RunSummary:
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


def _prefetch(it, workers: int):
    """Iterate `fn()` results of an iterable of thunks, computing up to `workers` + 1 ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for fn in it:
            pending.append(pool.submit(fn))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def _dirs(query: str) -> tuple[str, str]:
    return ("t2v", "v2t") if query == "text" else ("a2v", "v2a")


PROBE = "varcmp-train-probe"  # the name of the writability probe's temp files


def _prepare_out(out: Path, remove: list[str]) -> None:
    """Create `out`, prove it writable (a small file written, fsynced and removed), then remove
    `remove` (--overwrite) and the temp files of writers killed mid-write: one-line TrainErrors."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"{out}: cannot create the run directory ({e.strerror or first_line(e)})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{PROBE}.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise TrainError(f"{out}: cannot write in the run directory ({e.strerror or first_line(e)})") from None
    try:
        for name in remove:
            (out / name).unlink(missing_ok=True)
        for stale in stale_temp_files(out, RUN_FILES + (PROBE,)):
            stale.unlink(missing_ok=True)
    except OSError as e:
        raise TrainError(f"{out}: cannot remove {e.filename} ({e.strerror})") from None


def _io_reason(e: BaseException) -> str:
    """Why a write failed, in words: the OSError's text (also inside safetensors' "(os error N)")."""
    x = e
    while x is not None:
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        x = x.__cause__ or x.__context__
    text = first_line(e)
    code = re.search(r"os error (\d+)", text)
    return os.strerror(int(code.group(1))) if code else text


def train(cache_path, out, opts: TrainOptions = TrainOptions(), runtime: Runtime = Runtime(), *,
          resume: bool = False, overwrite: bool = False, console=None, quiet: bool = False,
          dist: DistInfo | None = None) -> RunSummary:
    """Train VarCMP's heads on split `opts.split` of the cache; write checkpoints into `out`.

    Several processes (DDP): every process calls this with the same arguments and its `dist`
    (from `distributed()`); opts.batch_size is the global batch, split across the processes;
    process 0 alone validates, writes the run directory and prints."""
    from rich.console import Console

    main_rank = dist is None or dist.rank == 0
    world = 1 if dist is None else dist.world_size
    console = console or Console(stderr=True)
    if not main_rank:
        console, quiet = Console(stderr=True, quiet=True), True
    out = Path(out)
    if resume and overwrite:
        raise TrainError("--resume continues a run and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a directory")
    if opts.batch_size % world:
        raise TrainError(f"--batch-size {opts.batch_size} is the global batch and must be divisible by the {world} "
                         f"processes (each encodes batch-size / {world} pairs of every step)")
    cache = open_cache(cache_path)
    split = cache.split(opts.split)
    if dist is not None:
        device = dist.device
    else:
        try:
            device = resolve_device(runtime.device)
        except ValueError as e:
            raise TrainError(str(e)) from None
    amp_dtype, use_scaler = resolve_precision(runtime.precision, device)
    if runtime.data not in ("auto", "memory", "stream"):
        raise TrainError(f"--data must be auto, memory or stream, got {runtime.data!r}")
    plan = plan_data(split, opts.query, opts.val_fraction, opts.seed)
    try:
        cfg = opts.model_config(cache.spec)
    except ValueError as e:  # e.g. --top-patches above the cache's patches per frame
        raise TrainError(f"{cache.path}: {e}") from None

    existing = [f for f in RUN_FILES if (out / f).exists()]
    state = None
    remove = []
    if resume:
        if (out / STATE_NAME).exists():
            state = load_state(out / STATE_NAME)
            _check_resume(state, out / STATE_NAME, cache, opts, plan)
        elif existing:
            raise TrainError(f"{out}: no {STATE_NAME} to resume from (it holds {', '.join(existing)}); "
                             "use --overwrite to start over")
        else:
            plan.notes.append(f"nothing to resume in {out}: starting a new run")
    elif existing:
        if not overwrite:
            raise TrainError(f"{out}: holds a previous run ({', '.join(existing)}); pass --resume to continue "
                             "it or --overwrite to replace it")
        remove = existing
    if main_rank:
        _prepare_out(out, remove)
    for line in plan.notes:
        console.print(("[yellow]" if line.startswith("warning") else "[dim]") + lit(line), highlight=False,
                      soft_wrap=True)

    # ---- data
    t_load = time.perf_counter()
    need = bytes_needed(split, plan, cfg)
    avail = available_memory()
    per_node = 1 if dist is None else max(1, dist.local_world_size)  # each process holds its own copy
    memory = runtime.data == "memory" or (runtime.data == "auto" and (avail is None or need * per_node < 0.5 * avail))
    data_device = torch.device("cpu")
    if memory and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        data_device = device if need < 0.5 * free else data_device
    vsrc = Rows(split, video_keys(cfg), plan.train_rows, memory, data_device, describe_video(split, plan.paths))
    qsrc = (Rows(split, TEXT_KEYS, plan.train_queries, memory, data_device, describe_caption(split, plan))
            if opts.query == "text" else None)
    ev = load_validation(split, plan, cfg) if main_rank else None  # validation runs in process 0 only
    load_seconds = time.perf_counter() - t_load
    labels_all = torch.from_numpy(plan.labels)
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    where = f"device {device}, {precision}"
    if dist is not None:
        where = (f"{world} processes ({dist.backend}), device {device} in process 0, {precision}; global batch "
                 f"{opts.batch_size} = {opts.batch_size // world} pairs per process")
    console.print(f"[dim]{len(plan.train_rows)} training and {len(plan.val_rows)} validation videos of "
                  f"'{lit(opts.split)}' ({need / 2**30:.2f} GiB, {'in memory' if memory else 'streamed'}, read in "
                  f"{load_seconds:.1f} s); {where}", highlight=False, soft_wrap=True)

    # ---- model, optimiser, state
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % 2**32)
    random.seed(opts.seed)
    model = VarCMP(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    fingerprint = cache_fingerprint(cache)
    history: list[dict] = []
    best = {"epoch": None, "score": -math.inf}
    start = 1

    def meta(epoch, metrics):
        return {"cache": fingerprint, "train": opts.jsonable(), "epoch": epoch, "val": metrics,
                "data": {"cache_path": str(cache.path), "split": opts.split, "train_videos": int(len(plan.train_rows)),
                         "val_videos": int(len(plan.val_rows)), "plan": plan.digest()}}

    def write_history():
        doc = {"cache": str(cache.path), "split": opts.split, "train": opts.jsonable(),
               "runtime": {"device": str(device), "precision": precision, "data": "memory" if memory else "stream",
                           "world_size": world},
               "best_epoch": best["epoch"], "epochs": history,
               "training_videos": [str(p) for p in plan.paths[plan.train_rows]],
               "validation_videos": [str(p) for p in plan.paths[plan.val_rows]]}
        text = json.dumps(doc, indent=1, default=float)
        atomic_write(out / HISTORY_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))

    def write(path: Path, fn, epoch: int, committed: bool):
        """fn() writes `path`; a failure (disk full, permissions) stops the run with one line."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - OSError, safetensors' and torch's own write errors
            reason = _io_reason(e)
            kept = (f"epoch {epoch} is saved in {STATE_NAME}" if committed
                    else f"the run keeps epoch {epoch - 1}" if epoch > 1 else "nothing of the run was saved")
            raise OutputError(f"cannot write {path} ({reason}): stopped at epoch {epoch}, {kept}; make room (or fix "
                              "the permissions) and run the same command with --resume") from None

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        history, best = list(state["history"]), dict(state["best"])
        start = int(state["epoch"]) + 1
        console.print(f"resuming {lit(out)} after epoch {state['epoch']}", highlight=False, soft_wrap=True)
        if main_rank:
            # the state is the run's commit point (written first each epoch): restore whatever a kill or a full
            # disk kept from being written after it; best is then either on disk or this last epoch
            done = int(state["epoch"])
            metrics = next((r.get("val") for r in history if r["epoch"] == done), None)
            for name, epoch_of in (("last", done), ("best", best["epoch"])):
                path = out / f"{name}.safetensors"
                if holds_epoch(path, epoch_of, plan.digest()):
                    continue
                if epoch_of == done:
                    write(path, lambda p=path: save(p, model, meta(done, metrics)), done, True)
                    console.print(f"[dim]restored {lit(path)} (epoch {done}) from {STATE_NAME}",
                                  highlight=False, soft_wrap=True)
                else:
                    console.print(f"[yellow]warning: {lit(path)} does not hold epoch {epoch_of}, the best "
                                  f"epoch recorded in {STATE_NAME}", highlight=False, soft_wrap=True)
            write(out / HISTORY_NAME, write_history, done, True)
    elif ev is not None:
        t0 = time.perf_counter()
        m = validate(model, ev, device, amp_dtype)
        history.append({"epoch": 0, "val": m, "val_r1": val_score(m), "val_seconds": time.perf_counter() - t0})
        q, v = _dirs(opts.query)
        console.print(f"epoch 0 (untrained): val R@1 {q} {m['q2v']['r1']:.1f} {v} {m['v2q']['r1']:.1f}",
                      highlight=False)

    step_fn = TrainStep(model, dist)
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        # every process must start from the same epoch of the same run (out on a filesystem that all nodes share,
        # the same cache everywhere): a difference would deadlock or silently diverge
        mine = {"start": start, "plan": plan.digest(), "cache": fingerprint, "resumed": state is not None}
        seen = all_gather_object(mine)
        for r, theirs in enumerate(seen):
            if theirs != mine:
                diff = ", ".join(f"{k}: {theirs[k]!r} in process {r}, {mine[k]!r} here"
                                 for k in mine if theirs[k] != mine[k])
                raise TrainError(f"the processes disagree ({diff}): every node must see the same cache and the same "
                                 f"run directory {out} (a shared filesystem)")
        # static_graph: the parameters used are fixed by the settings (--levels, --query), not by the data, so
        # DDP learns once which are unused (e.g. patch selection without "finer")
        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None,
                                          static_graph=True)

    model.train()

    def fetch(vrows, qrows):
        lv, lq, sizes = local_rows(vrows, qrows, dist)
        return vrows, lv, sizes, vsrc.get(lv), (qsrc.get(lq) if qsrc is not None else None)

    with progress_bar(console, not quiet, transient=False,
                      fields=("loss {task.fields[loss]:.4f}", "{task.fields[rate]:.1f} steps/s")) as progress:
        for epoch in range(start, opts.epochs + 1):
            batches = epoch_batches(plan, epoch, opts.seed, opts.batch_size)  # global batches, the same everywhere
            if dist is not None:
                torch.manual_seed(rank_seed(opts.seed, epoch, dist.rank))
            task = progress.add_task(f"epoch {epoch}/{opts.epochs}", total=len(batches), loss=float("nan"), rate=0.0)
            thunks = (lambda b=b: fetch(*b) for b in batches)
            it = (fn() for fn in thunks) if memory else _prefetch(thunks, 2)
            sums = torch.zeros(5, dtype=torch.float64)
            t0 = time.perf_counter()
            for step, (vrows, lrows, sizes, vb, qb) in enumerate(it, 1):
                vb = {k: t.to(device, non_blocking=True) for k, t in vb.items()}
                labels = labels_all[lrows].to(device)
                batch_labels = labels if sizes is None else labels_all[vrows].to(device)
                if qb is not None:
                    qb = {k: t.to(device, non_blocking=True) for k, t in qb.items()}
                with autocast(device, amp_dtype):
                    parts = step_fn(vb, qb, labels, sizes, batch_labels)
                vals = torch.stack([parts[k].detach().float() for k in PARTS]).cpu()  # one sync per step
                if not torch.isfinite(vals[0]):  # the same value in every process: all stop here
                    raise NonFiniteLoss(
                        f"the loss became {vals[0].item()} at epoch {epoch}, step {step}/{len(batches)}: stopped; "
                        f"{out} keeps epoch {epoch - 1} (nothing of epoch {epoch} was written); try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(parts["backward"]).backward()  # the loss, x world size under DDP (see TrainStep)
                scaler.step(optimizer)
                scaler.update()
                sums += vals.double()
                dt = time.perf_counter() - t0
                progress.update(task, advance=1, loss=float(sums[0]) / step, rate=step / max(dt, 1e-9))
            train_seconds = time.perf_counter() - t0
            mean = (sums / len(batches)).tolist()
            rec = {"epoch": epoch, "loss": mean[0], "v2q": mean[1], "q2v": mean[2], "bce": mean[3],
                   "sim_total": mean[4], "steps": len(batches), "seconds": train_seconds}
            if dist is not None:
                digests = all_gather_object(weights_hash(model))
                if len(set(digests)) > 1:
                    raise TrainError(f"the {world} processes hold different weights after epoch {epoch} "
                                     f"({', '.join(digests)}): stopped, nothing of epoch {epoch} was written")
                rec["ranks"] = {"world_size": world, "weights_sha256": digests}
            if not main_rank:
                history.append(rec)
                barrier(dist)  # process 0 validates and writes
                continue
            metrics = None
            if ev is not None:
                t1 = time.perf_counter()
                metrics = validate(model, ev, device, amp_dtype)
                rec.update(val=metrics, val_r1=val_score(metrics), val_seconds=time.perf_counter() - t1)
            score = val_score(metrics)
            improved = ev is None or score > best["score"]
            if improved:
                best = {"epoch": epoch, "score": score if ev is not None else -math.inf}
            rec["best"] = improved
            history.append(rec)
            # the state first: it commits the epoch (--resume restores the files below from it if they are not
            # written); each file is written whole or not at all (atomic_write)
            st = {"format": STATE_FORMAT, "epoch": epoch,
                  "model": {k: t.detach().cpu() for k, t in model.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_scaler else {},
                  "rng": rng_state(device), "history": history, "best": best, "train": opts.jsonable(),
                  "cache": fingerprint, "plan": plan.digest()}
            write(out / STATE_NAME, lambda: atomic_write(out / STATE_NAME, lambda tmp: save_state(st, tmp)),
                  epoch, False)
            if improved:
                write(out / "best.safetensors", lambda: save(out / "best.safetensors", model, meta(epoch, metrics)),
                      epoch, True)
            write(out / "last.safetensors", lambda: save(out / "last.safetensors", model, meta(epoch, metrics)),
                  epoch, True)
            write(out / HISTORY_NAME, write_history, epoch, True)
            line = f"epoch {epoch}/{opts.epochs}: loss {rec['loss']:.4f} (bce {rec['bce']:.4f})"
            if metrics is not None:
                q, v = _dirs(opts.query)
                line += f"  val R@1 {q} {metrics['q2v']['r1']:.1f} {v} {metrics['v2q']['r1']:.1f}"
            progress.console.print(line + ("  [green]best[/green]" if improved and ev is not None else ""),
                                   highlight=False)
            if dist is not None:
                barrier(dist)
    return RunSummary(out, history, best["epoch"], opts.query, load_seconds, memory,
                      int(state["epoch"]) if state is not None else 0, plan.notes, model.eval(), world)


# ----------------------------------------------------------------------------- report and CLI

def saved_run(out: Path) -> str:
    """What run directory `out` holds for --resume, in words (said after Ctrl-C). The resume
    state is the run's commit point: what it holds, --resume restores."""
    path = out / STATE_NAME
    if not path.is_file():
        return f"no epoch of the run is saved in {out} (none had ended); run the same command again to start it"
    try:
        st = load_state(path)
    except TrainError:
        return f"{path} cannot be read back; run the same command with --overwrite to start over"
    best = (st.get("best") or {}).get("epoch")
    return (f"{out} holds epoch {st.get('epoch')} of the run (best so far: epoch {best}); run the same command "
            "with --resume to continue")


def report(summary: RunSummary, console) -> None:
    """The final table (epoch, loss, validation R@1 both ways, best marker) and where things are."""
    from rich.table import Table

    q, v = _dirs(summary.query)
    t = Table(title=lit(f"varcmp-train: {summary.out} (R@1 on the validation subset, %)"))
    for col in ("epoch", "loss", "bce", f"{q} R@1", f"{v} R@1", "mean", "time", "best"):
        t.add_column(col, justify="right", no_wrap=True)
    for rec in summary.history:
        m = rec.get("val")
        r1 = (f"{m['q2v']['r1']:.1f}", f"{m['v2q']['r1']:.1f}", f"{rec['val_r1']:.1f}") if m else ("-", "-", "-")
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
    console.print(f"last: {lit(summary.out / 'last.safetensors')} (epoch {last}); resume state "
                  f"{lit(summary.out / STATE_NAME)}; history {lit(summary.out / HISTORY_NAME)}", highlight=False,
                  soft_wrap=True)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Run directory: checkpoints, resume state and history.json.")
@cli_options(TrainOptions, Runtime)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def main(cache, out, resume, overwrite, quiet, **settings):
    """Train VarCMP's heads on the features in CACHE (written by varcmp-extract).

    Defaults are the paper's (AdamW, lr 1e-4, batch 8, 15 epochs, M = 4, logit scale 100).
    The best epoch is chosen on a validation subset held out of the training split (never
    the test split) by the mean of the two R@1; OUT receives best.safetensors,
    last.safetensors, last.state.pt (for --resume) and history.json.

    \b
    Examples:
      varcmp-train cache.zarr --out runs/ucf
      varcmp-train cache.zarr --out runs/xd --query audio
      varcmp-train cache.zarr --out runs/ablation --levels coarse,fine --no-anomaly-weighting
      varcmp-train cache.zarr --out runs/ucf --resume
      varcmp-train cache.h5 --out runs/ucf --epochs 30 --lr 5e-5 --seed 1 --device cpu
      torchrun --nproc-per-node 4 -m varcmp.train cache.zarr --out runs/ucf --batch-size 32

    Under torchrun (DDP: NCCL on CUDA, one GPU per process; gloo on CPU) --batch-size stays the
    global batch; process 0 alone writes OUT and prints.
    """
    from rich.console import Console

    err = Console(stderr=True)
    world, rank = env_int_or("WORLD_SIZE", 1), env_int_or("RANK", 0)
    tag = f" (process {rank} of {world})" if world > 1 and rank else ""
    try:
        opts, runtime = settings_of(TrainOptions, settings), settings_of(Runtime, settings)
        with distributed(runtime.device) as dist:
            summary = train(cache, out, opts, runtime, resume=resume, overwrite=overwrite, console=err, quiet=quiet,
                            dist=dist)
    except VarcmpError as e:  # as OneLineErrors does, with the process named under torchrun
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
    if summary.world_size == 1 or rank == 0:
        report(summary, Console())
    sys.exit(0)


if __name__ == "__main__":
    main()
