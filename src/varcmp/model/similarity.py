"""Per-part embeddings and the token-wise similarity of eq. 2-4."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- embeddings

class _Rows:
    """Row-wise helpers for the dataclasses of tensors below (None fields and flags stay as they are)."""

    def _map(self, fn):
        return type(self)(**{f.name: fn(x) if isinstance(x := getattr(self, f.name), Tensor) else x
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
        """Concatenate embeddings computed block by block (same sequence lengths; flags of the first)."""
        parts = list(parts)
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                      if isinstance(x := getattr(parts[0], f.name), Tensor) else x
                      for f in dataclasses.fields(cls)})


@dataclass
class VideoEmb(_Rows):
    video: Tensor          # e_v [V, C]
    frames: Tensor         # f_v [V, N, C], the frames the fine level compares: CLIP's, or with fine_input
                           # centred each minus its video's median frame (zero on padded frames)
    frame_mask: Tensor     # [V, N] bool
    frame_weights: Tensor  # [V, N] after eq. 6; sum 1 over valid frames, 0 on padded
    anomaly: Tensor        # A [V, N], eq. 5 (meaningless on padded frames)
    video_score: Tensor    # [V] mean of the top-k valid A
    anomalous: Tensor      # [V] bool: the label used by eq. 6 (ground truth or video_score > 0.5)
    patches: Tensor | None = None        # selected patches [V, N*M, C], frame-major
    patch_weights: Tensor | None = None  # [V, N*M]; sum 1 over valid, 0 on padded
    patch_mask: Tensor | None = None     # [V, N*M] bool
    unit: bool = False     # video, frames and patches are unit length already (see `unit_length`)

    def unit_length(self) -> "VideoEmb":
        """The same embedding with e_v, the frames and the patches scaled to unit length (zero rows
        stay zero) and marked `unit`: every similarity is unchanged (each part is normalised before
        any product), and `VarCMP.similarity` skips normalising them again. The stored index keeps
        this form, so a query costs its products only."""
        if self.unit:
            return self
        scaled = {f: None if (x := getattr(self, f)) is None else l2_normalize(at_least_f32(x)).to(x.dtype)
                  for f in ("video", "frames", "patches")}
        return dataclasses.replace(self, **scaled, unit=True)


@dataclass
class QueryEmb(_Rows):
    glob: Tensor           # [Q, C]: sentence s_t, or the audio [CLS] output m_a
    tokens: Tensor         # [Q, L, C]: words o_t, or audio segment outputs e_a (zero on padded)
    token_mask: Tensor     # [Q, L] bool
    token_weights: Tensor  # [Q, L]: sum 1 over valid tokens, 0 on padded


# ----------------------------------------------------------------------------- helpers

def at_least_f32(x: Tensor) -> Tensor:
    """Half precision (cache or autocast) -> float32; float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2_normalize(x: Tensor) -> Tensor:
    """Unit length along the last axis."""
    return F.normalize(x, dim=-1)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to mask; exactly 0 on masked positions
    (an all-masked row gives all zeros, never NaN)."""
    logits = at_least_f32(logits)
    p = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)
    return torch.where(mask, p, 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [..., N, C] over the valid N (0 where none is valid)."""
    total = torch.where(mask[..., None], x, 0.0).sum(-2)
    return total / mask.sum(-1, keepdim=True).clamp_min(1).to(total.dtype)


def masked_median(x: Tensor, mask: Tensor) -> Tensor:
    """Median of x [V, N, C] over the valid N, channel by channel (the lower of the two middle
    values for an even count; 0 where none is valid) -> [V, C]."""
    med = torch.where(mask[..., None], x, float("nan")).nanmedian(dim=-2).values
    return torch.nan_to_num(med, nan=0.0)


def centred(x: Tensor, mask: Tensor, centre: Tensor | None = None) -> Tensor:
    """x [V, N, C] minus each row's centre [V, C] (default: its masked mean over the valid N), 0 where
    not valid (what a centred head sees: what sets a frame apart from the rest of its video, not the
    video's own look)."""
    centre = masked_mean(x, mask) if centre is None else centre
    return torch.where(mask[..., None], x - centre[:, None], 0.0)


def token_wise(x: Tensor, x_mask: Tensor, x_w: Tensor, t: Tensor, t_mask: Tensor, t_w: Tensor,
               x_unit: bool = False) -> Tensor:
    """Two-sided weighted token-wise similarity of eq. 2-4 (DRL style), for all pairs:
        1/2 ( sum_i u_i max_j cos(t_i, x_j) + sum_j w_j max_i cos(t_i, x_j) )
    video side x [V, J, C] (mask, weights w [V, J]), query side t [Q, L, C] (mask,
    weights u [Q, L]) -> [V, Q]. One matrix product; peak memory about one [V, J, Q, L] tensor.
    Padded tokens of either side are -inf in the similarity, so they never win a max; a row of
    a padded token gives -2 (below any cosine), multiplied by its weight 0. x_unit: x is unit
    length already (`VideoEmb.unit`), so it is not normalised again. The products run in x's
    precision (the query side is cast to it: bfloat16 patches of the stored index); the maxima
    and sums in at least float32."""
    V, J, C = x.shape
    Q, L, _ = t.shape
    x = x if x_unit else l2_normalize(x)
    sim = x.reshape(V * J, C) @ l2_normalize(t).to(x.dtype).reshape(Q * L, C).T
    sim = at_least_f32(sim).view(V, J, Q, L)  # the product's own output (or its copy): filled in place
    if not bool(x_mask.all()):  # most blocks have no padding on one side or both: no pass over sim
        sim.masked_fill_(~x_mask[:, :, None, None], float("-inf"))
    if not bool(t_mask.all()):
        sim.masked_fill_(~t_mask[None, None], float("-inf"))
    q2v = sim.amax(1).clamp_min(-2.0)  # [V, Q, L]  best video token per query token
    v2q = sim.amax(3).clamp_min(-2.0)  # [V, J, Q]  best query token per video token
    return 0.5 * ((at_least_f32(q2v) * t_w[None]).sum(-1) + (at_least_f32(v2q) * x_w[:, :, None]).sum(1))
