"""Is the gradient that reaches the patch selector signal or noise? (not part of the tests; the study in
benchmarks/selector-study.md). For the first `batches` batches of 8 training videos of a `varcmp-synth`
cache and an untrained finer-only model, the gradient of the retrieval loss (InfoNCE) with respect to
the selector's scores, estimated twice with independent perturbations of the perturbed top-k; prints
per batch the cosine between the two estimates (1: no noise, 0: all noise) and, for their mean, the
push (minus the gradient: where a step moves the score) on the planted evidence patches against the
other patches of the frames that show them, with its z-score.

    .venv/bin/python benchmarks/selector_grad.py demo.zarr                      # topk_samples 100
    .venv/bin/python benchmarks/selector_grad.py demo.zarr topk_samples=5000    # near the exact gradient

key=value: batches; any other key is a ModelConfig field.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from varcmp.cache.reader import open_cache
from varcmp.model import ModelConfig, VarCMP
from varcmp.synth.probe import world_of


def main():
    pairs = dict(p.split("=", 1) for p in sys.argv[2:])
    batches, B = int(pairs.pop("batches", 4)), 8
    model_settings = {k: type(ModelConfig.__dataclass_fields__[k].default)(v) for k, v in pairs.items()}
    torch.set_num_threads(1)
    cache = open_cache(sys.argv[1])
    world, sp = world_of(cache), cache.split("train")
    rows = np.arange(B * batches)
    got = sp.read(["videos/frame_feat", "videos/patch_feat"], rows)
    text = sp.load_text()
    caption = {int(v): i for i, v in enumerate(text.video_index)}
    order = world.split_indices("train")
    evidence = torch.from_numpy(np.stack([world.evidence_patches(order[r]) for r in rows]))
    frames, patches = torch.from_numpy(got["frame_feat"]).float(), torch.from_numpy(got["patch_feat"]).float()
    words, wmask = torch.from_numpy(text.word_feat).float(), torch.from_numpy(text.word_mask)
    sentence, labels = torch.from_numpy(text.sentence).float(), torch.from_numpy(sp.labels[rows]).float()
    torch.manual_seed(0)
    model = VarCMP(ModelConfig(dim=frames.shape[-1], levels=("finer",), **model_settings)).train()
    sel, seen = model.patch_selector, {}
    scores = sel.scores

    def kept_scores(p, c):  # the scores as a leaf of their own, to read their gradient
        seen["s"] = scores(p, c).detach().requires_grad_(True)
        return seen["s"]
    sel.scores = kept_scores
    for b0 in range(0, len(rows), B):
        b = np.arange(b0, b0 + B)
        q = [caption[int(r)] for r in rows[b]]
        push = []
        for draw in range(2):
            torch.manual_seed(100 + draw)
            v = model.encode_videos(frames[b], torch.ones(B, frames.shape[1], dtype=torch.bool), patches[b],
                                    labels=labels[b])
            out = model.loss(v, model.encode_text(words[q], wmask[q], sentence[q]), labels[b])
            (out["v2q"] + out["q2v"]).backward()
            push.append(-seen["s"].grad)
        agree = torch.nn.functional.cosine_similarity(push[0].flatten(), push[1].flatten(), dim=0)
        g, ev = (push[0] + push[1]) / 2, evidence[b]
        shown = ev.any(-1, keepdim=True).expand_as(ev)
        on, off, spread = g[ev].mean(), g[shown & ~ev].mean(), g[shown].std()
        print(json.dumps({"batch": b0 // B, "agree": round(float(agree), 3), "evidence_push": float(on),
                          "other_push": float(off), "z": round(float((on - off) / (spread / ev.sum() ** 0.5)), 2)}),
              flush=True)


if __name__ == "__main__":
    main()
