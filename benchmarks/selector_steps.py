"""The patch selector's learning, step by step (not part of the tests; the study in
benchmarks/selector-study.md): a finer-only model trained on a `varcmp-synth` cache's training videos in
a bare loop (AdamW, one caption per video, batches drawn with a seeded permutation, no validation),
printing one JSON line every `every` steps: the selector's hit rate on the planted evidence of the
first 80 training videos (`synth.probe.selector_hits`), the gradient norms of the selector's layers
and of the other heads, the retrieval loss, the per-frame spread of the cos term and of the MLP's
output, and the MLP's mean output on evidence patches minus the other patches of the same frames.

    .venv/bin/python benchmarks/selector_steps.py demo.zarr steps=400                 # cos + MLP
    .venv/bin/python benchmarks/selector_steps.py demo.zarr steps=400 selector_cos=0  # the MLP alone

key=value: steps, every, lr, sel_lr (the selector's own rate), batch, videos; any other key is a
ModelConfig field.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from varcmp.cache.reader import open_cache
from varcmp.model import ModelConfig, VarCMP
from varcmp.synth.probe import selector_hits, world_of

LOOP = dict(steps=400, every=40, lr=1e-4, sel_lr=None, batch=8, videos=320)


def settings(pairs: list[str]) -> tuple[dict, dict]:
    """(loop settings, ModelConfig settings) from key=value strings, typed by their defaults."""
    loop, model = dict(LOOP), {}
    for key, value in (p.split("=", 1) for p in pairs):
        if key in loop:
            loop[key] = float(value) if key in ("lr", "sel_lr") else int(value)
        else:
            default = ModelConfig.__dataclass_fields__[key].default
            model[key] = value.lower() in ("1", "true") if isinstance(default, bool) else type(default)(value)
    return loop, model


def grad_norm(module) -> float:
    return float(sum((p.grad.float() ** 2).sum() for p in module.parameters() if p.grad is not None) ** 0.5)


@torch.no_grad()
def score_parts(model, patches, frames, evidence) -> dict:
    """Per-frame spread of the cos term and of the rest (the MLP), and the MLP's evidence margin."""
    sel = model.patch_selector
    cos = torch.einsum("vnpc,vnc->vnp", patches, frames) / (patches.norm(dim=-1) * frames.norm(dim=-1)[..., None])
    mlp = sel.scores(patches, frames) - sel.cos_weight * cos
    shown = evidence.any(-1, keepdim=True).expand_as(evidence)
    return {"cos_std": float(cos.std(-1).mean()), "mlp_std": float(mlp.std(-1).mean()),
            "mlp_ev_minus_other": float(mlp[evidence].mean() - mlp[shown & ~evidence].mean())}


def main():
    loop, model_settings = settings(sys.argv[2:])
    torch.set_num_threads(1)
    t0 = time.time()
    cache = open_cache(sys.argv[1])
    world, sp = world_of(cache), cache.split("train")
    rows = np.arange(min(loop["videos"], sp.num_videos))
    got = sp.read(["videos/frame_feat", "videos/patch_feat"], rows)
    text = sp.load_text()
    caption = {int(v): i for i, v in enumerate(text.video_index)}
    order = world.split_indices("train")
    evidence = torch.from_numpy(np.stack([world.evidence_patches(order[r]) for r in rows]))
    frames, patches = torch.from_numpy(got["frame_feat"]).float(), torch.from_numpy(got["patch_feat"])
    words, wmask = torch.from_numpy(text.word_feat).float(), torch.from_numpy(text.word_mask)
    sentence, labels = torch.from_numpy(text.sentence).float(), torch.from_numpy(sp.labels[rows]).float()
    cfg = ModelConfig(dim=frames.shape[-1], num_frames=frames.shape[1], num_patches=patches.shape[2],
                      levels=("finer",), **model_settings)
    torch.manual_seed(0)
    model = VarCMP(cfg).train()
    sel = list(model.patch_selector.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in sel)]
    opt = torch.optim.AdamW([{"params": rest, "lr": loop["lr"]}, {"params": sel, "lr": loop["sel_lr"] or loop["lr"]}],
                            weight_decay=0.01)
    probe = rows[:80]
    print(json.dumps({"step": 0, "hit": round(selector_hits(model, cache, "train", rows=probe)["hit_rate"], 3)}),
          flush=True)
    rng, B, acc, perm = np.random.default_rng(0), loop["batch"], {}, np.zeros(0, np.int64)
    heads = {"sel_out": model.patch_selector.out, "sel_in": model.patch_selector.patch_in,
             "patch_w": model.patch_weight, "word_w": model.word_weight, "anomaly": model.anomaly_head}
    for step in range(1, loop["steps"] + 1):
        if len(perm) < B:
            perm = rng.permutation(len(rows))
        b, perm = perm[:B], perm[B:]
        q = [caption[int(r)] for r in rows[b]]
        v = model.encode_videos(frames[b], torch.ones(B, frames.shape[1], dtype=torch.bool), patches[b].float(),
                                labels=labels[b])
        out = model.loss(v, model.encode_text(words[q], wmask[q], sentence[q]), labels[b])
        opt.zero_grad()
        out["loss"].backward()
        for k, mod in heads.items():
            acc.setdefault(k, []).append(grad_norm(mod))
        acc.setdefault("nce", []).append(float((out["v2q"] + out["q2v"]).detach()))
        opt.step()
        if step % loop["every"] == 0:
            rec = {"step": step, "hit": round(selector_hits(model, cache, "train", rows=probe)["hit_rate"], 3),
                   **{k: round(float(np.mean(x)), 4) for k, x in acc.items()},
                   **{k: round(x, 4) for k, x in score_parts(model, patches[b].float(), frames[b], evidence[b]).items()},
                   "seconds": round(time.time() - t0)}
            print(json.dumps(rec), flush=True)
            acc = {}


if __name__ == "__main__":
    main()
