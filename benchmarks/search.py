"""`varcmp-search` at scale on the stored video index (`varcmp.retrieval.index`): generated
collections of the production shapes are indexed by the code `varcmp-index` runs, then searched
exhaustively and in two stages over the index, in one run.

    taskset -c 0 .venv/bin/python benchmarks/search.py --sizes 10000 --zero-shot   # README figures
    .venv/bin/python benchmarks/search.py --sizes 10000,100000                      # trained heads first
    .venv/bin/python benchmarks/search.py --checkpoint runs/mine                     # trained heads (512-d, 32 frames, 49 patches)

The collection. Production shapes (32 frames, 49 patches, 512-d, 32-token queries), far too big
to store at 100k (160 GB at float16), so features are generated on demand and never kept:
varcmp-synth's world (`varcmp.synth.world.World`: concepts with families, Zipf-distributed subjects,
16 scenes, 13 anomalous actions and 10 normal activities, a camera vector per video, bystanders,
an anomalous event filling a 4-frame span of 32 and a few moving patches) fixes what each video
shows and each caption says; `WorldVideos` renders a video's frame and patch features from it
with the amplitudes of `synth.world.AMP` (the same recipe as `World.video_features`). Two changes make
rendering ~10x cheaper than `World.video_features` (which would take 20 minutes at 100k): the
patch noise is drawn in a random 16-dimensional subspace per video (coefficients x 16 random
directions, the same expected norm) instead of fresh 512-d noise per patch, and features stay
float32. Every video's random draws come from its own seed (seed, video id), so any video can be
rendered again alone (the rerank reads its candidates one by one) and identically; videos are
rendered in blocks of --chunk. The collection is structured (many videos share a scene, an action
and a subject; 100k videos of 16 x 13 x 12 combinations), so the exhaustive top 10 of a query
holds near-ties and the coarse level must rank the videos that describe the query well for the
two-stage mode to keep them.

Queries are the world's captions of videos spread over the collection (`World.text_features`:
words and sentence of the caption of a video, so each query has a "source" video; the exhaustive
hit rate of the source shows that the ranking is meaningful).

The model: zero-shot heads (`evaluate.zero_shot_model`: e_v = mean frame feature, uniform weights,
the frozen-CLIP baseline) unless --checkpoint gives trained ones. Trained heads change how well
the coarse level predicts the full score, so the share kept depends on them.

What is timed (generation, standing in for reading the raw cache, is excluded and reported):

- index build: `build_chunks` over the generated videos (encode, float16, write the chunk folders),
  per video; against it, varcmp-eval's own encoding (`encode_videos` in its batches of 16, all
  levels) of a sample, in the same run; the index size per video;
- exhaustive, one query alone: `retrieval.scoring.top_k(..., candidates=None)` over the index
  (what `varcmp-search --mode exhaustive` runs), split into reading the index and scoring;
- two-stage, one query alone: the faiss first stage over the index's vectors for the default pool
  K (and for K = DEFAULT_CANDIDATES where the default is larger), then `top_k` over those K, median
  over the queries; kept: the share of the exhaustive top 10 (all queries in one exhaustive pass)
  that the two-stage top 10 holds.

The index is warm: written by the build just before, so the operating system holds its files
(as it does for `varcmp serve`, which opens it once).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from varcmp.cache_schema import CacheSpec  # noqa: E402
from varcmp.cache.reader import VideoData
from varcmp.evaluate import zero_shot_model  # noqa: E402
from varcmp.retrieval.index import (CHUNK_VIDEOS, DEFAULT_CANDIDATES, VideoIndex, _write_meta,  # noqa: E402
                                    build_chunks, default_pool)
from varcmp.retrieval.scoring import ENCODE_BATCH, encode_queries, encode_videos, top_k  # noqa: E402
from varcmp.synth.world import AMP, SynthParams, World  # noqa: E402

NOISE_RANK = 24


class WorldVideos:
    """The videos of a synth World as a `retrieval.scoring.top_k` source: features rendered on demand."""

    def __init__(self, world: World):
        p = world.params
        self.world, self.p, self.n = world, p, p.videos
        self.C, self.N, self.P = p.dim, p.frames, p.patches
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        self.subj, self.verb, self.scene_v = t(world.visual["subject"]), t(world.visual["verb"]), t(world.visual["scene"])
        self.off = t(AMP["offset"] * world.offset_img)
        self._buf = None  # patch output, reused: read()'s patch array is valid until the next read()
        n = self.n
        self.scene = np.zeros(n, np.int64)
        self.bg = np.zeros((n, 2), np.int64)        # background event: subject, verb
        self.an = np.full((n, 4), -1, np.int64)      # anomaly: subject, verb, start, stop (-1: none)
        self.by = np.zeros((n, p.bystanders), np.int64)
        for i, v in enumerate(world.videos):
            self.scene[i] = v.scene
            b = v.events[0]
            self.bg[i] = (b.subject, b.verb)
            if len(v.events) > 1:
                a = v.events[1]
                self.an[i] = (a.subject, a.verb, a.start, a.stop)
            self.by[i] = v.bystanders

    def _draws(self, i: int):
        """Every random draw of video i, from its own seed: camera, frame noise, textures, patch
        noise coefficients, noise directions, object positions."""
        g = torch.Generator().manual_seed(int(self.p.seed) * 1_000_003 + int(i))
        N, P, C, R = self.N, self.P, self.C, NOISE_RANK
        sizes = (C, N * C, P * R, N * P * R, R * C)
        z = torch.randn(sum(sizes), generator=g).split(sizes)
        where = torch.rand(N, P, generator=g).argsort(dim=1)
        return (torch.nn.functional.normalize(z[0], dim=0), z[1].view(N, C), z[2].view(P, R), z[3].view(N, P, R),
                z[4].view(R, C), where)

    def _objects(self, pos):
        """Per video: object vectors' concept ids (subject/verb table, index), their slot in the
        position table (World's layout: event e part x at slot 2e + x, then bystanders) and frames."""
        N, nb = self.N, self.p.bystanders
        O = 4 + nb
        kind = np.zeros((len(pos), O), np.int64)      # 0 subject, 1 verb
        cid = np.zeros((len(pos), O), np.int64)
        slot = np.zeros((len(pos), O), np.int64)
        s0 = np.zeros((len(pos), O), np.int64)
        s1 = np.zeros((len(pos), O), np.int64)        # s1 = s0: unused object
        for b, i in enumerate(pos):
            objs = [(0, self.bg[i, 0], 0, N), (1, self.bg[i, 1], 0, N)]
            if self.an[i, 0] >= 0:
                objs += [(0, self.an[i, 0], self.an[i, 2], self.an[i, 3]), (1, self.an[i, 1], self.an[i, 2], self.an[i, 3])]
            objs += [(0, s, 0, N) for s in self.by[i]]
            for o, (kd, c, a, z) in enumerate(objs):
                kind[b, o], cid[b, o], slot[b, o], s0[b, o], s1[b, o] = kd, c, o, a, z
        return kind, cid, slot, s0, s1

    def _patches(self, pos, draws, cam, scene_v) -> np.ndarray:
        """Unit patch features [B, N, P, C] as one product coef @ atoms per video, normalised through
        the atoms' Gram matrix before the product (the big tensor is written once). Atoms: the
        background (offset + scene + camera), NOISE_RANK random directions (of expected norm 1 for
        a standard normal coefficient vector) and one object vector per event part or bystander.
        A background patch is background + its position's texture (amplitude patch_texture,
        fixed over frames) + noise (patch_noise, fresh per patch), both drawn in the span of the
        random directions; an object patch is its object vector (offset + concept + a little scene,
        as World.video_features) + noise."""
        B, N, P, C, k, R = len(pos), self.N, self.P, self.C, self.p.object_patches, NOISE_RANK
        kind, cid, slot, s0, s1 = self._objects(pos)
        O = kind.shape[1]
        o0 = 1 + R
        atoms = torch.empty(B, o0 + O, C)
        atoms[:, 0] = self.off + AMP["patch_scene"] * scene_v + AMP["patch_camera"] * cam
        atoms[:, 1:o0] = torch.stack([d[4] for d in draws]) / np.sqrt(R * C)
        c = torch.from_numpy(cid)
        concept = torch.where(torch.from_numpy(kind == 0)[..., None], self.subj[c.clamp(max=len(self.subj) - 1)],
                              self.verb[c.clamp(max=len(self.verb) - 1)])
        atoms[:, o0:] = self.off + AMP["object"] * concept + AMP["object_scene"] * scene_v[:, None]
        noise = torch.stack([d[3] for d in draws]) * (AMP["patch_noise"] * self.p.noise)            # [B, N, P, R]
        coef = torch.zeros(B, N, P, o0 + O)
        coef[..., 0] = 1.0
        coef[..., 1:o0] = noise + AMP["patch_texture"] * torch.stack([d[2] for d in draws])[:, None]
        # object patches: (video, frame, object, j) -> patch column where[video][frame, slot * k + j]
        where = torch.stack([d[5] for d in draws])                                                  # [B, N, P]
        n_idx = np.arange(N)
        active = (n_idx[None, :, None] >= s0[:, None, :]) & (n_idx[None, :, None] < s1[:, None, :])  # [B, N, O]
        bb, nn, oo = (torch.from_numpy(x) for x in np.nonzero(active))
        bb, nn, oo = (x.repeat_interleave(k) for x in (bb, nn, oo))
        jj = torch.arange(k).repeat(len(bb) // k)
        cc = where[bb, nn, torch.from_numpy(slot)[bb, oo] * k + jj]
        coef[bb, nn, cc, 0] = 0.0                                     # no background
        coef[bb, nn, cc, 1:o0] = noise[bb, nn, cc]                    # noise, no texture
        coef[bb, nn, cc, o0 + oo] = 1.0
        coef = coef.view(B, N * P, o0 + O)
        gram = torch.bmm(atoms, atoms.transpose(1, 2))
        norm = (torch.bmm(coef, gram) * coef).sum(-1).clamp_min(1e-12).sqrt()  # |coef @ atoms| per patch
        if self._buf is None or len(self._buf) < B:
            self._buf = torch.empty(B, N * P, C)      # reused: fresh pages cost more than the product
        out = self._buf[:B]
        torch.bmm(coef / norm[..., None], atoms, out=out)
        return out.view(B, N, P, C).numpy()

    def read(self, pos, patches: bool) -> VideoData:
        pos = np.asarray(pos, np.int64)
        B, N, C = len(pos), self.N, self.C
        draws = [self._draws(i) for i in pos]
        cam = torch.stack([d[0] for d in draws])
        sc = torch.from_numpy(self.scene[pos])
        scene_v = self.scene_v[sc]
        sal = self.p.salience  # as in World.video_features
        frames = (self.off + AMP["frame_scene"] * scene_v + AMP["frame_camera"] * cam)[:, None, :].repeat(1, N, 1)
        bg = torch.from_numpy(self.bg[pos])
        frames += sal * (self.subj[bg[:, 0]] + self.verb[bg[:, 1]])[:, None, :]
        by = torch.from_numpy(self.by[pos])
        frames += sal * self.subj[by].sum(1)[:, None, :]
        an = self.an[pos]
        has = an[:, 0] >= 0
        if has.any():
            span = torch.from_numpy((np.arange(N)[None] >= an[:, 2:3]) & (np.arange(N)[None] < an[:, 3:4]) & has[:, None])
            vec = torch.zeros(B, C)
            vec[torch.from_numpy(has)] = self.subj[torch.from_numpy(an[has, 0])] + self.verb[torch.from_numpy(an[has, 1])]
            frames += sal * span[..., None].float() * vec[:, None, :]
        frames += torch.stack([d[1] for d in draws]) * (AMP["frame_noise"] * self.p.noise / np.sqrt(C))
        frames = torch.nn.functional.normalize(frames, dim=-1)
        patch = None
        if patches:
            patch = self._patches(pos, draws, cam, scene_v)
        return VideoData(index=pos, paths=np.array([self.world.videos[i].path for i in pos], dtype=object),
                         labels=np.array([self.world.videos[i].label for i in pos], np.int8),
                         categories=np.full(B, "", object), frame_feat=frames.numpy(),
                         frame_mask=np.ones((B, N), bool), frame_time=np.zeros((B, N), np.float32), patch_feat=patch)


def kept(exh: np.ndarray, two: np.ndarray) -> float:
    return len(set(exh.tolist()) & set(two.tolist())) / max(len(exh), 1)


def trained_heads(seed: int, videos: int, epochs: int, say):
    """Heads trained by varcmp-train on a small cache of the same world (same concept vectors:
    the world's feature space depends on the seed and the vocabulary, not on the number of videos)."""
    import tempfile

    from rich.console import Console

    from varcmp.model.checkpoint import load
    from varcmp.synth.world import make_synthetic_cache
    from varcmp.train import Runtime, TrainOptions, train

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="varcmp-bench-search-"))
    make_synthetic_cache(tmp / "world.zarr", videos=videos, seed=seed)
    quiet = Console(file=open(os.devnull, "w"))
    s = train(tmp / "world.zarr", tmp / "run", TrainOptions(epochs=epochs, seed=seed), Runtime(device="cpu"),
              console=quiet, quiet=True)
    model, _ = load(tmp / "run")
    best = s.history[s.best_epoch].get("val", {}) if s.best_epoch is not None else {}
    say(f"heads: trained by varcmp-train on a {videos}-video cache of the world (seed {seed}), {epochs} epochs, "
        f"best epoch {s.best_epoch} (validation {json.dumps(best)[:120]}), in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return model


class Timed:
    """A source whose reads (generation, standing in for reading the cache) are timed apart."""

    def __init__(self, src):
        self.src, self.n, self.seconds = src, src.n, 0.0

    def read(self, pos, patches: bool):
        t0 = time.perf_counter()
        out = self.src.read(pos, patches)
        self.seconds += time.perf_counter() - t0
        return out


def eval_encoding(model, src, n: int = 1024) -> float:
    """Seconds per video of varcmp-eval's encoding (`encode_videos` in its batches) of the first n
    videos, read through the same source in the same batches as the build reads them (generation
    excluded): the build's reference."""
    timed = Timed(src)
    t0 = time.perf_counter()
    for s0 in range(0, min(n, src.n), ENCODE_BATCH):
        data = timed.read(np.arange(s0, min(s0 + ENCODE_BATCH, n, src.n)), patches=True)
        encode_videos(model, data, "cpu", batch=ENCODE_BATCH)
    return (time.perf_counter() - t0 - timed.seconds) / min(n, src.n)


def build(model, src, folder: Path, say) -> tuple[VideoIndex, dict]:
    """The stored index of the generated collection, built by the code varcmp-index runs; its build
    time per video without generation, against evaluation's own encoding of a sample read the same
    way (timed before and after the build; their mean)."""
    before = eval_encoding(model, src)
    timed = Timed(src)
    t0 = time.perf_counter()
    build_chunks(model, timed, folder, "cpu", CHUNK_VIDEOS)
    meta = _write_meta(folder, "bench", model, SimpleNamespace(name="bench", n=src.n), None, CHUNK_VIDEOS, 0.0)
    build = (time.perf_counter() - t0 - timed.seconds) / src.n
    enc = (before + eval_encoding(model, src)) / 2
    idx = VideoIndex(folder, meta)
    out = {"build_ms_per_video": 1e3 * build, "eval_encode_ms_per_video": 1e3 * enc,
           "bytes_per_video": meta["bytes"] / src.n, "generation_s": timed.seconds}
    say(f"index build: {1e3 * build:.2f} ms/video without generation ({timed.seconds:.0f} s of generation excluded); "
        f"varcmp-eval's encoding {1e3 * enc:.2f} ms/video (before the build {1e3 * before:.2f}; ratio "
        f"{build / enc:.2f}); {meta['bytes'] / src.n / 1024:.1f} KiB/video, {meta['bytes'] / 2**30:.2f} GiB in all")
    return idx, out


def bench_size(V: int, n_queries: int, n_exh: int, model, seed: int, chunk: int, folder: Path, say) -> dict:
    t0 = time.perf_counter()
    world = World(SynthParams(videos=V, seed=seed, test_share=0.2))
    src = WorldVideos(world)
    qids = np.random.default_rng([seed, 7]).choice(V, n_queries, replace=False)
    words, mask, sentence = world.text_features(qids.tolist())
    q = encode_queries(model, {"word_feat": words, "word_mask": mask, "sentence": sentence}, "cpu")
    say(f"\n== {V:,} videos: world planned in {time.perf_counter() - t0:.1f} s; {n_queries} queries")
    idx, res = build(model, src, folder, say)

    # exhaustive over the index: all queries in one pass give the reference top 10; n_exh alone are timed
    ex = top_k(model, idx, q, 10, None, chunk, "cpu")
    lat, parts = [], []
    for i in range(n_exh):
        st: dict = {}
        t0 = time.perf_counter()
        top_k(model, idx, q.take(slice(i, i + 1)), 10, None, chunk, "cpu", stats=st)
        lat.append(time.perf_counter() - t0)
        parts.append((st["read"], st["score"]))
    read, score = np.median([p[0] for p in parts]), np.median([p[1] for p in parts])
    say(f"exhaustive over the index, one query: median {np.median(lat):.2f} s ({n_exh} queries): reading the index "
        f"{read:.2f} s, scoring {score:.2f} s")

    # two-stage over the index, each query alone, at the default pool (and at DEFAULT_CANDIDATES when smaller)
    idx.candidates(q.take(slice(0, 1)), 10)  # the faiss index is built on first use (as serve's warm-up does)
    res.update({"videos": V, "exhaustive_s": float(np.median(lat)), "exhaustive_read_s": float(read),
                "exhaustive_score_s": float(score), "queries": n_queries, "pools": []})
    for K in sorted({default_pool(V), min(V, DEFAULT_CANDIDATES)}, reverse=True):
        two, faiss_t, kept_q = [], [], []
        for i in range(n_queries):
            qi = q.take(slice(i, i + 1))
            t0 = time.perf_counter()
            cands = idx.candidates(qi, K)
            t1 = time.perf_counter()
            r = top_k(model, idx, qi, 10, cands, chunk, "cpu")
            two.append(time.perf_counter() - t0)
            faiss_t.append(t1 - t0)
            kept_q.append(kept(ex.pos[i], r.pos[0]))
        pool = {"pool": K, "two_stage_s": float(np.median(two)), "faiss_ms": 1e3 * float(np.median(faiss_t)),
                "kept": float(np.mean(kept_q)), "kept_min": float(np.min(kept_q))}
        res["pools"].append(pool)
        say(f"two-stage at K={K}: median {pool['two_stage_s'] * 1e3:.0f} ms ({n_queries} queries, faiss "
            f"{pool['faiss_ms']:.1f} ms), kept {100 * pool['kept']:.1f}% of the exhaustive top 10 (worst query "
            f"{100 * pool['kept_min']:.0f}%)")
    res.update(res["pools"][0])  # the default pool
    return res


def bench_serve(cache: Path, say) -> dict:
    """`varcmp serve` on a real cache (e.g. `varcmp-synth media.zarr -n 20 --media media/`: real mp4
    files, tiny CLIP): start-up (checkpoint, index, query encoder, warm-up) with the index to build
    and with it stored, then one /search over HTTP as a browser sends it, against the same search
    called in-process (the HTTP overhead), medians of 10."""
    import http.client
    import tempfile
    import threading
    from urllib.parse import quote

    import uvicorn

    from varcmp.cache.reader import open_cache
    from varcmp.model import checkpoint
    from varcmp.retrieval.index import index_folder
    from varcmp.retrieval.search import Searcher
    from varcmp.serve.app import create_app

    tmp = Path(tempfile.mkdtemp(prefix="varcmp-bench-serve-"))
    with open_cache(cache) as c:
        ckpt = checkpoint.save(tmp / "best.safetensors", zero_shot_model(c.spec, "text"),
                               {"cache": checkpoint.cache_fingerprint(c)})
        videos = sum(len(c.split(n).done_index()) for n in c.splits)
    starts = []
    for _ in range(2):  # the first start builds the index, the second finds it
        t0 = time.perf_counter()
        searcher = Searcher(cache, ckpt, device="cpu", progress=False)
        app = create_app(searcher)
        starts.append(time.perf_counter() - t0)
        if len(starts) == 1:
            searcher.close()
    port = 8765
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    q = "a man hits a dog with a stick"
    http_t, direct_t = [], []
    for i in range(10):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(f"127.0.0.1:{port}")
        conn.request("GET", f"/search?q={quote(q)}&top=10")
        body = conn.getresponse().read()
        conn.close()
        http_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        searcher.search(searcher.text_features([q]), [q], 10)
        direct_t.append(time.perf_counter() - t0)
    srv.should_exit = True
    searcher.close()
    for meta in index_folder(cache).glob("*/index.json"):  # the indexes of this run's checkpoint only
        if json.loads(meta.read_text()).get("checkpoint") == str(ckpt):
            shutil.rmtree(meta.parent, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    res = {"videos": videos, "start_build_s": starts[0], "start_stored_s": starts[1],
           "search_http_ms": 1e3 * float(np.median(http_t)), "search_direct_ms": 1e3 * float(np.median(direct_t)),
           "response_bytes": len(body)}
    say(f"\n== varcmp serve on {cache} ({videos} videos): start-up {starts[0]:.1f} s building the index, "
        f"{starts[1]:.1f} s with it stored; one /search over HTTP: median {res['search_http_ms']:.0f} ms "
        f"({len(body) / 1024:.0f} KiB of JSON), the same search in-process {res['search_direct_ms']:.0f} ms "
        f"(ratio {res['search_http_ms'] / res['search_direct_ms']:.2f})")
    return res


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--sizes", default="10000,100000", help="Collection sizes, comma-separated ('': none).")
@click.option("--queries", "n_queries", default=16, help="Two-stage queries per size, each timed alone.")
@click.option("--exhaustive-queries", "n_exh", default=3, help="Of those, how many are timed alone exhaustively.")
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Folder for the generated indexes (kept); default: a temporary folder, deleted.")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="Heads to use (production dims) instead of training them first.")
@click.option("--zero-shot", is_flag=True, help="Untrained heads (the frozen-CLIP baseline) instead of training.")
@click.option("--train-videos", default=400, help="Videos of the world cache the heads are trained on.")
@click.option("--epochs", default=8, help="Training epochs of the heads.")
@click.option("--serve", "serve_cache", type=click.Path(exists=True, path_type=Path), default=None,
              help="Also time varcmp serve on this real cache (one whose CLIP loads: varcmp-synth --media).")
@click.option("--seed", default=0)
@click.option("--chunk", default=32, help="Videos per page (as varcmp-search --chunk).")
def main(sizes, n_queries, n_exh, keep, checkpoint, zero_shot, train_videos, epochs, serve_cache, seed, chunk):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    say = lambda s: console.print(s, highlight=False, soft_wrap=True)  # noqa: E731
    sizes = [int(s) for s in sizes.split(",") if s.strip()]
    t_all = time.perf_counter()
    say(f"varcmp-search benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads")
    if checkpoint is not None:
        from varcmp.model.checkpoint import load

        model, _ = load(checkpoint)
        say(f"heads: {checkpoint}")
    elif zero_shot:
        model = zero_shot_model(CacheSpec(), "text")
        say("heads: zero-shot (untrained VarCMP: the frozen-CLIP baseline)")
    else:
        model = trained_heads(seed, train_videos, epochs, say)
    model.eval()
    say(f"levels {'+'.join(model.cfg.levels)}; first stage: {model.linear_levels()}")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="varcmp-bench-index-")) if keep is None else keep
    results = []
    try:
        for V in sizes:
            results.append(bench_size(V, n_queries, min(n_exh, n_queries), model, seed, chunk, root / f"{V}", say))
            if keep is None:
                shutil.rmtree(root / f"{V}", ignore_errors=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    t = Table(title="varcmp-search on the stored index, one query, warm (generation excluded)", header_style="bold")
    for col in ("videos", "two-stage (K)", "kept top-10", "exhaustive", "of it reading", "build /video",
                "eval encode /video", "index /video"):
        t.add_column(col, justify="right")
    for r in results:
        for p in r["pools"]:
            t.add_row(f"{r['videos']:,}", f"{p['two_stage_s'] * 1e3:.0f} ms ({p['pool']:,})",
                      f"{100 * p['kept']:.1f}% (min {100 * p['kept_min']:.0f}%)", f"{r['exhaustive_s']:.2f} s",
                      f"{r['exhaustive_read_s']:.2f} s", f"{r['build_ms_per_video']:.2f} ms",
                      f"{r['eval_encode_ms_per_video']:.2f} ms", f"{r['bytes_per_video'] / 1024:.1f} KiB")
    if results:
        console.print(t)
    if serve_cache is not None:
        results.append(bench_serve(serve_cache, say))
    say(json.dumps(results))
    say(f"whole run {(time.perf_counter() - t_all) / 60:.1f} min")


if __name__ == "__main__":
    main()
