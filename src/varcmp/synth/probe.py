"""What a model does with the evidence a synthetic world planted: the patch selector's hit rate on
the patches that show the caption's subject and action (`World.evidence_patches`)."""

from __future__ import annotations

import numpy as np
import torch

from ..cache.reader import Cache
from .world import SynthParams, World


def world_of(cache: Cache) -> World:
    """The World a `varcmp-synth` cache was drawn from (ValueError for an extracted cache)."""
    meta = cache.preprocessing.get("synthetic")
    if not meta:
        raise ValueError(f"{cache.path}: not a varcmp-synth cache (it holds no world to compare with)")
    names = set(SynthParams.__dataclass_fields__)
    return World(SynthParams(**{k: v for k, v in meta.items() if k in names}))


@torch.no_grad()
def selector_hits(model, cache: Cache, split: str = "test", batch: int = 16, rows=None) -> dict:
    """The patch selector's recall of the planted evidence on `split` (`rows`: only those videos of
    it), at inference (hard top-M).
    In each frame that shows the described event, a hit is an evidence patch among the M kept; the
    rate is hits / min(M, evidence patches of the frame), over all such frames of the split, also
    per label (normal videos: their background event, in every frame; anomalous: the anomaly, in its
    span). `chance` is M / P, the rate of a selector that picks at random."""
    world = world_of(cache)
    sp = cache.split(split)
    order = world.split_indices(split)  # row r of the split is video order[r] of the world
    was = model.training
    model.eval()
    hits = {0: [0, 0], 1: [0, 0]}  # label -> [hits, possible]
    try:
        todo = np.arange(sp.num_videos) if rows is None else np.asarray(rows, np.int64)
        for s in range(0, len(todo), batch):
            rows = todo[s:s + batch]
            got = sp.read(["videos/frame_feat", "videos/frame_mask", "videos/patch_feat"], rows)
            f = torch.from_numpy(got["frame_feat"]).float()
            p = torch.from_numpy(got["patch_feat"]).float()
            V, N, P, _ = p.shape
            M = model.cfg.top_patches
            kept = model.patch_selector.keep(p, f)                       # [V, N, M] patch indices
            for r, row in enumerate(rows):
                ev = world.evidence_patches(order[row])                  # [N, P]
                shown = ev.any(1) & got["frame_mask"][r]
                found = np.take_along_axis(ev, kept[r].numpy(), axis=1)[shown].sum()
                label = world.videos[order[row]].label
                hits[label][0] += int(found)
                hits[label][1] += int(np.minimum(ev[shown].sum(1), M).sum())
    finally:
        model.train(was)

    def rate(h):
        return h[0] / h[1] if h[1] else float("nan")
    return {"hit_rate": rate([hits[0][0] + hits[1][0], hits[0][1] + hits[1][1]]),
            "normal": rate(hits[0]), "anomalous": rate(hits[1]), "chance": M / P}
