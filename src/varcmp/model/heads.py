"""The learnable heads: weights, temporal encoder, anomaly classifier, patch selection, audio encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .similarity import at_least_f32, centred, masked_mean, masked_median, masked_softmax


def token_shift(x: Tensor, fold: int) -> Tensor:
    """TokShift over frames: channels [0, fold) come from frame t-1, [fold, 2 fold) from
    frame t+1, zeros beyond the ends; the other channels stay. x: [V, N, C]."""
    prev = F.pad(x[:, :-1, :fold], (0, 0, 1, 0))
    nxt = F.pad(x[:, 1:, fold:2 * fold], (0, 0, 0, 1))
    return torch.cat([prev, nxt, x[..., 2 * fold:]], dim=-1)


def _key_padding(mask: Tensor) -> Tensor:
    """Key padding mask (True = ignore) for nn.TransformerEncoderLayer; a sequence with no
    valid position attends to everything (outputs are masked later) instead of NaN."""
    return ~(mask | ~mask.any(-1, keepdim=True))


def _zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _transformer_layer(cfg: ModelConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="gelu",
                                      batch_first=True, norm_first=True)


# ----------------------------------------------------------------------------- heads

class WeightHead(nn.Module):
    """f_*w (DRL style): Linear(C,C) -> ReLU -> Linear(C,1) on the un-normalised token, then a
    softmax over the valid tokens. The last layer starts at zero: uniform weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = _zero_init(nn.Linear(dim, 1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return masked_softmax(self.fc2(F.relu(self.fc1(x))).squeeze(-1), mask)


class TemporalEncoder(nn.Module):
    """Video embedding e_v: token shift over frames, learned frame positions, one Transformer
    layer, masked mean, residual to the mean frame feature. The output projection starts at
    zero, so an untrained encoder returns the mean CLIP frame feature (zero-shot CLIP). With
    cfg.temporal_input "centred" the layer sees each frame minus the video's mean frame."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.centred = cfg.temporal_input == "centred"
        self.fold = int(cfg.dim * cfg.shift_fraction / 2)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.num_frames, cfg.dim))
        self.layer = _transformer_layer(cfg)
        self.proj = _zero_init(nn.Linear(cfg.dim, cfg.dim))

    def forward(self, f: Tensor, mask: Tensor) -> Tensor:
        x = token_shift(centred(f, mask) if self.centred else f, self.fold) + self.pos[: f.shape[1]]
        x = self.layer(x, src_key_padding_mask=_key_padding(mask))
        return masked_mean(f, mask) + masked_mean(self.proj(x), mask)


class AnomalyHead(nn.Module):
    """Eq. 5 (VadCLIP): A = sigmoid(FC(FFN(x) + x)), FC starting at zero (A = 0.5), on x as
    cfg.anomaly_input says: frames, x = f_j (the paper's); centred, x = f_j minus the mean of its
    video's valid frames; split, the sum of two such logits, one on f_j minus the video's median
    frame and one, with its own FFN and FC, on that median frame (what most of its frames share).
    The median, not the mean: an event in a few frames moves the mean, so that every other frame
    of an anomalous video would carry minus a share of the event, a sign the head can learn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input = cfg.anomaly_input
        self.ffn, self.fc = _ffn(cfg), _zero_init(nn.Linear(cfg.dim, 1))
        if self.input == "split":
            self.video_ffn, self.video_fc = _ffn(cfg), _zero_init(nn.Linear(cfg.dim, 1))

    def forward(self, f: Tensor, mask: Tensor) -> Tensor:
        """f [V, N, C] frames, mask [V, N] valid ones -> A [V, N] (padded frames: whatever, masked later)."""
        if self.input == "frames":
            logit = _residual_logit(f, self.ffn, self.fc)
        elif self.input == "centred":
            logit = _residual_logit(centred(f, mask), self.ffn, self.fc)
        else:
            typical = masked_median(f, mask)                                                  # [V, C]
            logit = (_residual_logit(centred(f, mask, typical), self.ffn, self.fc)            # [V, N]
                     + _residual_logit(typical[:, None], self.video_ffn, self.video_fc))      # + [V, 1]
        return torch.sigmoid(at_least_f32(logit))


def _ffn(cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.dim))


def _residual_logit(x: Tensor, ffn: nn.Module, fc: nn.Linear) -> Tensor:
    """FC(FFN(x) + x), the logit of eq. 5: [..., C] -> [...]."""
    return fc(ffn(x) + x).squeeze(-1)


class PerturbedTopK(torch.autograd.Function):
    """Differentiable top-k by perturbed maximum (Berthet et al. 2020; TS2-Net's selector).
    forward: E_Z[ indicators of top-k(x + sigma Z) ], Monte-Carlo over `samples` draws of
    Z ~ N(0, I), each draw's k indices sorted ascending so row m of the [B, k, P] output is
    the m-th selected patch in patch order. backward: the estimator of the same paper,
    d E[F(x + sigma Z)] / dx = E[F(x + sigma Z) Z^T] / sigma, contracted with the incoming
    gradient g as E[<g, F(x + sigma Z)> Z] / sigma (the full Jacobian, not its diagonal)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, samples: int, sigma: float) -> Tensor:
        noise = torch.randn(x.shape[0], samples, x.shape[1], device=x.device, dtype=x.dtype)
        idx = (x[:, None, :] + sigma * noise).topk(k, dim=-1).indices.sort(dim=-1).values  # [B, S, k]
        # mean over draws of the one-hot indicators, counted without building [B, S, k, P]
        out = x.new_zeros(x.shape[0], k, x.shape[1])
        out.scatter_add_(2, idx.transpose(1, 2), x.new_full(idx.transpose(1, 2).shape, 1.0 / samples))
        ctx.save_for_backward(idx, noise)
        ctx.sigma = sigma
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        idx, noise = ctx.saved_tensors
        h = g.to(noise.dtype)[:, None].expand(-1, idx.shape[1], -1, -1).gather(3, idx[..., None]).sum((2, 3))  # [B, S]
        grad = torch.einsum("bs,bsp->bp", h, noise) / (noise.shape[1] * ctx.sigma)
        return grad, None, None, None


class PatchSelector(nn.Module):
    """Keep the M most salient patches of each frame. Score of patch p of a frame with [CLS]
    f: cos(p, f) + MLP([p, f]), a small MLP in the spirit of TS2-Net's predictor:
    Linear(2C, H) -> GELU -> Linear(H, 1), H = selector_dim. Its first layer is applied as
    W_p p + W_f f, so the frame half is computed once per frame rather than once per patch
    (the same function, a fraction of the cost). The last layer starts at zero, so an
    untrained selector keeps the patches closest to their frame's [CLS]. The cos term is weighted
    by selector_cos: at 0 the score is the MLP alone (TS2-Net's); untrained, every score is then 0,
    so training starts from a uniformly random perturbed selection (and inference keeps patches
    0..M-1); a weight far below topk_sigma starts training the same way while an untrained
    selector still keeps the patches closest to their frame.
    Training: perturbed top-k (soft, differentiable); eval: hard top-k, ties to the lower index."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.sigma, self.samples = cfg.top_patches, cfg.topk_sigma, cfg.topk_samples
        self.relative, self.cos_weight = cfg.topk_relative, cfg.selector_cos
        self.patch_in = nn.Linear(cfg.dim, cfg.selector_dim)
        self.frame_in = nn.Linear(cfg.dim, cfg.selector_dim, bias=False)
        self.out = _zero_init(nn.Linear(cfg.selector_dim, 1))

    def scores(self, patches: Tensor, cls: Tensor) -> Tensor:
        """patches [V, N, P, C], frame [CLS] features cls [V, N, C] -> [V, N, P] (float32)."""
        hidden = F.gelu(self.patch_in(patches) + self.frame_in(cls)[:, :, None, :])
        mlp = at_least_f32(self.out(hidden).squeeze(-1))
        if self.cos_weight == 0:
            return mlp
        # cos(p, f) as a dot product over the two norms: no normalised copy of every patch
        norms = patches.norm(dim=-1).clamp_min(1e-12) * cls.norm(dim=-1).clamp_min(1e-12)[..., None]
        return self.cos_weight * at_least_f32(torch.einsum("vnpc,vnc->vnp", patches, cls) / norms) + mlp

    def forward(self, patches: Tensor, cls: Tensor) -> Tensor:
        """-> selected patches [V, N*M, C], frame-major (frame 0's M patches, then frame 1's...)."""
        V, N, P, C = patches.shape
        s = self.scores(patches, cls)
        if self.training:
            if self.relative:  # the noise in units of each frame's spread of scores
                s = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)
            ind = PerturbedTopK.apply(s.reshape(V * N, P), self.k, self.samples, self.sigma)  # [VN, M, P]
            sel = ind.to(patches.dtype) @ patches.reshape(V * N, P, C)
        else:
            idx = self._top(s)
            sel = patches.gather(2, idx[..., None].expand(V, N, self.k, C))
        return sel.reshape(V, N * self.k, C)

    def keep(self, patches: Tensor, cls: Tensor) -> Tensor:
        """The indices [V, N, M] of the patches the inference path keeps, ascending per frame."""
        return self._top(self.scores(patches, cls))

    def _top(self, s: Tensor) -> Tensor:
        # a stable descending sort keeps equal scores in index order: ties -> lower index
        return s.sort(dim=-1, descending=True, stable=True).indices[..., : self.k].sort(dim=-1).values


class AudioEncoder(nn.Module):
    """Audio side: Linear(audio_dim, C), learned segment positions, a learned [CLS] prepended,
    one Transformer layer. Returns m_a (the [CLS] output) [Q, C] and e_a [Q, Na, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.audio_dim, cfg.dim)
        self.cls = nn.Parameter(0.02 * torch.randn(cfg.dim))
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.audio_segments, cfg.dim))
        self.layer = _transformer_layer(cfg)

    def forward(self, seg: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inp(seg) + self.pos[: seg.shape[1]]
        x = torch.cat([self.cls.expand(len(x), 1, -1).to(x.dtype), x], dim=1)
        keep = torch.cat([mask.new_ones(len(mask), 1), mask], dim=1)
        y = self.layer(x, src_key_padding_mask=~keep)
        return y[:, 0], y[:, 1:]
