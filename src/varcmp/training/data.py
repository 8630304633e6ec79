"""What one training run reads: the seeded validation subset, the epoch's batches, the feature rows (in memory or streamed), the validation data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache.reader import Split
from ..cache_schema import DONE, CacheError
from ..model import ModelConfig
from ..retrieval.pairs import EvalData
from . import TrainError


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
    probe_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # training videos scored like
    # the validation subset (as many, seeded): training-split R@1, the memorisation gap

    def captions_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) into cap_rows of each video row in `rows`."""
        lo = np.searchsorted(self.cap_video, rows, "left")
        return lo, np.searchsorted(self.cap_video, rows, "right") - lo

    @property
    def train_queries(self) -> np.ndarray | None:
        if self.cap_rows is None:
            return None
        return np.sort(self.cap_rows[np.isin(self.cap_video, self.train_rows)])

    def val_queries(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, their video rows) used as validation queries of video `rows` (default: the
        validation videos): every caption of each video; audio: the video itself."""
        rows = self.val_rows if rows is None else rows
        if self.cap_rows is None:
            return rows, rows
        keep = np.isin(self.cap_video, rows)
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


def validation_size(n: int, val_fraction: float, val_min: int = 0) -> int:
    """How many of n paired videos validate: 0 when val_fraction is 0, else round(val_fraction * n) but at
    least 2, and at least val_min while that is at most a quarter of the n (a subset of 32 videos chose
    epochs by noise; README, 'Does training beat frozen CLIP?')."""
    if val_fraction <= 0:
        return 0
    return max(2, int(round(val_fraction * n)), min(int(val_min), n // 4))


def plan_data(split: Split, query: str, val_fraction: float, seed: int, val_min: int = 0) -> Plan:
    """Pairs of the split (done videos with a query) divided into training and validation
    (`validation_size` of them validate)."""
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

    n_val = validation_size(len(paired), val_fraction, val_min)
    if len(paired) - n_val < 2:
        raise TrainError(f"{where} has {len(paired)} usable {query} pairs: too few to train"
                         + (f" and hold out {n_val} for validation (lower --val-fraction)" if n_val else ""))
    rng = np.random.default_rng([seed, 0x5A11D])  # the validation draw, apart from the batch order
    val_rows = _stratified_pick(paired, labels[paired], n_val, rng) if n_val else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(paired, val_rows)
    probe_rng = np.random.default_rng([seed, 0x7EA1])  # the training subset that is scored, apart from both
    probe_rows = _stratified_pick(train_rows, labels[train_rows], min(n_val, len(train_rows)), probe_rng)
    if "test" in split.name.lower():
        notes.append(f"warning: training on split '{split.name}': keep the test split for the final evaluation only")
    kinds = set(labels[train_rows].tolist())
    if len(kinds) < 2:
        notes.append("warning: the training videos are all " + ("anomalous" if 1 in kinds else "normal")
                     + "; the anomaly classifier can only learn a constant")
    return Plan(query, paths, labels, train_rows.astype(np.int64), val_rows.astype(np.int64),
                cap_rows, cap_video, notes, probe_rows.astype(np.int64))


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
    batch) or read from the cache per batch, both through `Split.read` (checked: a corrupt chunk
    or a NaN is a one-line DamagedCacheError naming the row by `describe(row)`, at load time in
    memory, at the batch's read when streamed)."""

    def __init__(self, split: Split, keys: list[str], rows: np.ndarray, memory: bool, device: torch.device,
                 describe=None):
        self.split, self.keys, self.memory, self.device, self.describe = split, list(keys), memory, device, describe
        self.lookup = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
        self.lookup[rows] = np.arange(len(rows))
        self.data = {k: torch.from_numpy(a).to(device) for k, a in self._read(rows).items()} if memory else {}

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.split.read(self.keys, rows, self.describe)

    def get(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.memory:
            idx = torch.from_numpy(self.lookup[rows]).to(self.device)
            return {k: t.index_select(0, idx) for k, t in self.data.items()}
        return {k: torch.from_numpy(a) for k, a in self._read(rows).items()}


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


def load_validation(split: Split, plan: Plan, cfg: ModelConfig, rows: np.ndarray | None = None) -> EvalData | None:
    """The validation subset (or the videos `rows`, e.g. plan.probe_rows, scored the same way) as
    evaluate's EvalData (in memory), read checked like the training data (a corrupt chunk or a NaN
    is a one-line DamagedCacheError naming the video or caption)."""
    rows = plan.val_rows if rows is None else rows
    if len(rows) == 0:
        return None
    videos = split.load_videos(index=rows, patches="finer" in cfg.levels, audio=cfg.query == "audio")
    qrows, qvid = plan.val_queries(rows)
    qv = np.searchsorted(rows, qvid).astype(np.int64)
    if cfg.query == "text":
        cdesc = describe_caption(split, plan)
        feats = split.read(TEXT_KEYS, qrows, cdesc)
        texts = [str(t) for t in split.cache.store.read_str(f"{split.name}/text/text", qrows)]
    else:
        feats = {"seg_feat": videos.audio_feat, "seg_mask": videos.audio_mask}
        texts = [str(p) for p in videos.paths]
    return EvalData(videos, cfg.query, feats, qv, texts)
