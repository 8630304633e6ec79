"""The MIL anomaly score and loss (eq. 12) and the symmetric InfoNCE (eq. 10-11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .similarity import at_least_f32


def video_scores(A: Tensor, frame_mask: Tensor) -> Tensor:
    """Video-level anomaly score (MIL, VadCLIP's rule): the mean of the top-k frame scores A over
    the video's valid frames, k = valid // 16 + 1 for each video (a short video is not scored as
    if it had the padded length). A video with no valid frame scores 0. A: [V, N] -> [V]."""
    valid = frame_mask.sum(-1)                                         # [V]
    k = torch.where(valid > 0, valid // 16 + 1, 0)                     # <= valid
    A = at_least_f32(A).masked_fill(~frame_mask, float("-inf"))
    top = A.topk(int(k.max().clamp_min(1)), dim=-1).values            # [V, max k]
    keep = torch.arange(top.shape[-1], device=A.device) < k[:, None]
    return torch.where(keep, top, 0.0).sum(-1) / k.clamp_min(1).to(top.dtype)


def mil_bce(A: Tensor, frame_mask: Tensor, labels: Tensor) -> Tensor:
    """L_bce of eq. 12: binary cross-entropy of video_scores against the video labels (0/1).
    Written out (log clamped at -100 like F.binary_cross_entropy) so it is autocast-safe."""
    s = video_scores(A, frame_mask)
    y = labels.to(device=s.device, dtype=s.dtype)
    return -(y * torch.log(s).clamp_min(-100) + (1 - y) * torch.log1p(-s).clamp_min(-100)).mean()


def nce_parts(R: Tensor, logit_scale: float) -> tuple[Tensor, Tensor]:
    logits = logit_scale * at_least_f32(R)
    target = torch.arange(len(R), device=R.device)
    return F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)  # eq. 10, eq. 11


def info_nce(R: Tensor, logit_scale: float) -> Tensor:
    """Symmetric InfoNCE over the [B, B] matrix R(v_i, q_j) of matching pairs on the
    diagonal: L_v2q (eq. 10, rows) + L_q2v (eq. 11, columns), summed as in eq. 12."""
    v2q, q2v = nce_parts(R, logit_scale)
    return v2q + q2v
