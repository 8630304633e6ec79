"""The parts of a training run between its run directory and its commits: where it computes,
its data on the devices, the model with its optimiser (new or resumed), one epoch of steps, and
the validation that picks the best epoch. `varcmp.train.train` joins them."""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..cli.markup import lit
from ..encoders.frozen import resolve_device
from ..model import VarCMP
from ..model.queries import query_kind
from ..retrieval.metrics import mean_r1_gain, r1_units
from ..retrieval.pairs import EvalData
from . import NonFiniteLoss, TrainError
from .data import (TEXT_KEYS, Plan, Rows, available_memory, bytes_needed, describe_caption, epoch_batches,
                   load_validation, video_keys)
from .distributed import DistInfo, local_rows, rank_seed, same_start, wrap_ddp
from .state import rng_state, set_rng_state
from .step import TrainStep, autocast, resolve_precision, val_score, validate

PARTS = ("loss", "v2q", "q2v", "bce", "sim_total")  # loss parts averaged per epoch


# ----------------------------------------------------------------------------- where it computes

@dataclass(frozen=True)
class Compute:
    """The device and precision of a run (resolved from its Runtime)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    use_scaler: bool               # fp16: a GradScaler

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"


def resolve_compute(runtime, dist: DistInfo | None) -> Compute:
    """The device (under torchrun: this process's), the precision; --data checked: one-line TrainErrors."""
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
    return Compute(device, amp_dtype, use_scaler)


# ----------------------------------------------------------------------------- data

@dataclass
class TrainData:
    """The training rows (in memory or streamed), the validation subset and the scored training
    subset (process 0) and the labels."""

    videos: Rows
    queries: Rows | None  # text: the captions; audio: the videos' own tracks (in `videos`)
    val: EvalData | None
    labels: torch.Tensor
    memory: bool
    nbytes: int
    seconds: float
    probe: EvalData | None = None  # plan.probe_rows: training videos scored as the validation subset is

    def fetch(self, vrows: np.ndarray, qrows: np.ndarray, dist: DistInfo | None):
        """(global video rows, this process's rows, sizes, video arrays, query arrays) of one batch."""
        lv, lq, sizes = local_rows(vrows, qrows, dist)
        return vrows, lv, sizes, self.videos.get(lv), (self.queries.get(lq) if self.queries is not None else None)


def load_data(split, plan: Plan, cfg, mode: str, device: torch.device, dist: DistInfo | None,
              validation: bool) -> TrainData:
    """The run's data: in memory when --data memory, or auto and it takes under half of the available
    RAM (on the GPU when it fits in half of its free memory); else streamed per batch."""
    t0 = time.perf_counter()
    need = bytes_needed(split, plan, cfg)
    avail = available_memory()
    per_node = 1 if dist is None else max(1, dist.local_world_size)  # each process holds its own copy
    memory = mode == "memory" or (mode == "auto" and (avail is None or need * per_node < 0.5 * avail))
    data_device = torch.device("cpu")
    if memory and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        data_device = device if need < 0.5 * free else data_device
    videos = Rows(split, video_keys(cfg), plan.train_rows, memory, data_device, split.describe_video)
    queries = (Rows(split, TEXT_KEYS, plan.train_queries, memory, data_device, describe_caption(split, plan))
               if cfg.query == "text" else None)
    val = load_validation(split, plan, cfg) if validation else None  # validation runs in process 0 only
    probe = load_validation(split, plan, cfg, plan.probe_rows) if validation else None
    return TrainData(videos, queries, val, torch.from_numpy(plan.labels), memory, need, time.perf_counter() - t0,
                     probe)


def data_line(data: TrainData, plan: Plan, split: str, compute: Compute, dist: DistInfo | None,
              batch_size: int) -> str:
    """What the run trains on, how it was read and where it computes, in one line."""
    where = f"device {compute.device}, {compute.precision}"
    if dist is not None:
        world = dist.world_size
        where = (f"{world} processes ({dist.backend}), device {compute.device} in process 0, {compute.precision}; "
                 f"global batch {batch_size} = {batch_size // world} pairs per process")
    return (f"[dim]{len(plan.train_rows)} training and {len(plan.val_rows)} validation videos of '{lit(split)}' "
            f"({data.nbytes / 2**30:.2f} GiB, {'in memory' if data.memory else 'streamed'}, read in "
            f"{data.seconds:.1f} s); {where}")


# ----------------------------------------------------------------------------- the model, new or resumed

@dataclass
class Learner:
    """The model and what updates it: the optimiser, the GradScaler and the training step (DDP-wrapped
    under torchrun, see `make_step`)."""

    model: VarCMP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compute: Compute
    step: torch.nn.Module | None = None

    def state(self) -> dict:
        """Its part of the resume state: weights, optimiser, GradScaler, RNG states."""
        return {"model": {k: t.detach().cpu() for k, t in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.compute.use_scaler else {},
                "rng": rng_state(self.compute.device)}

    def load(self, state: dict) -> None:
        """Continue from a resume state (written by `state`)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.compute.use_scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.compute.device)


def init_learner(cfg, opts, compute: Compute) -> Learner:
    """A new model seeded by --seed, AdamW (the anomaly head in a group of its own when
    --anomaly-lr-scale is not 1) and the GradScaler (enabled for fp16 only)."""
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % 2**32)
    random.seed(opts.seed)
    model = VarCMP(cfg).to(compute.device)
    groups = [{"params": list(model.parameters())}]
    if opts.anomaly_lr_scale != 1.0:  # a group of its own only then: a state of one group resumes as before
        head = {id(p) for p in model.anomaly_head.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in head]},
                  {"params": list(model.anomaly_head.parameters()), "lr_scale": opts.anomaly_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    set_learning_rate(optimizer, opts, 0.0)
    return Learner(model, optimizer, torch.amp.GradScaler(compute.device.type, enabled=compute.use_scaler), compute)


def make_step(learner: Learner, opts, dist: DistInfo | None, facts: dict, out, pos_weight: float | None = None) -> None:
    """Give `learner` its training step (`pos_weight`: the anomalous videos' weight in the MIL loss; the
    options' frame and word drop); under torchrun, once every process is seen to start from the same
    `facts` (epoch, data plan, cache), wrapped in DistributedDataParallel."""
    learner.step = TrainStep(learner.model, dist, pos_weight, opts.frame_drop, opts.word_drop)
    if dist is not None:
        same_start(facts, out)
        learner.step = wrap_ddp(learner.step, dist)
    learner.model.train()


# ----------------------------------------------------------------------------- one epoch

def train_epoch(learner: Learner, data: TrainData, plan: Plan, opts, epoch: int, progress, dist: DistInfo | None,
                out) -> dict:
    """One pass over the training videos in the batches of (seed, epoch); the epoch's history record (the
    loss parts averaged over its steps). A non-finite loss stops the run before its step is taken."""
    batches = epoch_batches(plan, epoch, opts.seed, opts.batch_size)  # global batches, the same everywhere
    if dist is not None:
        torch.manual_seed(rank_seed(opts.seed, epoch, dist.rank))
    task = progress.add_task(f"epoch {epoch}/{opts.epochs}", total=len(batches), loss=float("nan"), rate=0.0)
    thunks = (lambda b=b: data.fetch(*b, dist) for b in batches)
    batch_data = (fn() for fn in thunks) if data.memory else prefetch(thunks, 2)
    sums = torch.zeros(len(PARTS), dtype=torch.float64)
    t0 = time.perf_counter()
    for step, batch in enumerate(batch_data, 1):
        set_learning_rate(learner.optimizer, opts, epoch - 1 + (step - 1) / len(batches))
        parts = forward(learner, data.labels, *batch)
        vals = torch.stack([parts[k].detach().float() for k in PARTS]).cpu()  # one sync per step
        if not torch.isfinite(vals[0]):  # the same value in every process: all stop here
            raise NonFiniteLoss(
                f"the loss became {vals[0].item()} at epoch {epoch}, step {step}/{len(batches)}: stopped; "
                f"{out} keeps epoch {epoch - 1} (nothing of epoch {epoch} was written); try a lower --lr")
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(parts["backward"]).backward()  # the loss, x world size under DDP (see TrainStep)
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()
        sums += vals.double()
        progress.update(task, advance=1, loss=float(sums[0]) / step, rate=step / max(time.perf_counter() - t0, 1e-9))
    mean = (sums / len(batches)).tolist()
    return {"epoch": epoch, **dict(zip(PARTS, mean)), "steps": len(batches), "seconds": time.perf_counter() - t0}


def set_learning_rate(optimizer, opts, done: float) -> None:
    """Every parameter group's rate after `done` epochs: `learning_rate`, times the group's own
    scale (the anomaly head's group: --anomaly-lr-scale)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(opts, done) * group.get("lr_scale", 1.0)


def learning_rate(opts, done: float) -> float:
    """The learning rate after `done` epochs (fractional) of --epochs: --lr, constant or cosine with a
    linear warm-up. A function of the step alone, so a resumed run continues the same curve."""
    if opts.schedule == "constant":
        return opts.lr
    t = done / opts.epochs
    if t < opts.warmup:
        return opts.lr * (t + 1 / (opts.epochs * 1000)) / opts.warmup  # > 0 at the first step
    return opts.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - opts.warmup) / (1 - opts.warmup))))


