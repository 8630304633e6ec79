"""Does training generalise? One training setting on a `varcmp-synth` cache, measured on its test
split (not part of the tests; the study behind issue 14's closing note).

Trains (or, with `zeroshot`, skips training), then prints one JSON line: test R@1 both ways with
their 95 % bootstrap intervals, the last epoch's R@1 (what model selection changed), the anomaly
head's video AUC, the patch selector's hit rate on the planted evidence (`synth.probe`), and the
validation curve (epoch, training loss, mean validation R@1).

    varcmp-synth demo.zarr -n 400 --seed 0
    .venv/bin/python benchmarks/recipes.py demo.zarr zs zeroshot=1
    .venv/bin/python benchmarks/recipes.py demo.zarr all epochs=8
    .venv/bin/python benchmarks/recipes.py demo.zarr finer-rel epochs=8 levels=finer topk_relative=1 topk_sigma=1
    .venv/bin/python benchmarks/recipes.py demo.zarr paper recipe=paper epochs=8

Any TrainOptions field is a key=value argument; runs go to --runs/NAME (default runs-recipes/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from rich.console import Console

from varcmp.cache.reader import open_cache
from varcmp.evaluate import evaluate_split, zero_shot_model
from varcmp.model import checkpoint
from varcmp.synth.probe import selector_hits
from varcmp.train import RECIPES, Runtime, TrainOptions, train


def options(pairs: list[str]) -> tuple[dict, bool, str]:
    """TrainOptions values from key=value strings, typed by the field's default; (values, zero-shot, recipe)."""
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    values, zero_shot, recipe = {}, False, "varcmp"
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key == "zeroshot":
            zero_shot = value.lower() in ("1", "true", "yes")
        elif key == "recipe":
            recipe = value
        elif key == "levels":
            values[key] = tuple(value.split(","))
        else:
            kind = type(fields[key].default)
            values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return values, zero_shot, recipe


def r1_with_interval(result: dict) -> dict:
    return {key: [round(m["r1"], 2), *[round(x, 1) for x in m.get("interval", {}).get("r1", [])]]
            for key, m in result["metrics"].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("name")
    ap.add_argument("settings", nargs="*", help="key=value: TrainOptions fields, zeroshot=1, recipe=paper")
    ap.add_argument("--runs", default="runs-recipes", type=Path)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    values, zero_shot, recipe = options(args.settings)
    t0 = time.perf_counter()
    out: dict = {"name": args.name, "recipe": recipe, **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in values.items()}}
    if zero_shot:
        r = evaluate_split(args.cache, zero_shot=True, split="test", query=values.get("query", "text"),
                           levels=values.get("levels"), device=args.device)
        with open_cache(args.cache) as cache:
            model = zero_shot_model(cache.spec, values.get("query", "text"))
            out["selector_hits"] = {k: round(v, 3) for k, v in selector_hits(model, cache, "test").items()}
    else:
        run = args.runs / args.name
        opts = TrainOptions(**{**RECIPES[recipe], **values})
        s = train(args.cache, run, opts, Runtime(device=args.device), overwrite=True,
                  console=Console(file=open(os.devnull, "w")), quiet=True)
        out["best_epoch"] = s.best_epoch
        out["curve"] = [(h["epoch"], round(h.get("loss", float("nan")), 3), round(h.get("val_r1", float("nan")), 1))
                        for h in s.history]
        r = evaluate_split(args.cache, checkpoint=run, split="test", device=args.device)
        last = evaluate_split(args.cache, checkpoint=run / "last.safetensors", split="test", device=args.device,
                              bootstrap=0)
        out["last_epoch_r1"] = {k: round(m["r1"], 2) for k, m in last["metrics"].items()}
        model, _ = checkpoint.load(run / "best.safetensors")
        with open_cache(args.cache) as cache:
            out["selector_hits"] = {k: round(v, 3) for k, v in selector_hits(model, cache, "test").items()}
    out["test_r1"] = r1_with_interval(r)
    if r.get("anomaly"):
        out["anomaly"] = r["anomaly"]
    out["seconds"] = round(time.perf_counter() - t0)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
