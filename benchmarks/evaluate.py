"""All-pairs scoring speed and memory of `varcmp-eval`: the blocked scorer (per-video and
per-query parts computed once, then VarCMP.similarity in blocks) against a plain reference
that loops over the pairs in Python and evaluates eq. 1-4 for each, in one run, as a ratio.

Features are generated in memory with the production shapes (random, 512-d, 32 frames of
49 patches, 32 words, all valid: the worst case), all three levels, text queries. Each size
runs in a fresh subprocess so that its memory peaks are its own; peaks are read from
/proc/self/status (VmHWM, reset between stages through /proc/self/clear_refs) because
tracemalloc does not see torch's allocations. glibc's mmap threshold is set per stage (see one())
so that the inputs freed before scoring do not linger in the heap; RSS is also sampled during
scoring, after 25/50/75/100 % of the blocks (flat: no growth with the number of pairs).

    .venv/bin/python benchmarks/evaluate.py                  # 290 x 290 and 2,000 x 2,000
    .venv/bin/python benchmarks/evaluate.py --sizes 290 --chunk 64

At 2,000 x 2,000 the reference is timed on a random sample of pairs (--ref-pairs) and
extrapolated to all pairs; at sizes up to --ref-full pairs it runs on every pair. The reference
shares the per-video/per-query encoding with the blocked scorer (it would be no faster
recomputing it per pair), runs on one thread (its best case: its ops are tiny) and also checks
the blocked scores on the pairs it computes.

Goal: 290 x 290 in a couple of seconds on 2 CPU cores, and a scoring working set that does
not grow with the number of pairs (only the [V, Q] result matrices do, 4 bytes a pair a level).

Measured on this project's 2-core machine when it was otherwise idle (matmul yardstick ~150
GFLOP/s), chunk 32: 290 x 290 in 7.2 s (encode videos 3.3 s, pairwise 3.8 s = 45 us a pair) vs
27.7 s for the reference (pairwise 6.4x); 2,000 x 2,000 in 200 s (encode 19 s, pairwise 180 s)
vs ~1,170 s extrapolated; scoring working set 112 MiB and 203 MiB (61 MiB of it the results),
flat from the first quarter of the blocks to the end. Both halves are bound by VarCMP itself
(patch-selector MLP over every patch; token-wise similarity), not by the blocking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

MiB = 2 ** 20


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _mallopt(param: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _trim() -> None:
    """Hand memory freed by earlier stages back to the OS, so that a stage's peak above its start
    is its own working set (without this a stage may reuse resident freed pages and look smaller)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Stage:
    """Wall time and peak RSS above the RSS at the start of a stage."""

    def __init__(self, name: str, results: dict):
        self.name, self.results = name, results

    def __enter__(self):
        _trim()
        self.exact = _reset_peak()
        self.rss0 = _status("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        peak = _status("VmHWM")
        self.results[self.name] = {"s": dt, "peak_above_start_mib": (peak - self.rss0) / MiB,
                                   "rss_after_mib": _status("VmRSS") / MiB, "peak_exact": self.exact}


def generate(V: int, Q: int, seed: int = 0):
    """Production-shaped cache contents (float16 like the cache), written block by block."""
    from varcmp.cache.reader import VideoData

    g = torch.Generator().manual_seed(seed)
    N, P, C, L = 32, 49, 512, 32
    frame = np.empty((V, N, C), np.float16)
    patch = np.empty((V, N, P, C), np.float16)
    for s in range(0, V, 50):
        e = min(V, s + 50)
        frame[s:e] = torch.randn(e - s, N, C, generator=g).half().numpy()
        patch[s:e] = torch.randn(e - s, N, P, C, generator=g).half().numpy()
    videos = VideoData(index=np.arange(V), paths=np.array([f"v{i}.mp4" for i in range(V)], dtype=object),
                       labels=np.ones(V, np.int8), categories=np.array(["x"] * V, dtype=object),
                       frame_feat=frame, frame_mask=np.ones((V, N), bool),
                       frame_time=np.zeros((V, N), np.float32), patch_feat=patch)
    feats = {"word_feat": torch.randn(Q, L, C, generator=g).half().numpy(), "word_mask": np.ones((Q, L), bool),
             "sentence": torch.randn(Q, C, generator=g).half().numpy()}
    return videos, feats


def pair_reference(v, q, i: int, j: int) -> float:
    """R_total of one pair straight from eq. 1, 2 and 4 (text), everything recomputed for the pair."""
    l = q.glob[j]
    coarse = F.cosine_similarity(v.video[i], l, dim=0)
    fm = v.frame_mask[i]
    f = F.normalize(v.frames[i][fm], dim=-1)
    w = v.frame_weights[i][fm]
    cs = f @ F.normalize(l, dim=0)                                         # cos(s_t, f_j)
    fine = 0.5 * (cs.max() + (w * cs).sum())
    pm, tm = v.patch_mask[i], q.token_mask[j]
    p = F.normalize(v.patches[i][pm], dim=-1)
    o = F.normalize(q.tokens[j][tm], dim=-1)
    S = o @ p.T                                                            # cos(o_i, p_k)
    finer = 0.5 * ((q.token_weights[j][tm] * S.max(1).values).sum() + (v.patch_weights[i][pm] * S.max(0).values).sum())
    return float((coarse + fine + finer) / 3)


def matmul_gflops(seconds: float = 1.0) -> float:
    """What this machine delivers right now on a float32 matmul (other processes share the cores):
    a yardstick to compare runs made under different loads."""
    a, b = torch.randn(4096, 512), torch.randn(512, 4096)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 4096 * 512 * 4096 * n / (time.perf_counter() - t0) / 1e9


def products_floor(v, q, chunk: int) -> float:
    """Seconds of the float32 products alone that the all-pairs score cannot avoid, on the same
    blocks in the same run: every block's patches x words (finer) and frames x sentences (fine),
    from unit-length inputs (normalising, masking, maxima and sums excluded), valid tokens only."""
    from varcmp.model.similarity import l2_normalize

    def blocks(x, mask):
        return [l2_normalize(x[s:s + chunk])[mask[s:s + chunk]].float() for s in range(0, len(x), chunk)]

    with torch.inference_mode():
        sides = [(blocks(v.patches, v.patch_mask), blocks(q.tokens, q.token_mask)),
                 (blocks(v.frames, v.frame_mask), [l2_normalize(q.glob[s:s + chunk]) for s in range(0, len(q), chunk)])]
        t0 = time.perf_counter()
        for xs, ts in sides:
            for x in xs:
                for t in ts:
                    x @ t.T
        return time.perf_counter() - t0


def one(V: int, Q: int, chunk: int, ref_pairs: int, ref_full: int, threads: int) -> dict:
    from varcmp.evaluate import zero_shot_model
    from varcmp.retrieval.scoring import ENCODE_BATCH
    from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix
    from varcmp.cache_schema import CacheSpec

    torch.set_num_threads(threads)
    # glibc: while the inputs are generated and encoded, blocks >= 1 MiB are mmapped and given back
    # on free, so that the heap does not keep (and the scoring stage does not re-touch) their pages
    _mallopt(M_MMAP_THRESHOLD, MiB)
    res: dict = {"videos": V, "queries": Q, "chunk": chunk, "threads": threads, "encode_batch": ENCODE_BATCH,
                 "gflops_before": matmul_gflops()}
    with Stage("generate", res):
        videos, feats = generate(V, Q)
    model = zero_shot_model(CacheSpec(), "text")
    with torch.no_grad():  # trained-like heads: non-uniform weights, some anomalous videos
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    with Stage("encode_videos", res):
        v = encode_videos(model, videos, "cpu", batch=ENCODE_BATCH)
    with Stage("encode_queries", res):
        q = encode_queries(model, feats, "cpu")
    del videos, feats
    blocks = -(-V // chunk) * -(-Q // chunk)
    marks, calls, rss0, similarity = {}, [0], _status("VmRSS"), model.similarity

    def tracked(*a, **k):  # RSS after 25, 50, 75 and 100 % of the blocks: flat = no growth with pairs
        out = similarity(*a, **k)
        calls[0] += 1
        for pct in (25, 50, 75, 100):
            if calls[0] == max(1, blocks * pct // 100) and pct not in marks:
                marks[pct] = (_status("VmRSS") - rss0) / MiB
        return out

    model.similarity = tracked
    # scoring: its temporaries come from the heap and are reused (as with glibc's defaults), so
    # the timing has no page-fault churn and its RSS is its working set
    _mallopt(M_MMAP_THRESHOLD, 512 * MiB)
    _mallopt(M_TRIM_THRESHOLD, 1024 * MiB)
    with Stage("score", res):
        rss0 = _status("VmRSS")
        sims = score_matrix(model, v, q, chunk=chunk)
    model.similarity = similarity
    res["floor_s"] = products_floor(v, q, chunk)
    res["score"]["blocks"] = blocks
    res["score"]["rss_above_start_mib_at_pct_of_blocks"] = marks
    res["blocked_s"] = res["encode_videos"]["s"] + res["encode_queries"]["s"] + res["score"]["s"]

    total = V * Q
    rng = np.random.default_rng(0)
    if total <= ref_full:
        pairs, sampled = [(i, j) for i in range(V) for j in range(Q)], False
    else:
        flat = rng.choice(total, size=min(ref_pairs, total), replace=False)
        pairs, sampled = [(int(k // Q), int(k % Q)) for k in flat], True
    # one thread: the per-pair ops are tiny, and a second thread only adds waits at every op when
    # other processes hold the other core (that made the loop 10x slower here); its best case
    torch.set_num_threads(1)
    with torch.inference_mode():
        pair_reference(v, q, 0, 0)  # warm-up
        t0 = time.perf_counter()
        ref = np.array([pair_reference(v, q, i, j) for i, j in pairs])
        dt = time.perf_counter() - t0
    torch.set_num_threads(threads)
    got = np.array([sims["total"][i, j] for i, j in pairs])
    res["reference"] = {"pairs_timed": len(pairs), "sampled": sampled, "s_timed": dt,
                        "s_all_pairs": dt * total / len(pairs), "max_abs_diff": float(np.abs(ref - got).max())}
    res["reference_s"] = res["encode_videos"]["s"] + res["encode_queries"]["s"] + res["reference"]["s_all_pairs"]
    res["ratio_total"] = res["reference_s"] / res["blocked_s"]
    res["ratio_pairwise"] = res["reference"]["s_all_pairs"] / res["score"]["s"]
    res["result_matrices_mib"] = sum(s.nbytes for s in sims.values()) / MiB
    res["vm_hwm_mib"] = _status("VmHWM") / MiB
    res["gflops_after"] = matmul_gflops()
    return res


def report(r: dict) -> None:
    V, Q = r["videos"], r["queries"]
    ref = r["reference"]
    how = f"sampled {ref['pairs_timed']} pairs, extrapolated" if ref["sampled"] else f"all {ref['pairs_timed']} pairs"
    print(f"\n{V} videos x {Q} queries ({V * Q:,} pairs), levels coarse+fine+finer, chunk {r['chunk']}, "
          f"{r['threads']} threads; fp32 matmul yardstick {r['gflops_before']:.0f} GFLOP/s before, "
          f"{r['gflops_after']:.0f} after (other processes share these cores)")
    for k in ("generate", "encode_videos", "encode_queries", "score"):
        s = r[k]
        print(f"  {k:15s} {s['s']:8.2f} s   peak {s['peak_above_start_mib']:8.0f} MiB above the stage's start "
              f"(RSS after {s['rss_after_mib']:.0f} MiB)")
    sc = r["score"]
    print(f"  score RSS above its start after 25/50/75/100 % of the {sc['blocks']} blocks: "
          + " / ".join(f"{sc['rss_above_start_mib_at_pct_of_blocks'][p]:.0f}" for p in ("25", "50", "75", "100"))
          + " MiB")
    print(f"  products floor  {r['floor_s']:8.2f} s   (the pairwise part's float32 products alone, same blocks, "
          f"this run): pairwise / floor = {r['score']['s'] / r['floor_s']:.2f}")
    print(f"  blocked scorer  {r['blocked_s']:8.2f} s   (encode videos + queries + blocked pairwise)")
    print(f"  reference       {r['reference_s']:8.2f} s   (same encoding + 1-thread pair loop "
          f"{ref['s_all_pairs']:.2f} s: {how})")
    print(f"  ratio           {r['ratio_total']:8.1f} x total, {r['ratio_pairwise']:.1f} x pairwise part; "
          f"max |blocked - reference| = {ref['max_abs_diff']:.2e}")
    print(f"  result matrices {r['result_matrices_mib']:8.1f} MiB (4 levels x V x Q float32); process VmHWM "
          f"{r['vm_hwm_mib']:.0f} MiB (generated inputs included)")


@click.command()
@click.option("--sizes", default="290,2000", help="Collection sizes (videos = queries), comma-separated.")
@click.option("--chunk", default=None, type=int, help="Block size [default: varcmp.evaluate.DEFAULT_CHUNK].")
@click.option("--ref-pairs", default=2000, help="Pairs the reference is timed on when a size has too many.")
@click.option("--ref-full", default=100_000, help="Up to this many pairs the reference scores every pair.")
@click.option("--threads", default=2, help="torch threads.")
@click.option("--one", "one_size", default=None, type=int, hidden=True)
def main(sizes, chunk, ref_pairs, ref_full, threads, one_size):
    from varcmp.evaluate import DEFAULT_CHUNK

    chunk = chunk or DEFAULT_CHUNK
    if one_size is not None:
        print(json.dumps(one(one_size, one_size, chunk, ref_pairs, ref_full, threads)))
        return
    print(f"varcmp-eval scoring benchmark; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = []
    for n in (int(s) for s in sizes.split(",")):
        p = subprocess.run([sys.executable, __file__, "--one", str(n), "--chunk", str(chunk), "--ref-pairs",
                            str(ref_pairs), "--ref-full", str(ref_full), "--threads", str(threads)],
                           capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"size {n} failed:\n{p.stderr}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        report(results[-1])
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"\nscoring working set: {a['score']['peak_above_start_mib']:.0f} MiB at {a['videos']}^2 pairs vs "
              f"{b['score']['peak_above_start_mib']:.0f} MiB at {b['videos']}^2 pairs "
              f"(of which result matrices {a['result_matrices_mib']:.0f} / {b['result_matrices_mib']:.0f} MiB)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
