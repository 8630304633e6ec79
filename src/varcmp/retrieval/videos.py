"""The extracted videos of one split by position, read through the cache reader: what search scores."""

from __future__ import annotations

import hashlib

import numpy as np

from ..cache.reader import VideoData

# --------------------------------------------------------------------------
# Videos by position (the done videos of one split; the benchmark has a generated source)


class CacheVideos:
    """The extracted (done) videos of one split, addressed by position 0..n-1."""

    def __init__(self, split):
        self.split = split
        self.name = split.name
        self.rows = split.done_index()                      # cache row of each position
        self.n = len(self.rows)
        self.paths = split.paths[self.rows]
        self.durations = np.asarray(split.durations)[self.rows]
        self.root = split.attrs.get("root")

    def read(self, pos: np.ndarray, patches: bool) -> VideoData:
        """The videos at positions `pos`, read through `Split.read` (a corrupt chunk or a NaN is a
        one-line DamagedCacheError naming the video)."""
        pos = np.asarray(pos, dtype=np.int64)
        keys = ["videos/frame_feat", "videos/frame_mask", "videos/frame_time"] + (["videos/patch_feat"] if patches else [])
        return VideoData(index=pos, paths=self.paths[pos], labels=np.zeros(len(pos), np.int8),
                         categories=np.full(len(pos), "", object), **self.split.read(keys, self.rows[pos]))

    def fingerprint(self) -> str:
        """What the index of this split depends on besides the checkpoint and the encoders."""
        h = hashlib.sha256()
        h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        h.update("\n".join(map(str, self.paths)).encode())
        return h.hexdigest()
