"""The anomaly head (eq. 5) trained alone with the MIL loss on a `varcmp-synth` cache's training frames
(not part of the tests; the study behind `--mil-k`, README "Does training beat frozen CLIP?").

A bare loop: AdamW at the rate the full model gives the head (--lr x --anomaly-lr-scale: 2e-3), the
balanced MIL loss, batches of 32 drawn with a seeded permutation; 80 training videos (seeded) are held
out. Prints one JSON line: the video-level AUC on the held-out training videos and on the test split
after each epoch (epoch 0: untrained, 0.5), and the test AUC at the epoch the held-out videos pick.

    varcmp-synth hard.zarr -n 1200 --seed 7 --test-share 0.33 --normal-share 0.3 --span 2 --object-patches 1
    .venv/bin/python benchmarks/anomaly_head.py hard.zarr mil_k=vadclip epochs=16
    .venv/bin/python benchmarks/anomaly_head.py hard.zarr mil_k=max epochs=16 seed=1

key=value: epochs, lr, weight_decay, batch, seed, held_out, mil_k (max or vadclip), ffn_dim,
input_drop (dropout on the head's input frames), frame_drop (a share of each video's frames hidden),
anomaly_input (frames, the script's default and the paper's; centred: each frame minus its video's mean
frame; split, varcmp's default: a score of each frame minus its video's median frame plus one of the median).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from varcmp.cache.reader import open_cache
from varcmp.model import ModelConfig, mil_bce, video_scores
from varcmp.model.heads import AnomalyHead
from varcmp.model.losses import balance_weight
from varcmp.retrieval.metrics import roc_auc
from varcmp.training.step import drop

SETTINGS = dict(epochs=16, lr=2e-3, weight_decay=0.01, batch=32, seed=0, held_out=80, mil_k="max", ffn_dim=1024,
                input_drop=0.0, frame_drop=0.0, anomaly_input="frames")


def settings(pairs: list[str]) -> dict:
    out = dict(SETTINGS)
    for key, value in (p.split("=", 1) for p in pairs):
        if key not in out:
            raise SystemExit(f"unknown setting {key!r}; one of {', '.join(SETTINGS)}")
        out[key] = type(SETTINGS[key])(value)
    return out


def frames(cache, split: str):
    v = cache.split(split).load_videos(patches=False, audio=False)
    return (torch.from_numpy(v.frame_feat).float(), torch.from_numpy(v.frame_mask).bool(),
            torch.from_numpy(np.asarray(v.labels)).float())


@torch.no_grad()
def auc(head, x, m, y, rule: str) -> float:
    head.eval()
    return roc_auc(video_scores(head(x, m), m, rule).numpy(), y.numpy())


def main():
    s = settings(sys.argv[2:])
    torch.set_num_threads(1)
    cache = open_cache(sys.argv[1])
    x, m, y = frames(cache, "train")
    xt, mt, yt = frames(cache, "test")
    held = np.random.default_rng(s["seed"]).permutation(len(x))[: s["held_out"]]
    fit = np.setdiff1d(np.arange(len(x)), held)
    (xv, mv, yv), (x, m, y) = (x[held], m[held], y[held]), (x[fit], m[fit], y[fit])
    torch.manual_seed(s["seed"])
    head = AnomalyHead(ModelConfig(dim=x.shape[-1], num_frames=x.shape[1], ffn_dim=s["ffn_dim"],
                                   anomaly_input=s["anomaly_input"]))
    opt = torch.optim.AdamW(head.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    pos_weight, order = balance_weight(y), torch.Generator().manual_seed(s["seed"])
    curve = []
    for epoch in range(s["epochs"] + 1):
        curve.append({"epoch": epoch, "held_out": auc(head, xv, mv, yv, s["mil_k"]),
                      "test": auc(head, xt, mt, yt, s["mil_k"])})
        if epoch == s["epochs"]:
            break
        head.train()
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(perm) - s["batch"] + 1, s["batch"]):
            b = perm[i:i + s["batch"]]
            feats = torch.nn.functional.dropout(x[b], s["input_drop"]) if s["input_drop"] else x[b]
            hidden = drop(m[b], s["frame_drop"])
            loss = mil_bce(head(feats, hidden), hidden, y[b], pos_weight, s["mil_k"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    picked = max(curve[1:], key=lambda r: (r["held_out"], -r["epoch"]))
    print(json.dumps({"settings": s, "picked_epoch": picked["epoch"], "picked_test_auc": round(picked["test"], 3),
                      "last_test_auc": round(curve[-1]["test"], 3),
                      "curve": [[r["epoch"], round(r["held_out"], 3), round(r["test"], 3)] for r in curve]}))


if __name__ == "__main__":
    main()
