"""The MIL anomaly score and loss (eq. 12) and the symmetric InfoNCE (eq. 10-11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MIL_K
from .similarity import at_least_f32


def video_scores(A: Tensor, frame_mask: Tensor, k_rule: str = "max") -> Tensor:
    """Video-level anomaly score (MIL): the mean of the top-k frame scores A over the video's valid
    frames. k_rule "max": k = 1, the highest frame; "vadclip": VadCLIP's k = valid // 16 + 1 for each
    video (a short video is not scored as if it had the padded length). A video with no valid frame
    scores 0. A: [V, N] -> [V]."""
    if k_rule not in MIL_K:
        raise ValueError(f"k_rule must be one of {', '.join(MIL_K)}, got {k_rule!r}")
    valid = frame_mask.sum(-1)                                         # [V]
    k = torch.where(valid > 0, valid // 16 + 1 if k_rule == "vadclip" else 1, 0)  # <= valid
    A = at_least_f32(A).masked_fill(~frame_mask, float("-inf"))
    top = A.topk(int(k.max().clamp_min(1)), dim=-1).values            # [V, max k]
    keep = torch.arange(top.shape[-1], device=A.device) < k[:, None]
    return torch.where(keep, top, 0.0).sum(-1) / k.clamp_min(1).to(top.dtype)


def mil_bce(A: Tensor, frame_mask: Tensor, labels: Tensor, pos_weight: float | None = None,
            k_rule: str = "max") -> Tensor:
    """L_bce of eq. 12: binary cross-entropy of video_scores (its `k_rule`) against the video labels (0/1).
    `pos_weight` (None: 1, the paper's loss) multiplies the anomalous videos' terms, as
    BCEWithLogitsLoss's pos_weight does: n_normal / n_anomalous of the training split makes both
    classes weigh the same, so that a split that is mostly anomalous does not teach the head to
    call everything anomalous. The mean is over the batch's videos. Written out so it is
    autocast-safe; the scores are clamped to [eps, 1 - eps] (float32 eps) before the log, so that a
    saturated sigmoid (a score of exactly 0 or 1, confidently wrong) gives a finite loss and a zero
    gradient instead of NaN (0 x inf in the log's backward)."""
    s = video_scores(A, frame_mask, k_rule)
    eps = torch.finfo(s.dtype).eps
    s = s.clamp(eps, 1 - eps)
    y = labels.to(device=s.device, dtype=s.dtype)
    pos = y * torch.log(s)
    if pos_weight is not None:
        pos = pos * pos_weight
    return -(pos + (1 - y) * torch.log1p(-s)).mean()


def balance_weight(labels) -> float:
    """The positive-class weight that balances a split's labels (0/1): n_normal / n_anomalous
    (1 when either class is absent: nothing to balance)."""
    labels = torch.as_tensor(labels)
    pos = int((labels > 0).sum())
    neg = int(labels.numel() - pos)
    return neg / pos if pos and neg else 1.0


def nce_parts(R: Tensor, logit_scale: float) -> tuple[Tensor, Tensor]:
    logits = logit_scale * at_least_f32(R)
    target = torch.arange(len(R), device=R.device)
    return F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)  # eq. 10, eq. 11


def info_nce(R: Tensor, logit_scale: float) -> Tensor:
    """Symmetric InfoNCE over the [B, B] matrix R(v_i, q_j) of matching pairs on the
    diagonal: L_v2q (eq. 10, rows) + L_q2v (eq. 11, columns), summed as in eq. 12."""
    v2q, q2v = nce_parts(R, logit_scale)
    return v2q + q2v