def forward(learner: Learner, labels_all: torch.Tensor, vrows, lrows, sizes, vb: dict, qb: dict | None) -> dict:
    """The loss parts of one batch (this process's rows `lrows` of the global batch `vrows`)."""
    device = learner.compute.device
    vb = {k: t.to(device, non_blocking=True) for k, t in vb.items()}
    labels = labels_all[lrows].to(device)
    batch_labels = labels if sizes is None else labels_all[vrows].to(device)
    if qb is not None:
        qb = {k: t.to(device, non_blocking=True) for k, t in qb.items()}
    with autocast(device, learner.compute.amp_dtype):
        return learner.step(vb, qb, labels, sizes, batch_labels)


def prefetch(it, workers: int):
    """Iterate `fn()` results of an iterable of thunks, computing up to `workers` + 1 ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for fn in it:
            pending.append(pool.submit(fn))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


# ----------------------------------------------------------------------------- validation and the best epoch

NO_BEST = {"epoch": None, "score": -math.inf}


def validate_epoch(learner: Learner, val: EvalData, rec: dict, probe: EvalData | None = None) -> dict:
    """Score the validation subset; its metrics, also recorded in `rec` (val, val_r1, val_seconds,
    val_units: each validation video's R@1 hits, see `r1_units`, and val_auc: the anomaly head's
    video-level AUC, None with one class); and `probe`, the training subset of the same size, in the
    same way (train_subset, train_r1, train_auc: the memorisation gap is train_r1 - val_r1)."""
    t0 = time.perf_counter()
    device, amp = learner.compute.device, learner.compute.amp_dtype
    sim, metrics, auc = validate(learner.model, val, device, amp)
    rec.update(val=metrics, val_r1=val_score(metrics), val_units=r1_units(sim, val.query_video).tolist(),
               val_auc=auc)
    if probe is not None:
        _, fit, auc = validate(learner.model, probe, device, amp)
        rec.update(train_subset=fit, train_r1=val_score(fit), train_auc=auc)
    rec["val_seconds"] = time.perf_counter() - t0
    return metrics


def beyond_untrained(rec: dict, untrained: dict) -> dict:
    """The zero-shot guard: the epoch's mean validation R@1 minus the untrained model's (epoch 0), on
    the same videos, with the one-sided 95 % lower bound of a paired bootstrap over them (seed 0);
    `holds` when the bound is above 0. Recorded in the epoch's history as `over_untrained`."""
    gain, lower = mean_r1_gain(np.array(rec["val_units"]), np.array(untrained["val_units"]))
    return {"gain": gain, "lower": lower, "holds": lower > 0}


