"""What a checkpoint's top-1 mistakes share with the right video, on a `varcmp-synth` split (not part of
the tests; README "Does training beat frozen CLIP?"). For every video whose own query is not ranked first
(video->query, the direction that has one right answer per video), the video of the query ranked first
instead is compared with it in the world's terms: scene, label, background event (subject, activity),
anomalous event (subject, action, whether the two spans overlap). Prints one JSON line: R@1, the number
of mistakes and, for each property, how many mistakes share it, and the same count for random pairs of
test videos (what sharing it by chance looks like). A property shared by every mistake and rarely by
chance is what the model goes by; one never shared is what it tells apart.

    varcmp-synth hard.zarr -n 1200 --seed 7 --test-share 0.33 --normal-share 0.3 --span 2 --object-patches 1
    .venv/bin/python benchmarks/confusions.py hard.zarr runs/audio
    .venv/bin/python benchmarks/confusions.py hard.zarr runs/audio --levels finer   # one level's score alone
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from varcmp.cache.reader import open_cache
from varcmp.model import checkpoint
from varcmp.retrieval.pairs import load_eval_data
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
from varcmp.synth.probe import world_of


def shared(a, b) -> dict[str, bool]:
    """Which properties videos `a` and `b` (VideoPlans) have in common."""
    bg_a, bg_b = (next(e for e in p.events if not e.anomalous) for p in (a, b))
    out = {"scene": a.scene == b.scene, "label": a.label == b.label,
           "background subject": bg_a.subject == bg_b.subject, "background activity": bg_a.verb == bg_b.verb}
    if a.label and b.label:
        ev_a, ev_b = (next(e for e in p.events if e.anomalous) for p in (a, b))
        out.update({"both anomalous": True, "anomalous subject": ev_a.subject == ev_b.subject,
                    "anomalous action": ev_a.verb == ev_b.verb,
                    "overlapping spans": max(ev_a.start, ev_b.start) < min(ev_a.stop, ev_b.stop)})
    return out


def tally(pairs, plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i, j in pairs:
        for key, same in shared(plan(i), plan(j)).items():
            counts[key] = counts.get(key, 0) + int(same)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--levels", default=None, help="score with these levels only, e.g. finer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = checkpoint.load(checkpoint.resolve(args.checkpoint))
    levels = tuple(args.levels.split(",")) if args.levels else None
    with open_cache(args.cache) as cache:
        world, split = world_of(cache), cache.split(args.split)
        data = load_eval_data(split, model.cfg.query)
        order = world.split_indices(args.split)
    q = encode_queries(model, data.query_feats, "cpu")
    emb = encode_videos(model, data.videos, "cpu", batch=32)
    sim = np.asarray(score_matrix(model, emb, q, levels=levels)["total"])                   # [V, Q]
    # video->query: each video's best query; a mistake when that query is not one of its own
    best_video = data.query_video[sim.argmax(1)]                                  # [V] video of the top query
    videos = np.unique(data.query_video)
    wrong = [(v, int(best_video[v])) for v in videos if best_video[v] != v]
    rng = np.random.default_rng(0)
    chance = [tuple(rng.choice(videos, 2, replace=False)) for _ in range(2000)]
    plan = lambda row: world.videos[order[data.videos.index[row]]]  # noqa: E731
    mistakes, by_chance = tally(wrong, plan), tally(chance, plan)
    print(json.dumps({"checkpoint": args.checkpoint, "query": model.cfg.query,
                      "levels": list(levels or model.cfg.levels),
                      "v2q_r1": round(100 * (1 - len(wrong) / len(videos)), 1), "mistakes": len(wrong),
                      "shared_by_mistakes": mistakes,
                      "shared_by_random_pairs_per_mistake": {k: round(v * len(wrong) / len(chance), 1)
                                                             for k, v in by_chance.items()}}))


if __name__ == "__main__":
    main()
