"""What the finer level could gain from the patch selector: zero-shot (untrained heads) finer-level R@1
on a `varcmp-synth` split, with the selection replaced by a fixed rule (not part of the tests; the
study in benchmarks/selector-study.md).

Rules, each keeping M patches per frame: `cos` (the patches closest to their frame's [CLS], the
untrained selector with its cos term), `first` (patches 0..M-1: the untrained selector without it, whose
scores are all 0, ties going to the lower index), `random` (seeded), `oracle` (the planted evidence,
`World.evidence_patches`, first; the cos rule fills the rest). Prints one JSON line per rule: R@1 both
ways with 95 % bootstrap intervals.

    .venv/bin/python benchmarks/selector_rules.py demo.zarr
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from varcmp.cache.reader import open_cache
from varcmp.model import ModelConfig, VarCMP
from varcmp.retrieval.metrics import bootstrap_intervals, query_to_video_ranks, video_to_query_ranks
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
from varcmp.synth.probe import world_of


def cos_scores(patch: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """cos(patch, frame [CLS]) [V, N, P] (float32)."""
    p, f = patch.astype(np.float32), frame.astype(np.float32)
    dots = np.einsum("vnpc,vnc->vnp", p, f)
    return dots / (np.linalg.norm(p, axis=-1) * np.linalg.norm(f, axis=-1)[..., None])


def rule_scores(rule: str, patch, frame, evidence, rng) -> np.ndarray:
    if rule == "cos":
        return cos_scores(patch, frame)
    if rule == "first":
        return -np.broadcast_to(np.arange(patch.shape[2], dtype=np.float32), patch.shape[:3])
    if rule == "random":
        return rng.random(patch.shape[:3])
    return cos_scores(patch, frame) + 10.0 * evidence  # oracle: cosines are in [-1, 1]


def kept(patch: np.ndarray, scores: np.ndarray, M: int) -> np.ndarray:
    """The M best patches of each frame by `scores`, in patch order, [V, N, M, C]: given only these,
    the untrained selector keeps them all."""
    best = np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :M], axis=-1)
    return np.take_along_axis(patch, best[..., None], axis=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rules", default="cos,first,random,oracle")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open_cache(args.cache) as cache:
        world, sp = world_of(cache), cache.split(args.split)
        videos = sp.load_videos(patches=True, audio=False)
        text = sp.load_text()
        order = world.split_indices(args.split)
        evidence = np.stack([world.evidence_patches(order[r]) for r in videos.index])
        spec = cache.spec
    cfg = ModelConfig(dim=spec.dim, num_frames=spec.num_frames, num_patches=spec.num_patches,
                      max_words=spec.max_words, levels=("finer",), selector_cos=False)
    torch.manual_seed(0)
    model = VarCMP(cfg).eval()
    queries = {"word_feat": text.word_feat, "word_mask": text.word_mask, "sentence": text.sentence}
    q = encode_queries(model, queries, "cpu")
    query_video = np.searchsorted(videos.index, text.video_index)
    patch = videos.patch_feat
    for rule in args.rules.split(","):
        videos.patch_feat = kept(patch, rule_scores(rule, patch, videos.frame_feat, evidence,
                                                          np.random.default_rng(0)), cfg.top_patches)
        sim = score_matrix(model, encode_videos(model, videos, "cpu", batch=32), q)["total"]
        out = {}
        for name, ranks in (("t2v", query_to_video_ranks(sim, query_video)),
                            ("v2t", video_to_query_ranks(sim, query_video)[0])):
            lo, hi = bootstrap_intervals(ranks, ("r1",))["r1"]
            out[name] = [round(100 * float(np.mean(ranks == 1)), 1), round(lo, 1), round(hi, 1)]
        print(json.dumps({"rule": rule, **out}), flush=True)


if __name__ == "__main__":
    main()
