"""VarCMP's learnable heads and its hierarchical similarity (paper eq. 1-12).

Everything here runs on cached features of the frozen encoders (CLIP frames,
patches and words; CLAP audio segments). The work is split so that training,
evaluation and search each compute every part only once:

    per video   VarCMP.encode_videos                -> VideoEmb
    per query   VarCMP.encode_text / encode_audio   -> QueryEmb
    per pair    VarCMP.similarity(VideoEmb, QueryEmb) -> {level: [V, Q]}, batched
    training    info_nce, mil_bce, VarCMP.loss      (eq. 10-12)

Notation: ~x = x / ||x||_2, cos(a, b) = ~a . ~b. Masks are bool, True = valid.
Padded positions never change a score: their inputs are zeroed on entry, they
weigh 0 in every sum and are -inf in every max.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LEVELS = ("coarse", "fine", "finer")
QUERIES = ("text", "audio")


def within(default, lo, hi, ends: str = "[]"):
    """A ModelConfig field whose value must lie between lo and hi; `ends` says whether each end
    is allowed ("[", "]") or not ("(", ")")."""
    return field(default=default, metadata={"range": (lo, hi, ends)})


@dataclass(frozen=True)
class ModelConfig:
    """Every setting of the heads. Types and ranges are checked on construction, so a crafted
    checkpoint or option fails with one line naming the setting before anything is built."""

    query: str = "text"          # "text" (UCFCrime-AR) or "audio" (XDViolence-AR)
    dim: int = within(512, 1, 16384)               # C, the CLIP joint space
    audio_dim: int = within(512, 1, 16384)         # CLAP embedding size
    num_frames: int = within(32, 1, 4096)          # N_v (also fixes k = N_v // 16 + 1 of the MIL score)
    num_patches: int = within(49, 1, 4096)
    max_words: int = within(32, 1, 4096)
    audio_segments: int = within(32, 1, 4096)      # N_a
    top_patches: int = within(4, 1, 4096)          # M
    selector_dim: int = within(128, 1, 16384)      # hidden width of the patch scorer MLP
    heads: int = within(8, 1, 1024)
    ffn_dim: int = within(1024, 1, 65536)
    dropout: float = within(0.1, 0.0, 1.0, "[)")
    shift_fraction: float = within(0.25, 0.0, 1.0)  # channels token-shifted: half from frame t-1, half from t+1
    levels: tuple = LEVELS
    anomaly_weighting: bool = True
    tau: float = within(0.1, 0.0, 1e4, "(]")       # temperature of eq. 7
    topk_sigma: float = within(0.05, 0.0, 1e4, "(]")  # perturbed top-k noise (training only)
    topk_samples: int = within(100, 1, 100000)
    logit_scale: float = within(100.0, 0.0, 1e4, "(]")

    def __post_init__(self):
        levels = self.levels.split(",") if isinstance(self.levels, str) else self.levels
        object.__setattr__(self, "levels", levels)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        if not self.levels:
            raise ValueError("levels must name at least one of %s" % (LEVELS,))
        for lv in self.levels:
            if lv not in LEVELS:
                raise ValueError(f"unknown level {lv!r}; choose from {LEVELS}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"duplicate level in {self.levels}")
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.top_patches > self.num_patches:
            raise ValueError(f"top_patches ({self.top_patches}) > num_patches ({self.num_patches})")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


# the Python values each annotated type of ModelConfig accepts (JSON gives lists for tuples, ints for floats)
_TYPES = {"int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), int),
          "float": ("a finite number",
                    lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), float),
          "bool": ("true or false", lambda v: isinstance(v, bool), bool),
          "str": ("a string", lambda v: isinstance(v, str), str),
          "tuple": ("a list", lambda v: isinstance(v, (list, tuple)), tuple)}


def _checked(f: dataclasses.Field, value):
    """`value` of ModelConfig field `f` as its annotated type, or a ValueError naming the field."""
    what, ok, cast = _TYPES[getattr(f.type, "__name__", f.type)]
    if not ok(value):
        raise ValueError(f"{f.name} must be {what}, got {_shown(value)}")
    value = cast(value)
    if "range" in f.metadata:
        lo, hi, ends = f.metadata["range"]
        if not ((lo <= value if ends[0] == "[" else lo < value) and (value <= hi if ends[1] == "]" else value < hi)):
            raise ValueError(f"{f.name} must be in {ends[0]}{lo:g}, {hi:g}{ends[1]}, got {_shown(value)}")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- embeddings

class _Rows:
    """Row-wise helpers for the dataclasses of tensors below (None fields stay None)."""

    def _map(self, fn):
        return type(self)(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in dataclasses.fields(self)})

    def take(self, index) -> "_Rows":
        """Rows `index` (an index tensor, a list or a slice) of every field."""
        return self._map(lambda t: t[index])

    def to(self, device) -> "_Rows":
        return self._map(lambda t: t.to(device))

    def detach(self) -> "_Rows":
        return self._map(lambda t: t.detach())

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    @classmethod
    def cat(cls, parts):
        """Concatenate embeddings computed block by block (same sequence lengths)."""
        parts = list(parts)
        return cls(**{f.name: None if getattr(parts[0], f.name) is None
                      else torch.cat([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(cls)})


@dataclass
class VideoEmb(_Rows):
    video: Tensor          # e_v [V, C]
    frames: Tensor         # f_v [V, N, C], raw CLIP frame features (zero on padded frames)
    frame_mask: Tensor     # [V, N] bool
    frame_weights: Tensor  # [V, N] after eq. 6; sum 1 over valid frames, 0 on padded
    anomaly: Tensor        # A [V, N], eq. 5 (meaningless on padded frames)
    video_score: Tensor    # [V] mean of the top-k valid A
    anomalous: Tensor      # [V] bool: the label used by eq. 6 (ground truth or video_score > 0.5)
    patches: Tensor | None = None        # selected patches [V, N*M, C], frame-major
    patch_weights: Tensor | None = None  # [V, N*M]; sum 1 over valid, 0 on padded
    patch_mask: Tensor | None = None     # [V, N*M] bool


@dataclass
class QueryEmb(_Rows):
    glob: Tensor           # [Q, C]: sentence s_t, or the audio [CLS] output m_a
    tokens: Tensor         # [Q, L, C]: words o_t, or audio segment outputs e_a (zero on padded)
    token_mask: Tensor     # [Q, L] bool
    token_weights: Tensor  # [Q, L]: sum 1 over valid tokens, 0 on padded


# ----------------------------------------------------------------------------- helpers

def _f32(x: Tensor) -> Tensor:
    """Half precision (cache or autocast) -> float32; float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _l2(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to mask; exactly 0 on masked positions
    (an all-masked row gives all zeros, never NaN)."""
    logits = _f32(logits)
    p = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)
    return torch.where(mask, p, 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [..., N, C] over the valid N (0 where none is valid)."""
    total = torch.where(mask[..., None], x, 0.0).sum(-2)
    return total / mask.sum(-1, keepdim=True).clamp_min(1).to(total.dtype)


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


def video_scores(A: Tensor, frame_mask: Tensor, num_frames: int | None = None) -> Tensor:
    """Video-level anomaly score (MIL, VadCLIP style): mean of the top-k frame scores A over
    valid frames, k = N_v // 16 + 1 capped at the valid count (N_v: num_frames, default
    A.shape[-1]). A video with no valid frame scores 0. A: [V, N] -> [V]."""
    k = (A.shape[-1] if num_frames is None else num_frames) // 16 + 1
    A = _f32(A).masked_fill(~frame_mask, float("-inf"))
    top = A.topk(min(k, A.shape[-1]), dim=-1).values                 # [V, k]
    kk = frame_mask.sum(-1).clamp(max=k)                               # [V]
    keep = torch.arange(top.shape[-1], device=A.device) < kk[:, None]
    return torch.where(keep, top, 0.0).sum(-1) / kk.clamp_min(1).to(top.dtype)


def mil_bce(A: Tensor, frame_mask: Tensor, labels: Tensor, num_frames: int | None = None) -> Tensor:
    """L_bce of eq. 12: binary cross-entropy of video_scores against the video labels (0/1).
    Written out (log clamped at -100 like F.binary_cross_entropy) so it is autocast-safe."""
    s = video_scores(A, frame_mask, num_frames)
    y = labels.to(device=s.device, dtype=s.dtype)
    return -(y * torch.log(s).clamp_min(-100) + (1 - y) * torch.log1p(-s).clamp_min(-100)).mean()


def _nce_parts(R: Tensor, logit_scale: float) -> tuple[Tensor, Tensor]:
    logits = logit_scale * _f32(R)
    target = torch.arange(len(R), device=R.device)
    return F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)  # eq. 10, eq. 11


