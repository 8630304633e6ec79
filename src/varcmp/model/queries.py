"""Text or audio: the one place that says what differs between the two kinds of query. The model
encodes a kind's features, evaluation names its metrics by it, and search computes its features
with the frozen encoder it names; each looks the kind up with `query_kind` instead of comparing
names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class QueryKind:
    """Everything that depends on the kind of query (ModelConfig.query, --query)."""

    name: str                     # "text" or "audio"
    features: tuple[str, ...]     # the query features, as the cache stores them and `encode` names them
    mask: str                     # which of them is the tokens' validity mask (what --word-drop hides)
    encode: str                   # the VarCMP method that encodes them
    fine_on_glob: bool            # the fine level compares frames with the global vector alone (eq. 2), not
                                  # with the tokens (eq. 3); so it has a part linear in the query
    encoder: str                  # the frozen encoder that computes the features, as the cache records it
    held: str                     # the Split property that says a split holds such queries
    directions: tuple[tuple[str, str], tuple[str, str]]  # metric key and label: query->video, video->query
    frame_term: str               # the fine level's per-frame similarity s_j, in words

    @property
    def metric_keys(self) -> tuple[str, str]:
        """The two directions' metric keys: query->video, video->query (e.g. t2v, v2t)."""
        return self.directions[0][0], self.directions[1][0]


TEXT = QueryKind("text", ("word_feat", "word_mask", "sentence"), "word_mask", "encode_text", True, "clip", "has_text",
                 (("t2v", "text->video"), ("v2t", "video->text")), "cos(sentence, frame)")
AUDIO = QueryKind("audio", ("seg_feat", "seg_mask"), "seg_mask", "encode_audio", False, "clap", "has_audio",
                  (("a2v", "audio->video"), ("v2a", "video->audio")), "max_i cos(audio segment i, frame)")
QUERY_KINDS = {k.name: k for k in (TEXT, AUDIO)}


def query_kind(name: str) -> QueryKind:
    """The kind called `name`; ValueError for any other name."""
    try:
        return QUERY_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"query must be 'text' or 'audio', got {name!r}") from None


def check_segments(cfg, cache, checkpoint) -> None:
    """An audio model reads at most cfg.audio_segments segments a query: a cache with more is
    refused (UserError, one line). Text models take any cache."""
    if query_kind(cfg.query) is AUDIO and cache.spec.audio_segments > cfg.audio_segments:
        raise UserError(f"{checkpoint}: trained with {cfg.audio_segments} audio segments, but {cache.path} has "
                        f"{cache.spec.audio_segments}")
