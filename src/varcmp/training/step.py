"""One training step (DDP-aware), mixed precision, and validation with the scoring engine."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..model import VarCMP
from ..retrieval.metrics import retrieval_metrics, roc_auc
from ..retrieval.pairs import EvalData
from ..retrieval.scoring import encode_queries, encode_videos, score_matrix
from . import TrainError
from .distributed import DistInfo, gather_rows


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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of `dtype` on `device` (None: fp32, no autocast)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def validation_scores(model: VarCMP, ev: EvalData, device: torch.device, amp_dtype=None):
    """(the [videos, queries] similarity of the validation subset, with evaluate's scorer; each of its
    videos' anomaly score, the MIL video score as a numpy array)."""
    was = model.training
    model.eval()
    try:
        with autocast(device, amp_dtype):
            v = encode_videos(model, ev.videos, device, batch=32)  # bounds the float32 patch copies
            q = encode_queries(model, ev.query_feats, device)
            return score_matrix(model, v, q)["total"], v.video_score.float().cpu().numpy()
    finally:
        model.train(was)


def validate(model: VarCMP, ev: EvalData, device: torch.device, amp_dtype=None):
    """(the similarity of the validation subset, its retrieval metrics both directions, the anomaly
    head's video-level AUC on its videos: None when they hold one class)."""
    sim, anomaly = validation_scores(model, ev, device, amp_dtype)
    return sim, retrieval_metrics(sim, ev.query_video), roc_auc(anomaly, ev.videos.labels)


def val_score(metrics: dict | None) -> float:
    """Model selection: the mean of the two R@1."""
    if not metrics:
        return float("nan")
    return 0.5 * (metrics["q2v"]["r1"] + metrics["v2q"]["r1"])


# ----------------------------------------------------------------------------- the training step (DDP-aware)

def drop(mask: torch.Tensor, share: float) -> torch.Tensor:
    """`mask` [B, L] with each valid position hidden with probability `share` (augmentation); a row
    left with none keeps its own mask."""
    if share <= 0:
        return mask
    kept = mask.bool() & (torch.rand(mask.shape, device=mask.device) >= share)
    return torch.where(kept.any(-1, keepdim=True), kept, mask.bool())


class TrainStep(torch.nn.Module):
    """The forward of one training step: encode this process's rows, gather the global batch's
    embeddings (several processes), the loss of eq. 12 (VarCMP.loss's parts) plus "backward", what to
    backpropagate. DistributedDataParallel wraps this module, so that it sees the whole forward.

    Gradient scale: every process computes the same global loss L, but its backward reaches the
    parameters only through its own rows, giving g_r with sum_r g_r = dL/dtheta, the one-process
    gradient. DDP averages, (1/N) sum_r: so "backward" is N * L, and the averaged gradient is exactly
    one process's on the global batch. With one process "backward" is the loss itself."""

    def __init__(self, model: VarCMP, dist: DistInfo | None = None, pos_weight: float | None = None,
                 frame_drop: float = 0.0, word_drop: float = 0.0):
        super().__init__()
        self.model = model
        self.pos_weight = pos_weight  # the anomalous videos' weight in the MIL loss (None: 1)
        self.frame_drop, self.word_drop = frame_drop, word_drop
        self.rank = 0 if dist is None else dist.rank
        self.world = 1 if dist is None else dist.world_size

    def forward(self, vb: dict, qb: dict | None, labels: torch.Tensor, sizes: list[int] | None,
                batch_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        v = m.encode_videos(vb["frame_feat"], drop(vb["frame_mask"], self.frame_drop), vb.get("patch_feat"),
                            labels=labels)
        qf = dict(qb) if qb is not None else {"seg_feat": vb["audio_feat"], "seg_mask": vb["audio_mask"]}
        qf[m.kind.mask] = drop(qf[m.kind.mask], self.word_drop)
        q = m.encode_queries(qf)
        if sizes is not None:
            v, q = gather_rows(v, sizes, self.rank), gather_rows(q, sizes, self.rank)
        parts = m.loss(v, q, batch_labels, self.pos_weight)
        parts["backward"] = parts["loss"] if sizes is None else parts["loss"] * self.world
        return parts