def info_nce(R: Tensor, logit_scale: float) -> Tensor:
    """Symmetric InfoNCE over the [B, B] matrix R(v_i, q_j) of matching pairs on the
    diagonal: L_v2q (eq. 10, rows) + L_q2v (eq. 11, columns), summed as in eq. 12."""
    v2q, q2v = _nce_parts(R, logit_scale)
    return v2q + q2v


def token_wise(x: Tensor, x_mask: Tensor, x_w: Tensor, t: Tensor, t_mask: Tensor, t_w: Tensor) -> Tensor:
    """Two-sided weighted token-wise similarity of eq. 2-4 (DRL style), for all pairs:
        1/2 ( sum_i u_i max_j cos(t_i, x_j) + sum_j w_j max_i cos(t_i, x_j) )
    video side x [V, J, C] (mask, weights w [V, J]), query side t [Q, L, C] (mask,
    weights u [Q, L]) -> [V, Q]. One matrix product; peak memory about one [V, J, Q, L] tensor.
    Padded tokens of either side are -inf in the similarity, so they never win a max; a row of
    a padded token gives -2 (below any cosine), multiplied by its weight 0."""
    V, J, C = x.shape
    Q, L, _ = t.shape
    sim = (_l2(x).reshape(V * J, C) @ _l2(t).reshape(Q * L, C).T).view(V, J, Q, L)
    sim = sim.masked_fill(~x_mask[:, :, None, None], float("-inf"))
    sim.masked_fill_(~t_mask[None, None], float("-inf"))
    q2v = sim.amax(1).clamp_min(-2.0)  # [V, Q, L]  best video token per query token
    v2q = sim.amax(3).clamp_min(-2.0)  # [V, J, Q]  best query token per video token
    return 0.5 * ((_f32(q2v) * t_w[None]).sum(-1) + (_f32(v2q) * x_w[:, :, None]).sum(1))


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
    zero, so an untrained encoder returns the mean CLIP frame feature (zero-shot CLIP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fold = int(cfg.dim * cfg.shift_fraction / 2)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.num_frames, cfg.dim))
        self.layer = _transformer_layer(cfg)
        self.proj = _zero_init(nn.Linear(cfg.dim, cfg.dim))

    def forward(self, f: Tensor, mask: Tensor) -> Tensor:
        x = token_shift(f, self.fold) + self.pos[: f.shape[1]]
        x = self.layer(x, src_key_padding_mask=_key_padding(mask))
        return masked_mean(f, mask) + masked_mean(self.proj(x), mask)