def pick_best(best: dict, epoch: int, metrics: dict | None, eligible: bool = True) -> tuple[bool, dict]:
    """(whether `epoch` is the new best, the best so far): the highest mean R@1 among the eligible
    epochs (with the zero-shot guard, those beyond the untrained model's noise), the earlier epoch on a
    tie; without validation (metrics None) every epoch is the best."""
    score = val_score(metrics)
    if metrics is not None and not (eligible and score > best["score"]):
        return False, best
    return True, {"epoch": epoch, "score": score if metrics is not None else -math.inf}


def epoch_line(rec: dict, epochs: int, query: str, metrics: dict | None, best: bool) -> str:
    """The line printed after an epoch: its loss, its validation R@1 both ways, whether it is the best."""
    line = f"epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f} (bce {rec['bce']:.4f})"
    if metrics is not None:
        q, v = query_kind(query).metric_keys
        line += f"  val R@1 {q} {metrics['q2v']['r1']:.1f} {v} {metrics['v2q']['r1']:.1f}"
        if "train_r1" in rec:
            line += f"  (training subset: mean R@1 {rec['train_r1']:.1f})"
        if rec.get("val_auc") is not None:
            line += f"  anomaly AUC {rec['val_auc']:.2f}"
        guard = rec.get("over_untrained")
        if guard and not guard["holds"]:
            line += f"  not beyond the untrained model's noise ({guard['gain']:+.1f}, bound {guard['lower']:+.1f})"
    return line + ("  [green]best[/green]" if best and metrics is not None else "")
