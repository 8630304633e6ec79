"""The videos and queries of a split, paired for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..cache.reader import Split, VideoData
from ..cache_schema import CacheError
from ..model.queries import AUDIO, TEXT, query_kind

# --------------------------------------------------------------------------
# What is evaluated


@dataclass
class EvalData:
    """Videos and queries of one split, with the pairing and what had to be left out."""

    videos: VideoData
    query: str  # "text" or "audio"
    query_feats: dict[str, np.ndarray]  # text: word_feat, word_mask, sentence; audio: seg_feat, seg_mask
    query_video: np.ndarray  # [Q] row in `videos` of each query's video
    query_text: list[str]  # captions, or the video path of an audio query
    dropped: list[str] = field(default_factory=list)  # one line per query left out, and why
    no_query: int = 0  # videos (kept in the gallery) that have no query


def load_eval_data(split: Split, query: str, patches: bool = True) -> EvalData:
    """Every extracted video of the split, and every query whose video was extracted. ValueError for
    a query kind other than text or audio."""
    return (_caption_pairs if query_kind(query) is TEXT else _audio_pairs)(split, patches)


def _caption_pairs(split: Split, patches: bool) -> EvalData:
    """Text queries: the captions whose video was extracted; the others are dropped, one line each."""
    videos = split.load_videos(patches=patches, audio=False)
    t = split.load_text()
    row = {int(i): n for n, i in enumerate(videos.index)}
    keep = np.array([t.done[q] and int(t.video_index[q]) in row for q in range(len(t.text))], dtype=bool)
    paths = split.paths
    dropped = [f"caption {q} ({t.text[q][:40]!r}): its video {paths[t.video_index[q]]} was not extracted"
               for q in np.flatnonzero(~keep)]
    qv = np.array([row[int(i)] for i in t.video_index[keep]], dtype=np.int64)
    feats = {k: getattr(t, k)[keep] for k in TEXT.features}
    return EvalData(videos, TEXT.name, feats, qv, [str(x) for x in t.text[keep]], dropped,
                    int(len(videos.index) - len(np.unique(qv))))


def _audio_pairs(split: Split, patches: bool) -> EvalData:
    """Audio queries: each extracted video's own audio segments (videos with none stay as distractors)."""
    if not split.has_audio:
        raise CacheError(f"{split.cache.path}: split '{split.name}' has no audio features (extract with --audio)")
    videos = split.load_videos(patches=patches, audio=True)
    has = videos.audio_mask.any(1)
    qv = np.flatnonzero(has)
    feats = {"seg_feat": videos.audio_feat[has], "seg_mask": videos.audio_mask[has]}
    return EvalData(videos, AUDIO.name, feats, qv, [str(p) for p in videos.paths[has]], [], int((~has).sum()))
