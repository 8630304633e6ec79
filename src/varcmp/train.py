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
  must see the same cache and the same run directory (a shared filesystem across nodes): checked.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

from .cache_schema import DONE, CacheError, Split, check_finite, open_cache, read_checked
from .checkpoint import (CheckpointError, atomic_write, cache_fingerprint, check_compatible, read_meta, save,
                         stale_temp_files)
from .cli import Interrupted, OneLineErrors
from .distributed import (DistInfo, DistSetupError, all_gather_object, barrier, distributed, env_int_or, first_line,
                          gather_rows, is_dist_error, local_rows, rank_seed)
from .encoders import resolve_device, weights_hash
from .evaluate import EvalData, retrieval_metrics
from .markup import lit
from .retrieval.scoring import encode_queries, encode_videos, score_matrix
from .model import LEVELS, QUERIES, ModelConfig, VarCMP

STATE_NAME = "last.state.pt"
STATE_FORMAT = "varcmp-train-state/1"
HISTORY_NAME = "history.json"
RUN_FILES = ("best.safetensors", "best.json", "last.safetensors", "last.json", STATE_NAME, HISTORY_NAME)
RESUMABLE = ("epochs",)  # the only hyper-parameter that --resume may change
PARTS = ("loss", "v2q", "q2v", "bce", "sim_total")  # loss parts averaged per epoch


class TrainError(Exception):
    """A problem of the user's run (bad options, incompatible resume...); one line."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite."""


