"""Speed of `varcmp-train` on a cache of UCFCrime-AR's training size (not part of the tests).

Writes a cache of random float16 features with the production shapes (1,610 training videos,
32 frames, 49 patches, 512-d, 32 words; 161 of them are then held out for validation) through
cache_schema's writer, in a temporary directory, then times the default configuration: steps/s,
one epoch, one validation pass, and the extrapolated 15-epoch run.

    .venv/bin/python benchmarks/train.py                 # the production size
    .venv/bin/python benchmarks/train.py --videos 400    # a quicker look (steps/s does not depend on it)
    .venv/bin/python benchmarks/train.py --threads 1     # on a machine shared with other jobs
    .venv/bin/python benchmarks/train.py --device cuda --precision fp32,bf16   # mixed precision against fp32
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from varcmp.cache.writer import CacheWriter
from varcmp.cache_schema import DONE, CacheSpec, QueryEntry, VideoEntry
from varcmp.train import Runtime, TrainOptions, train
from varcmp.training.data import validation_size


def write_cache(path: Path, n: int, spec: CacheSpec, seed: int = 0, block: int = 64) -> float:
    """A random cache of n done videos (3/4 anomalous) with one caption each; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    N, P, C, L = spec.num_frames, spec.num_patches, spec.dim, spec.max_words
    labels = (rng.random(n) < 0.75).astype(int)
    labels[:2] = [1, 0]
    videos = [VideoEntry(f"{'Abuse' if y else 'Normal_Videos'}/v{i:05d}.mp4", int(y), "Abuse" if y else "Normal")
              for i, y in enumerate(labels)]
    queries = [QueryEntry(f"caption {i}", i, i) for i in range(n)]
    w = CacheWriter(path, spec, {"clip": {"name": "random", "config_hash": "-", "weights_hash": "-"}},
                    {"benchmark": True})
    sw = w.split("train", videos, queries)
    a = lambda key: sw.store.array(f"train/{key}")  # noqa: E731 - block writes straight into the arrays
    valid = np.where(np.arange(n) % 7 == 6, N * 3 // 4, N)  # some short videos (padded frames)
    mask = np.arange(N)[None, :] < valid[:, None]
    a("videos/frame_mask")[:] = mask
    a("videos/frame_time")[:] = np.where(mask, np.arange(N, dtype=np.float32), 0)
    a("videos/duration")[:] = np.full(n, 60.0)
    a("videos/fps")[:] = np.full(n, 30.0, np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        a("videos/frame_feat")[s:e] = (rng.standard_normal((e - s, N, C), dtype=np.float32) * 0.05).astype(np.float16)
        a("videos/patch_feat")[s:e] = (rng.standard_normal((e - s, N, P, C), dtype=np.float32) * 0.05).astype(np.float16)
    a("videos/status")[:] = np.full(n, DONE, np.int8)
    words = (rng.standard_normal((n, L, C), dtype=np.float32) * 0.05).astype(np.float16)
    lengths = rng.integers(8, L + 1, n)
    wmask = np.arange(L)[None, :] < lengths[:, None]
    sw.write_text(0, words, wmask, words[np.arange(n), lengths - 1])
    w.finish()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1610, help="training-split videos (UCFCrime-AR: 1,610)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto",
                    help="comma-separated: one run per precision, the same seed and batches, e.g. fp32,bf16 "
                         "(their losses are compared)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    ap.add_argument("--keep", type=Path, help="write the cache here (kept; reused when it is there) instead of a "
                                              "temporary directory")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = CacheSpec(num_frames=32, num_patches=49, dim=512, max_words=32)
    with tempfile.TemporaryDirectory(prefix="varcmp-bench-") as tmp:
        cache = args.keep or Path(tmp) / "cache.zarr"
        if not cache.exists():
            secs = write_cache(cache, args.videos, spec)
            gib = args.videos * (spec.num_frames * (spec.num_patches + 1) * spec.dim * 2) / 2**30
            print(f"cache: {args.videos} videos, {gib:.2f} GiB float16, written in {secs:.1f} s")
        losses = {p: one_run(cache, Path(tmp) / f"run-{p}", args, p) for p in args.precision.split(",")}
    if len(losses) > 1:
        ref, *others = losses
        for p in others:
            a, b = losses[ref], losses[p]
            print(f"loss agreement, {p} vs {ref}: epoch loss {b:.5f} vs {a:.5f}, relative difference "
                  f"{abs(b - a) / abs(a):.2e}")


def one_run(cache: Path, run: Path, args, precision: str) -> float:
    """One epoch of the default configuration; prints its timings, returns its mean training loss."""
    opts = TrainOptions(epochs=1)  # every other setting: the defaults (the paper's)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"device {args.device}, precision {precision}, batch {opts.batch_size}, levels {','.join(opts.levels)}")
    t0 = time.perf_counter()
    s = train(cache, run, opts, Runtime(device=args.device, precision=precision), quiet=True)
    total = time.perf_counter() - t0
    ep = s.history[-1]
    untrained = s.history[0]["val_seconds"]
    print(f"read into memory: {s.load_seconds:.1f} s")
    print(f"train steps: {ep['steps']} in {ep['seconds']:.1f} s = {ep['steps'] / ep['seconds']:.2f} steps/s "
          f"({ep['seconds'] / ep['steps'] * 1000:.0f} ms/step)")
    print(f"validation pass ({validation_size(args.videos, opts.val_fraction, opts.val_min)} videos): "
          f"{ep['val_seconds']:.1f} s (untrained pass {untrained:.1f} s)")
    epoch = total - s.load_seconds - untrained  # one epoch + validation + checkpoints (+ setup)
    print(f"one epoch incl. validation and checkpoint writing: {epoch:.1f} s; whole 1-epoch run {total:.1f} s")
    est = s.load_seconds + untrained + 15 * epoch
    print(f"extrapolated default run (15 epochs): {est / 60:.1f} min")
    return float(ep["loss"])


if __name__ == "__main__":
    main()
