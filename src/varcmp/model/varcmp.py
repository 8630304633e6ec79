"""The VarCMP model: its heads put together, and the hierarchical similarity (paper eq. 1-12).

Everything here runs on cached features of the frozen encoders (CLIP frames,
patches and words; CLAP audio segments). The work is split so that training,
evaluation and search each compute every part only once:

    per video   VarCMP.encode_videos                -> VideoEmb
    per query   VarCMP.encode_queries (text or audio, see queries) -> QueryEmb
    per pair    VarCMP.similarity(VideoEmb, QueryEmb) -> {level: [V, Q]}, batched
    training    info_nce, mil_bce, VarCMP.loss      (eq. 10-12)

Notation: ~x = x / ||x||_2, cos(a, b) = ~a . ~b. Masks are bool, True = valid.
Padded positions never change a score: their inputs are zeroed on entry, they
weigh 0 in every sum and are -inf in every max."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import LEVELS, ModelConfig
from .heads import AnomalyHead, AudioEncoder, PatchSelector, TemporalEncoder, WeightHead
from .losses import mil_bce, nce_parts, video_scores
from .queries import TEXT, QueryKind, query_kind
from .similarity import (QueryEmb, VideoEmb, at_least_f32, centred, l2_normalize, masked_median, masked_softmax,
                         token_wise)

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
        if query_kind(cfg.query) is TEXT:
            self.word_weight = WeightHead(cfg.dim)
        else:
            self.audio = AudioEncoder(cfg)
            self.segment_weight = WeightHead(cfg.dim)

    @property
    def kind(self) -> QueryKind:
        """What the model's kind of query (cfg.query) decides: its features, its fine level."""
        return query_kind(self.cfg.query)

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
        A = self.anomaly_head(f, mask)                                               # eq. 5
        score = video_scores(A, mask, cfg.mil_k)
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

        fine = f if cfg.fine_input == "frames" else centred(f, mask, masked_median(f, mask))  # what eq. 2-3 compare
        return VideoEmb(video=video, frames=fine, frame_mask=mask, frame_weights=frame_w, anomaly=A,
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
        """Queries of the model's kind from a dict of their features (as the cache stores them):
        encode_text(word_feat, word_mask, sentence) or encode_audio(seg_feat, seg_mask)."""
        kind = self.kind
        return getattr(self, kind.encode)(**{k: feats[k] for k in kind.features})

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
            e = v.video if v.unit else l2_normalize(v.video)
            out["coarse"] = at_least_f32(e @ l2_normalize(q.glob).T)
        if "fine" in levels:
            if self.kind.fine_on_glob:
                one = at_least_f32(q.glob.new_ones(len(q), 1))
                out["fine"] = token_wise(v.frames, v.frame_mask, v.frame_weights,
                                         q.glob[:, None], one.bool(), one, x_unit=v.unit)
            else:
                out["fine"] = token_wise(v.frames, v.frame_mask, v.frame_weights,
                                         q.tokens, q.token_mask, q.token_weights, x_unit=v.unit)
        if "finer" in levels:
            if v.patches is None:
                raise ValueError('"finer" needs VideoEmb.patches: encode videos with "finer" in cfg.levels')
            out["finer"] = token_wise(v.patches, v.patch_mask, v.patch_weights,
                                      q.tokens, q.token_mask, q.token_weights, x_unit=v.unit)
        out["total"] = sum(out[lv] for lv in levels) / len(levels)
        return out

    def frame_terms(self, v: VideoEmb, q: QueryEmb) -> Tensor:
        """The per-frame similarity s_j of the fine level for pairs (v[i], q[i]) -> [V, N] float32:
        text, the term of eq. 2: cos(s, f_j); audio, the frame side of eq. 3: max_i cos(e_a_i, f_j)
        over the valid segments (-2 where a query has none). Padded frames are -2. So, per pair,
        fine = 1/2 (max_j s_j + sum_j w_j s_j) for text, and the frame half of eq. 3 is
        1/2 sum_j w_j s_j for audio (tests/test_model.py checks both against `similarity`)."""
        f = l2_normalize(at_least_f32(v.frames))                                                       # [V, N, C]
        if self.kind.fine_on_glob:
            s = torch.einsum("vnc,vc->vn", f, l2_normalize(at_least_f32(q.glob)))
        else:
            sim = torch.einsum("vnc,vlc->vnl", f, l2_normalize(at_least_f32(q.tokens)))
            s = sim.masked_fill(~q.token_mask[:, None, :], float("-inf")).amax(-1).clamp_min(-2.0)
        return s.masked_fill(~v.frame_mask, -2.0)

    def linear_levels(self, levels=None) -> str:
        """Which part of the total score is linear in the query vector (see `video_vectors`)."""
        levels = tuple(self.cfg.levels if levels is None else levels)
        if self.kind.fine_on_glob and "fine" in levels:
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
        e = l2_normalize(at_least_f32(v.video))
        if kind == "coarse":
            return e
        half = 0.5 * (at_least_f32(v.frame_weights)[..., None] * l2_normalize(at_least_f32(v.frames))).sum(1)  # weights 0 on padding
        return e + half if kind == "coarse+fine-mean" else half

    @staticmethod
    def query_vectors(q: QueryEmb) -> Tensor:
        """The query side of `video_vectors`: ~s (text) or ~m_a (audio), [Q, C] float32."""
        return l2_normalize(at_least_f32(q.glob))

    # --- training ----------------------------------------------------------------------------
    def loss(self, v: VideoEmb, q: QueryEmb, labels: Tensor | None = None,
             pos_weight: float | None = None) -> dict[str, Tensor]:
        """Eq. 12 on B matching pairs (video i <-> query i): L = L_bce + L_v2q + L_q2v, the
        InfoNCE on logit_scale * R_total. L_bce (MIL) is 0 when labels is None; `pos_weight`:
        the anomalous videos' weight in it (see mil_bce)."""
        sims = self.similarity(v, q)
        v2q, q2v = nce_parts(sims["total"], self.cfg.logit_scale)
        bce = (mil_bce(v.anomaly, v.frame_mask, labels, pos_weight, self.cfg.mil_k) if labels is not None
               else v2q.new_zeros(()))
        return {"loss": bce + v2q + q2v, "v2q": v2q, "q2v": q2v, "bce": bce,
                **{f"sim_{k}": s.detach().diagonal().mean() for k, s in sims.items()}}