class OutputError(TrainError):
    """A file of the run directory could not be written mid-run (disk full, permissions)."""


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class TrainOptions:
    """Every hyper-parameter of a run (stored in each checkpoint and in the resume state)."""

    split: str = "train"
    query: str = "text"
    val_fraction: float = 0.1
    levels: tuple = LEVELS
    anomaly_weighting: bool = True
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    tau: float = ModelConfig.tau
    top_patches: int = ModelConfig.top_patches
    logit_scale: float = ModelConfig.logit_scale
    dropout: float = ModelConfig.dropout
    heads: int = ModelConfig.heads
    ffn_dim: int = ModelConfig.ffn_dim
    shift_fraction: float = ModelConfig.shift_fraction
    topk_sigma: float = ModelConfig.topk_sigma
    topk_samples: int = ModelConfig.topk_samples
    seed: int = 0

    def __post_init__(self):
        levels = self.levels.split(",") if isinstance(self.levels, str) else self.levels
        object.__setattr__(self, "levels", tuple(lv.strip() for lv in levels if lv.strip()))
        if self.query not in QUERIES:
            raise TrainError(f"--query must be one of {', '.join(QUERIES)}, got {self.query!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise TrainError("--batch-size must be at least 2 (InfoNCE needs negatives in the batch)")
        if not self.lr > 0 or self.weight_decay < 0:
            raise TrainError(f"--lr must be > 0 and --weight-decay >= 0, got {self.lr} and {self.weight_decay}")
        try:  # the model's own checks, on dummy dims
            self.model_config(None)
        except ValueError as e:
            raise TrainError(str(e)) from None

    def model_config(self, spec) -> ModelConfig:
        """The ModelConfig of this run for a cache with CacheSpec `spec` (None: check only)."""
        dims = {}
        if spec is not None:
            dims = dict(dim=spec.dim, audio_dim=spec.audio_dim, num_frames=spec.num_frames,
                        num_patches=spec.num_patches, max_words=spec.max_words,
                        audio_segments=spec.audio_segments or ModelConfig.audio_segments)
        return ModelConfig(query=self.query, levels=self.levels, anomaly_weighting=self.anomaly_weighting,
                           tau=self.tau, top_patches=self.top_patches, logit_scale=self.logit_scale,
                           dropout=self.dropout, heads=self.heads, ffn_dim=self.ffn_dim,
                           shift_fraction=self.shift_fraction, topk_sigma=self.topk_sigma,
                           topk_samples=self.topk_samples, **dims)

    def jsonable(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes; not hyper-parameters (a resume may change them)."""

    device: str = "auto"     # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    data: str = "auto"       # auto | memory | stream


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainError(f"--precision fp16 needs a CUDA device (this run uses {device})")
        return torch.float16, True
    raise TrainError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- the data plan

@dataclass
class Plan:
    """Which rows of the split train and which validate. Rows are rows of /<split>/videos
    (and /<split>/text for captions)."""

    query: str
    paths: np.ndarray           # [V] every video path of the split
    labels: np.ndarray          # [V] 0/1
    train_rows: np.ndarray      # sorted video rows that are trained on
    val_rows: np.ndarray        # sorted video rows held out for validation (disjoint from train_rows)
    cap_rows: np.ndarray | None = None   # text: query rows grouped by video (ascending video row)
    cap_video: np.ndarray | None = None  # text: the video row of each entry of cap_rows
    notes: list[str] = field(default_factory=list)

    def captions_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) into cap_rows of each video row in `rows`."""
        lo = np.searchsorted(self.cap_video, rows, "left")
        return lo, np.searchsorted(self.cap_video, rows, "right") - lo

    @property
    def train_queries(self) -> np.ndarray | None:
        if self.cap_rows is None:
            return None
        return np.sort(self.cap_rows[np.isin(self.cap_video, self.train_rows)])

    def val_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, their video rows) used as validation queries (every caption of each
        validation video; audio: the video itself)."""
        if self.cap_rows is None:
            return self.val_rows, self.val_rows
        keep = np.isin(self.cap_video, self.val_rows)
        return self.cap_rows[keep], self.cap_video[keep]

    def digest(self) -> str:
        """Identifies the train/validation division (checked on --resume)."""
        h = hashlib.sha256()
        for rows in (self.train_rows, self.val_rows):
            h.update("\n".join(str(p) for p in self.paths[rows]).encode())
            h.update(b"\0")
        return "sha256:" + h.hexdigest()[:16]


def _stratified_pick(rows: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of `rows`, each label represented in proportion (largest remainder), seeded."""
    kinds = np.unique(labels)
    share = np.array([(labels == k).sum() for k in kinds], dtype=np.float64) * n / len(rows)
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    out = [rng.choice(rows[labels == k], size=t, replace=False) for k, t in zip(kinds, take) if t]
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def plan_data(split: Split, query: str, val_fraction: float, seed: int) -> Plan:
    """Pairs of the split (done videos with a query) divided into training and validation."""
    where = f"{split.cache.path}: split '{split.name}'"
    status = split.status
    done = status == DONE
    labels = split.labels.astype(np.int64)
    paths = split.paths
    notes = []
    if (~done).any():
        notes.append(f"{int((~done).sum())} of {len(done)} videos were not extracted (failed or pending): left out")
    cap_rows = cap_video = None
    if query == "text":
        if not split.has_text:
            raise CacheError(f"{where} holds no captions (extract with --annotations), so --query text "
                             "cannot train; use --query audio for an audio cache")
        tstat = np.asarray(split.array("text/status")[:])
        tvid = np.asarray(split.array("text/video_index")[:]).astype(np.int64)
        ok = (tstat == DONE) & (tvid >= 0) & (tvid < len(done))
        ok[ok] = done[tvid[ok]]
        if (~ok).any():
            notes.append(f"{int((~ok).sum())} of {len(ok)} captions left out "
                         "(not encoded, or their video was not extracted)")
        q = np.flatnonzero(ok)
        order = np.lexsort((q, tvid[q]))
        cap_rows, cap_video = q[order], tvid[q][order]
        paired = np.unique(cap_video)
        if len(np.unique(cap_video)) < len(cap_video):
            notes.append(f"{len(cap_video)} captions of {len(paired)} videos: "
                         "one caption per video is drawn each epoch")
    elif query == "audio":
        if not split.has_audio:
            raise CacheError(f"{where} holds no audio features (extract with --audio), so --query audio "
                             "cannot train; use --query text for a caption cache")
        has = np.asarray(split.array("videos/audio_mask")[:]).any(1)
        paired = np.flatnonzero(done & has)
        if (done & ~has).any():
            notes.append(f"{int((done & ~has).sum())} extracted videos have no valid audio segment: left out")
    else:
        raise TrainError(f"--query must be text or audio, got {query!r}")
    if (done.sum() - len(paired)) > 0 and query == "text":
        notes.append(f"{int(done.sum() - len(paired))} extracted videos have no caption: left out")

    n_val = 0 if val_fraction <= 0 else max(2, int(round(val_fraction * len(paired))))
    if len(paired) - n_val < 2:
        raise TrainError(f"{where} has {len(paired)} usable {query} pairs: too few to train"
                         + (f" and hold out {n_val} for validation (lower --val-fraction)" if n_val else ""))
    rng = np.random.default_rng([seed, 0x5A11D])  # the validation draw, apart from the batch order
    val_rows = _stratified_pick(paired, labels[paired], n_val, rng) if n_val else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(paired, val_rows)
    if "test" in split.name.lower():
        notes.append(f"warning: training on split '{split.name}': keep the test split for the final evaluation only")
    kinds = set(labels[train_rows].tolist())
    if len(kinds) < 2:
        notes.append("warning: the training videos are all " + ("anomalous" if 1 in kinds else "normal")
                     + "; the anomaly classifier can only learn a constant")
    return Plan(query, paths, labels, train_rows.astype(np.int64), val_rows.astype(np.int64),
                cap_rows, cap_video, notes)


def epoch_batches(plan: Plan, epoch: int, seed: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(video rows, query rows) per step of `epoch`: a seeded permutation of the training videos,
    one caption drawn per video (text), a trailing single pair merged into the previous batch."""
    rng = np.random.default_rng([seed, epoch])
    vids = plan.train_rows[rng.permutation(len(plan.train_rows))]
    if plan.cap_rows is not None:
        start, count = plan.captions_of(vids)
        queries = plan.cap_rows[start + np.floor(rng.random(len(vids)) * count).astype(np.int64)]
    else:
        queries = vids
    bounds = list(range(0, len(vids), batch_size)) + [len(vids)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    return [(vids[a:b], queries[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------- feature access

class Rows:
    """Some arrays of a split restricted to `rows`: in memory (tensors, on `device`, indexed per
    batch) or read from the cache per batch. Every read is checked (read_checked): a corrupt
    chunk or a NaN is a one-line DamagedCacheError naming the video (`describe(row)`), at load time in
    memory, at the batch's read when streamed."""

    def __init__(self, split: Split, keys: list[str], rows: np.ndarray, memory: bool, device: torch.device,
                 describe=None):
        self.memory, self.device = memory, device
        self.describe = describe or (lambda r: f"{split.cache.path}: row {r} of split '{split.name}'")
        self.lazy = {k.split("/")[-1]: split.array(k) for k in keys}
        self.keys = {k.split("/")[-1]: k for k in keys}
        self.lookup = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
        self.lookup[rows] = np.arange(len(rows))
        self.data = {}
        if memory:
            self.data = {k: torch.from_numpy(read_checked(a, rows, self.keys[k], self.describe)).to(device)
                         for k, a in self.lazy.items()}

    def get(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.memory:
            idx = torch.from_numpy(self.lookup[rows]).to(self.device)
            return {k: t.index_select(0, idx) for k, t in self.data.items()}
        return {k: torch.from_numpy(read_checked(a, rows, self.keys[k], self.describe)) for k, a in self.lazy.items()}


def describe_video(split: Split, paths: np.ndarray):
    """describe(row) for video rows: the video's path, its row and split, the cache."""
    return split.describe_video


def describe_caption(split: Split, plan: "Plan"):
    """describe(row) for caption rows: the caption's row and its video's path."""
    def describe(r):
        hit = np.flatnonzero(plan.cap_rows == r) if plan.cap_rows is not None else []
        video = f", video {plan.paths[plan.cap_video[hit[0]]]}" if len(hit) else ""
        return f"{split.cache.path}: caption {r} of split '{split.name}'{video}"
    return describe


def video_keys(cfg: ModelConfig) -> list[str]:
    keys = ["videos/frame_feat", "videos/frame_mask"]
    if "finer" in cfg.levels:
        keys.append("videos/patch_feat")
    if cfg.query == "audio":
        keys += ["videos/audio_feat", "videos/audio_mask"]
    return keys


TEXT_KEYS = ["text/word_feat", "text/word_mask", "text/sentence"]


def bytes_needed(split: Split, plan: Plan, cfg: ModelConfig) -> int:
    def row_bytes(key):
        a = split.array(key)
        return int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize

    total = len(plan.train_rows) * sum(row_bytes(k) for k in video_keys(cfg))
    if plan.cap_rows is not None:
        total += len(plan.train_queries) * sum(row_bytes(k) for k in TEXT_KEYS)
    return total


def load_validation(split: Split, plan: Plan, cfg: ModelConfig) -> EvalData | None:
    """The validation subset as evaluate's EvalData (in memory), checked like the training data
    (a corrupt chunk or a NaN is a one-line DamagedCacheError naming the video)."""
    if len(plan.val_rows) == 0:
        return None
    vdesc = describe_video(split, plan.paths)
    try:
        videos = split.load_videos(index=plan.val_rows, patches="finer" in cfg.levels, audio=cfg.query == "audio")
    except Exception:  # noqa: BLE001 - name the damaged video if there is one, else the original error
        for key in video_keys(cfg) + ["videos/frame_time"] + (["videos/audio_time"] if cfg.query == "audio" else []):
            read_checked(split.array(key), plan.val_rows, key, vdesc)
        raise
    for key, a in (("videos/frame_feat", videos.frame_feat), ("videos/patch_feat", videos.patch_feat),
                   ("videos/audio_feat", videos.audio_feat)):
        if a is not None:
            check_finite(a, plan.val_rows, key, vdesc)
    qrows, qvid = plan.val_queries()
    qv = np.searchsorted(plan.val_rows, qvid).astype(np.int64)
    if cfg.query == "text":
        cdesc = describe_caption(split, plan)
        feats = {k.split("/")[-1]: read_checked(split.array(k), qrows, k, cdesc) for k in TEXT_KEYS}
        texts = [str(t) for t in split.cache.store.read_str(f"{split.name}/text/text", qrows)]
    else:
        feats = {"seg_feat": videos.audio_feat, "seg_mask": videos.audio_mask}
        texts = [str(p) for p in videos.paths]
    return EvalData(videos, cfg.query, feats, qv, texts)


def _amp(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def validate(model: VarCMP, ev: EvalData, device: torch.device, amp_dtype=None) -> dict:
    """Retrieval metrics of the validation subset (both directions), with evaluate's scorer."""
    was = model.training
    model.eval()
    try:
        with _amp(device, amp_dtype):
            v = encode_videos(model, ev.videos, device, batch=32)  # bounds the float32 patch copies
            q = encode_queries(model, ev.query_feats, device)
            sims = score_matrix(model, v, q)
    finally:
        model.train(was)
    return retrieval_metrics(sims["total"], ev.query_video)


def val_score(metrics: dict | None) -> float:
    """Model selection: the mean of the two R@1."""
    if not metrics:
        return float("nan")
    return 0.5 * (metrics["q2v"]["r1"] + metrics["v2q"]["r1"])


# ----------------------------------------------------------------------------- state

def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                    int(np_state[3]), float(np_state[4])],
          "python": [py[0], list(py[1]), py[2]]}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        st["mps"] = torch.mps.get_rng_state()
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    if device.type == "cuda" and st.get("cuda"):
        torch.cuda.set_rng_state_all(st["cuda"])
    if device.type == "mps" and st.get("mps") is not None:
        torch.mps.set_rng_state(st["mps"])


def load_state(path: Path) -> dict:
    """The resume state, read without executing code (weights_only); one-line errors."""
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" of a foreign file: it is refused anyway
            warnings.simplefilter("ignore", UserWarning)
            st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not our plain-data state
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise TrainError(f"{path}: not a varcmp training state, refusing to load it "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        what = st.get("format") if isinstance(st, dict) else type(st).__name__
        raise TrainError(f"{path}: not a varcmp training state ({what!r})")
    return st


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


# ----------------------------------------------------------------------------- the training step (DDP-aware)

class TrainStep(torch.nn.Module):
    """The forward of one training step: encode this process's rows, gather the global batch's
    embeddings (several processes), the loss of eq. 12 (VarCMP.loss's parts) plus "backward", what to
    backpropagate. DistributedDataParallel wraps this module, so that it sees the whole forward.

    Gradient scale: every process computes the same global loss L, but its backward reaches the
    parameters only through its own rows, giving g_r with sum_r g_r = dL/dtheta, the one-process
    gradient. DDP averages, (1/N) sum_r: so "backward" is N * L, and the averaged gradient is exactly
    one process's on the global batch. With one process "backward" is the loss itself."""

    def __init__(self, model: VarCMP, dist: DistInfo | None = None):
        super().__init__()
        self.model = model
        self.rank = 0 if dist is None else dist.rank
        self.world = 1 if dist is None else dist.world_size

    def forward(self, vb: dict, qb: dict | None, labels: torch.Tensor, sizes: list[int] | None,
                batch_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        v = m.encode_videos(vb["frame_feat"], vb["frame_mask"], vb.get("patch_feat"), labels=labels)
        q = m.encode_queries(qb if qb is not None else {"seg_feat": vb["audio_feat"], "seg_mask": vb["audio_mask"]})
        if sizes is not None:
            v, q = gather_rows(v, sizes, self.rank), gather_rows(q, sizes, self.rank)
        parts = m.loss(v, q, batch_labels)
        parts["backward"] = parts["loss"] if sizes is None else parts["loss"] * self.world
        return parts


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


def _progress(console, disable: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} steps/s"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=disable, transient=False)


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


def _save_state(state: dict, path) -> None:
    """torch.save through a Python file object: a failing write (disk full) then surfaces as the OSError
    it is, where torch's own file writer reports only "unexpected pos"."""
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


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


def _holds_epoch(path: Path, epoch, plan_digest: str) -> bool:
    """Whether checkpoint `path` and its .json copy both hold `epoch` of this run's data plan."""
    try:
        meta = read_meta(path)
        copy = json.loads(path.with_suffix(".json").read_text())
    except Exception:  # noqa: BLE001 - missing or foreign: not the epoch asked for
        return False
    return (meta.get("epoch") == epoch and copy.get("epoch") == epoch
            and (meta.get("data") or {}).get("plan") == plan_digest)


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
        _set_rng_state(state["rng"], device)
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
                if _holds_epoch(path, epoch_of, plan.digest()):
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

    with _progress(console, quiet) as progress:
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
                with _amp(device, amp_dtype):
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
                  "rng": _rng_state(device), "history": history, "best": best, "train": opts.jsonable(),
                  "cache": fingerprint, "plan": plan.digest()}
            write(out / STATE_NAME, lambda: atomic_write(out / STATE_NAME, lambda tmp: _save_state(st, tmp)),
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


D = TrainOptions()


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Run directory: checkpoints, resume state and history.json.")
@click.option("--split", default=D.split,
              help="Split of the cache to train on (a validation subset is held out of it).")
@click.option("--query", type=click.Choice(QUERIES), default=D.query,
              help="text: captions (UCFCrime-AR); audio: the videos' own CLAP segments (XDViolence-AR).")
@click.option("--val-fraction", default=D.val_fraction, type=float,
              help="Share of the training videos held out for model selection (0: none, best = last).")
@click.option("--levels", default=",".join(D.levels), help="Active similarity levels, comma-separated (ablations).")
@click.option("--anomaly-weighting/--no-anomaly-weighting", default=D.anomaly_weighting,
              help="Anomaly-biased frame/patch weights (eq. 5-7).")
@click.option("--epochs", default=D.epochs, type=int, help="Total epochs (with --resume: train up to this many).")
@click.option("--batch-size", default=D.batch_size, type=int,
              help="Pairs per step: B of the InfoNCE, the GLOBAL batch. Under torchrun with N processes each "
                   "encodes B/N pairs (B must be divisible by N) and the InfoNCE is over all B, as in one process.")
@click.option("--lr", default=D.lr, type=float, help="AdamW learning rate (constant).")
@click.option("--weight-decay", default=D.weight_decay, type=float, help="AdamW weight decay.")
@click.option("--tau", default=D.tau, type=float,
              help="Temperature of the anomaly-biased softmax (eq. 7; the paper gives no value).")
@click.option("--top-patches", default=D.top_patches, type=int, help="Patches kept per frame (M).")
@click.option("--logit-scale", default=D.logit_scale, type=float, help="Scale of R in the InfoNCE (CLIP's 100).")
@click.option("--dropout", default=D.dropout, type=float, help="Dropout of the Transformer layers.")
@click.option("--heads", default=D.heads, type=int, help="Attention heads of the Transformer layers.")
@click.option("--ffn-dim", default=D.ffn_dim, type=int,
              help="FFN width of the Transformer layers and the anomaly head.")
@click.option("--shift-fraction", default=D.shift_fraction, type=float, help="Channels token-shifted over frames.")
@click.option("--topk-sigma", default=D.topk_sigma, type=float, help="Noise of the perturbed top-k (training).")
@click.option("--topk-samples", default=D.topk_samples, type=int, help="Samples of the perturbed top-k (training).")
@click.option("--seed", default=D.seed, type=int, help="Seeds the weights, the batch order and the validation draw.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 elsewhere.")
@click.option("--data", type=click.Choice(["auto", "memory", "stream"]), default="auto",
              help="auto: features in memory when they take under half of the free RAM, else read per batch.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def main(cache, out, split, query, val_fraction, levels, anomaly_weighting, epochs, batch_size, lr, weight_decay,
         tau, top_patches, logit_scale, dropout, heads, ffn_dim, shift_fraction, topk_sigma, topk_samples, seed,
         device, precision, data, resume, overwrite, quiet):
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
        opts = TrainOptions(split=split, query=query, val_fraction=val_fraction, levels=levels,
                            anomaly_weighting=anomaly_weighting, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, tau=tau, top_patches=top_patches, logit_scale=logit_scale,
                            dropout=dropout, heads=heads, ffn_dim=ffn_dim, shift_fraction=shift_fraction,
                            topk_sigma=topk_sigma, topk_samples=topk_samples, seed=seed)
        with distributed(device) as dist:
            summary = train(cache, out, opts, Runtime(device=device, precision=precision, data=data),
                            resume=resume, overwrite=overwrite, console=err, quiet=quiet, dist=dist)
    except (NonFiniteLoss, OutputError) as e:
        err.print(f"[red]error[/red]{tag}: {lit(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (TrainError, DistSetupError, CacheError, CheckpointError) as e:
        err.print(f"[red]error[/red]{tag}: {lit(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
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