class AnomalyHead(nn.Module):
    """Eq. 5 (VadCLIP): A = sigmoid(FC(FFN(f) + f)). FC starts at zero: A = 0.5."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.fc = _zero_init(nn.Linear(cfg.dim, 1))

    def forward(self, f: Tensor) -> Tensor:
        return torch.sigmoid(_f32(self.fc(self.ffn(f) + f).squeeze(-1)))


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
    untrained selector keeps the patches closest to their frame's [CLS].
    Training: perturbed top-k (soft, differentiable); eval: hard top-k, ties to the lower index."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.sigma, self.samples = cfg.top_patches, cfg.topk_sigma, cfg.topk_samples
        self.patch_in = nn.Linear(cfg.dim, cfg.selector_dim)
        self.frame_in = nn.Linear(cfg.dim, cfg.selector_dim, bias=False)
        self.out = _zero_init(nn.Linear(cfg.selector_dim, 1))

    def scores(self, patches: Tensor, cls: Tensor) -> Tensor:
        """patches [V, N, P, C], frame [CLS] features cls [V, N, C] -> [V, N, P] (float32)."""
        # cos(p, f) as a dot product over the two norms: no normalised copy of every patch
        norms = patches.norm(dim=-1).clamp_min(1e-12) * cls.norm(dim=-1).clamp_min(1e-12)[..., None]
        cos = torch.einsum("vnpc,vnc->vnp", patches, cls) / norms
        hidden = F.gelu(self.patch_in(patches) + self.frame_in(cls)[:, :, None, :])
        return _f32(cos) + _f32(self.out(hidden).squeeze(-1))

    def forward(self, patches: Tensor, cls: Tensor) -> Tensor:
        """-> selected patches [V, N*M, C], frame-major (frame 0's M patches, then frame 1's...)."""
        V, N, P, C = patches.shape
        s = self.scores(patches, cls)
        if self.training:
            ind = PerturbedTopK.apply(s.reshape(V * N, P), self.k, self.samples, self.sigma)  # [VN, M, P]
            sel = ind.to(patches.dtype) @ patches.reshape(V * N, P, C)
        else:
            # a stable descending sort keeps equal scores in index order: ties -> lower index
            idx = s.sort(dim=-1, descending=True, stable=True).indices[..., : self.k].sort(dim=-1).values
            sel = patches.gather(2, idx[..., None].expand(V, N, self.k, C))
        return sel.reshape(V, N * self.k, C)


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


# ----------------------------------------------------------------------------- the model

class VarCMP(nn.Module):
    """All learnable parts of VarCMP. Video heads: temporal encoder, frame weights f_fw, patch
    selection + patch weights f_pw, anomaly classifier. Query heads: word weights (text) or the
    audio encoder + segment weights (audio)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.temporal = TemporalEncoder(cfg)
        self.frame_weight = WeightHead(cfg.dim)
        self.anomaly_head = AnomalyHead(cfg)
        self.patch_selector = PatchSelector(cfg)   # built whatever the levels: one checkpoint layout
        self.patch_weight = WeightHead(cfg.dim)
        if cfg.query == "text":
            self.word_weight = WeightHead(cfg.dim)
        else:
            self.audio = AudioEncoder(cfg)
            self.segment_weight = WeightHead(cfg.dim)

    @property
    def _dtype(self) -> torch.dtype:
        return self.temporal.pos.dtype

    def _check(self, x: Tensor, shape: tuple, what: str):
        if x.dim() != len(shape) or any(s is not None and a != s for a, s in zip(x.shape, shape)):
            raise ValueError(f"{what}: expected shape {shape} (None = any), got {tuple(x.shape)}")

    # --- per video ---------------------------------------------------------------------------
    def encode_videos(self, frame_feat: Tensor, frame_mask: Tensor, patch_feat: Tensor | None = None,
                      labels: Tensor | None = None, *, patches: bool | None = None,
                      anomaly_weighting: bool | None = None) -> VideoEmb:
        """frame_feat [V, N, C], frame_mask [V, N], patch_feat [V, N, P, C] (needed only when the
        patches are selected), labels [V] (0/1, training: eq. 6 uses ground truth; None: the
        prediction video_score > 0.5). Half-precision inputs are computed in float32.
        patches: select the patches of the finer level (default: "finer" in cfg.levels); the
        other parts do not depend on it. anomaly_weighting: eq. 6-7 on or off (default: the
        config's). Both are arguments so that evaluation and search choose them per call (an
        ablation, a first stage without patches) without changing the model."""
        cfg = self.cfg
        patches_on = "finer" in cfg.levels if patches is None else bool(patches)
        weighting = cfg.anomaly_weighting if anomaly_weighting is None else bool(anomaly_weighting)
        V, N = frame_mask.shape
        self._check(frame_feat, (V, N, cfg.dim), "frame_feat")
        if N > cfg.num_frames:
            raise ValueError(f"{N} frames > num_frames={cfg.num_frames}")
        mask = frame_mask.to(device=frame_feat.device, dtype=torch.bool)
        f = torch.where(mask[..., None], frame_feat.to(self._dtype), 0.0)  # padding never leaks

        video = self.temporal(f, mask)
        frame_w = self.frame_weight(f, mask)
        A = self.anomaly_head(f)                                                     # eq. 5
        score = video_scores(A, mask, cfg.num_frames)
        anomalous = score > 0.5 if labels is None else torch.as_tensor(labels, device=score.device).reshape(V) > 0.5

        patches = patch_w = patch_mask = None
        M = cfg.top_patches
        if patches_on:
            if patch_feat is None:
                raise ValueError('patch_feat is required to select patches (the "finer" level)')
            self._check(patch_feat, (V, N, None, cfg.dim), "patch_feat")
            if patch_feat.shape[2] < M:
                raise ValueError(f"{patch_feat.shape[2]} patches per frame < top_patches={M}")
            p = patch_feat.to(self._dtype)
            if not bool(mask.all()):  # a full batch (the common case) needs no masked copy
                p = torch.where(mask[..., None, None], p, 0.0)
            patches = self.patch_selector(p, f)
            patch_mask = mask.repeat_interleave(M, dim=1)
            patch_w = self.patch_weight(patches, patch_mask)

        if weighting:                                                                # eq. 6-7
            biased = masked_softmax(A / cfg.tau, mask)
            frame_w = torch.where(anomalous[:, None], biased, frame_w)
            if patches is not None:
                patch_w = torch.where(anomalous[:, None], biased.repeat_interleave(M, dim=1) / M, patch_w)

        return VideoEmb(video=video, frames=f, frame_mask=mask, frame_weights=frame_w, anomaly=A,
                        video_score=score, anomalous=anomalous, patches=patches,
                        patch_weights=patch_w, patch_mask=patch_mask)

    # --- per query ---------------------------------------------------------------------------
    def encode_text(self, word_feat: Tensor, word_mask: Tensor, sentence: Tensor) -> QueryEmb:
        """word_feat [Q, L, C] (CLIP words incl. start/end), word_mask [Q, L], sentence s_t [Q, C]."""
        Q, L = word_mask.shape
        self._check(word_feat, (Q, L, self.cfg.dim), "word_feat")
        self._check(sentence, (Q, self.cfg.dim), "sentence")
        mask = word_mask.to(device=word_feat.device, dtype=torch.bool)
        words = torch.where(mask[..., None], word_feat.to(self._dtype), 0.0)
        return QueryEmb(glob=sentence.to(self._dtype), tokens=words, token_mask=mask,
                        token_weights=self.word_weight(words, mask))

    def encode_audio(self, seg_feat: Tensor, seg_mask: Tensor) -> QueryEmb:
        """seg_feat [Q, Na, audio_dim] CLAP segments, seg_mask [Q, Na] -> glob m_a, tokens e_a."""
        Q, Na = seg_mask.shape
        self._check(seg_feat, (Q, Na, self.cfg.audio_dim), "seg_feat")
        if Na > self.cfg.audio_segments:
            raise ValueError(f"{Na} audio segments > audio_segments={self.cfg.audio_segments}")
        mask = seg_mask.to(device=seg_feat.device, dtype=torch.bool)
        seg = torch.where(mask[..., None], seg_feat.to(self._dtype), 0.0)
        m_a, e_a = self.audio(seg, mask)
        e_a = torch.where(mask[..., None], e_a, 0.0)
        return QueryEmb(glob=m_a, tokens=e_a, token_mask=mask, token_weights=self.segment_weight(e_a, mask))

    def encode_queries(self, feats: dict[str, Tensor]) -> QueryEmb:
        """The one query dispatch, by cfg.query: encode_text(word_feat, word_mask, sentence) or
        encode_audio(seg_feat, seg_mask), from a dict with those keys (as the cache stores them)."""
        if self.cfg.query == "text":
            return self.encode_text(feats["word_feat"], feats["word_mask"], feats["sentence"])
        return self.encode_audio(feats["seg_feat"], feats["seg_mask"])

    # --- per pair ----------------------------------------------------------------------------
    def similarity(self, v: VideoEmb, q: QueryEmb, levels=None) -> dict[str, Tensor]:
        """Raw hierarchical similarities, one [V, Q] matrix per level plus "total" (their mean).
        coarse (eq. 1): cos(l, e_v), l = s_t or m_a (single-vector weights are 1).
        fine   (eq. 2, text): 1/2 (max_j cos(s, f_j) + sum_j w_j cos(s, f_j)), i.e. token_wise
               with the sentence as the only query token (weight 1);
               (eq. 3, audio): token_wise between segments e_a (weights u) and frames (weights w).
        finer  (eq. 4): token_wise between words / audio segments and the N*M selected patches.
        total  (eq. 8/9): mean over the active levels (default cfg.levels)."""
        levels = tuple(self.cfg.levels if levels is None else levels)
        if not levels or any(lv not in LEVELS for lv in levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
        out = {}
        if "coarse" in levels:
            out["coarse"] = _f32(_l2(v.video) @ _l2(q.glob).T)
        if "fine" in levels:
            if self.cfg.query == "text":
                one = _f32(q.glob.new_ones(len(q), 1))
                out["fine"] = token_wise(v.frames, v.frame_mask, v.frame_weights,
                                         q.glob[:, None], one.bool(), one)
            else:
                out["fine"] = token_wise(v.frames, v.frame_mask, v.frame_weights,
                                         q.tokens, q.token_mask, q.token_weights)
        if "finer" in levels:
            if v.patches is None:
                raise ValueError('"finer" needs VideoEmb.patches: encode videos with "finer" in cfg.levels')
            out["finer"] = token_wise(v.patches, v.patch_mask, v.patch_weights,
                                      q.tokens, q.token_mask, q.token_weights)
        out["total"] = sum(out[lv] for lv in levels) / len(levels)
        return out

    def frame_terms(self, v: VideoEmb, q: QueryEmb) -> Tensor:
        """The per-frame similarity s_j of the fine level for pairs (v[i], q[i]) -> [V, N] float32:
        text, the term of eq. 2: cos(s, f_j); audio, the frame side of eq. 3: max_i cos(e_a_i, f_j)
        over the valid segments (-2 where a query has none). Padded frames are -2. So, per pair,
        fine = 1/2 (max_j s_j + sum_j w_j s_j) for text, and the frame half of eq. 3 is
        1/2 sum_j w_j s_j for audio (tests/test_model.py checks both against `similarity`)."""
        f = _l2(_f32(v.frames))                                                       # [V, N, C]
        if self.cfg.query == "text":
            s = torch.einsum("vnc,vc->vn", f, _l2(_f32(q.glob)))
        else:
            sim = torch.einsum("vnc,vlc->vnl", f, _l2(_f32(q.tokens)))
            s = sim.masked_fill(~q.token_mask[:, None, :], float("-inf")).amax(-1).clamp_min(-2.0)
        return s.masked_fill(~v.frame_mask, -2.0)

    def linear_levels(self, levels=None) -> str:
        """Which part of the total score is linear in the query vector (see `video_vectors`)."""
        levels = tuple(self.cfg.levels if levels is None else levels)
        if self.cfg.query == "text" and "fine" in levels:
            return "coarse+fine-mean" if "coarse" in levels else "fine-mean"
        return "coarse"

    def video_vectors(self, v: VideoEmb, levels=None) -> Tensor:
        """One vector u_v per video [V, C] (float32) whose inner product with `query_vectors` is
        exactly the part of the score linear in the query (a first-stage index):

            text:  cos(s, e_v) + 1/2 sum_j w_j cos(s, f_j)   (coarse + the weighted-mean half of fine)
            audio: cos(m_a, e_v)                             (coarse; eq. 3 has no linear part)

        u_v = ~e_v + 1/2 sum_j w_j ~f_j with the fine level's frame weights (after eq. 6); a level
        not in `levels` (default cfg.levels) is left out; with neither coarse nor fine, u_v = ~e_v."""
        kind = self.linear_levels(levels)
        e = _l2(_f32(v.video))
        if kind == "coarse":
            return e
        half = 0.5 * (_f32(v.frame_weights)[..., None] * _l2(_f32(v.frames))).sum(1)  # weights 0 on padding
        return e + half if kind == "coarse+fine-mean" else half

    @staticmethod
    def query_vectors(q: QueryEmb) -> Tensor:
        """The query side of `video_vectors`: ~s (text) or ~m_a (audio), [Q, C] float32."""
        return _l2(_f32(q.glob))

    # --- training ----------------------------------------------------------------------------
    def loss(self, v: VideoEmb, q: QueryEmb, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Eq. 12 on B matching pairs (video i <-> query i): L = L_bce + L_v2q + L_q2v, the
        InfoNCE on logit_scale * R_total. L_bce (MIL) is 0 when labels is None."""
        sims = self.similarity(v, q)
        v2q, q2v = _nce_parts(sims["total"], self.cfg.logit_scale)
        bce = (mil_bce(v.anomaly, v.frame_mask, labels, self.cfg.num_frames) if labels is not None
               else v2q.new_zeros(()))
        return {"loss": bce + v2q + q2v, "v2q": v2q, "q2v": q2v, "bce": bce,
                **{f"sim_{k}": s.detach().diagonal().mean() for k, s in sims.items()}}
