"""VarCMP's learnable heads and its hierarchical similarity (paper eq. 1-12), on cached features of the
frozen encoders: config (the settings), heads, similarity (per-part embeddings, token-wise similarity),
losses, varcmp (the model: encode videos, encode queries, score pairs, loss) and checkpoint (save and
load without running code). Importing it pulls in nothing of training, search or the CLI."""

from .config import LEVELS, QUERIES, ModelConfig, within
from .heads import AnomalyHead, AudioEncoder, PatchSelector, PerturbedTopK, TemporalEncoder, WeightHead, token_shift
from .losses import info_nce, mil_bce, video_scores
from .similarity import QueryEmb, VideoEmb, masked_mean, masked_softmax, token_wise
from .varcmp import VarCMP

__all__ = ["LEVELS", "QUERIES", "ModelConfig", "within", "QueryEmb", "VideoEmb", "masked_mean", "masked_softmax",
           "token_wise", "info_nce", "mil_bce", "video_scores", "AnomalyHead", "AudioEncoder", "PatchSelector",
           "PerturbedTopK", "TemporalEncoder", "WeightHead", "token_shift", "VarCMP"]
