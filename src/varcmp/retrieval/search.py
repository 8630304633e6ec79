"""`varcmp-search`'s engine: find the video, and the moment in it, by text or by sound.

The queries are encoded by the frozen encoder the cache was extracted with (its recorded config
and weights hashes are checked): text with CLIP exactly as captions are extracted, audio with CLAP
over the extraction's windows of the clip (`media.audio_windows`). The videos come encoded from
the split's stored index (`retrieval.index`, built on first use). Each split is then ranked by the
scoring engine (`retrieval.scoring.top_k`), page by page, in one of three modes:

- **exhaustive**: every video is scored with the full score;
- **two-stage**: a faiss index of one vector per video picks `--candidates` videos per query,
  which the full score reranks through the same code (with K >= the split's size both modes give
  identical hits and scores);
- **auto** (default): two-stage for a split of more than `AUTO_TWO_STAGE` videos, else exhaustive.

Each hit is described by its per-level scores, its predicted anomaly and the time span where it
matches best (`retrieval.spans`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..cli.markup import lit
from ..cli.progress import progress_bar
from ..errors import UserError
from ..model import QueryEmb
from ..model.queries import AUDIO, TEXT, check_segments
from .index import IndexInfo, VideoIndex, default_pool, open_index
from .scoring import Ranked, default_chunk, encode_queries, top_k
from .spans import SPAN_THRESHOLD, best_span, relevance
from .videos import CacheVideos

AUTO_TWO_STAGE = 5000       # --mode auto: two-stage for splits with more videos than this
MODES = ("auto", "exhaustive", "two-stage")
TEXT_BATCH = 256
AUDIO_BATCH = 32
ENCODER_NAMES = {"clip": "CLIP", "clap": "CLAP (extract with --audio)"}


# --------------------------------------------------------------------------
# Queries


def _encoder_record(cache, which: str) -> dict:
    rec = (cache.encoders or {}).get(which)
    if not rec:
        raise UserError(f"{cache.path}: no {ENCODER_NAMES[which]} encoder recorded in this cache; cannot encode "
                        "the query")
    return rec


def _check_encoder(loaded: dict, recorded: dict, flag: str, name: str, cache_path) -> None:
    for k in ("config_hash", "weights_hash"):
        if loaded.get(k) != recorded.get(k):
            what = "configuration" if k == "config_hash" else "weights"
            raise UserError(f"{flag} {name}: its {what} ({loaded.get(k)}) differ from the encoder {cache_path} was "
                            f"extracted with ({recorded.get('name')}, {recorded.get(k)}); pass the same model")


def check_texts(texts) -> list[str]:
    """The text queries as strings; UserError for an empty one."""
    texts = [str(t) for t in texts]
    for i, t in enumerate(texts):
        if not t.strip():
            raise UserError(f"empty query (query {i + 1}): give words to search for")
    return texts


def read_query_audio(path, segments: int) -> dict:
    """The extraction's windows of an audio clip (mono 48 kHz): `segments` windows centred on the
    centres of equal parts of the clip, clamp(duration / segments, 1 s, 10 s) long (the clip is
    its own 'video': offset 0, duration = its length). Raises UserError for a missing,
    unreadable, empty or silent file."""
    from ..media.audio import AUDIO_RATE, audio_windows, read_audio
    from ..media.video import MediaError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--audio {path}: no such file")
    try:
        got = read_audio(path, AUDIO_RATE)
    except MediaError as e:
        raise UserError(f"--audio {path}: {e}") from None
    if got is None:
        raise UserError(f"--audio {path}: no audio track")
    samples, _ = got
    duration = len(samples) / AUDIO_RATE
    win = audio_windows(samples, 0.0, duration, segments, AUDIO_RATE)
    if not win.mask.any():
        raise UserError(f"--audio {path}: {win.note or 'no usable audio'} (nothing to search with)")
    return {"windows": win.windows, "mask": win.mask, "duration": duration}


class Searcher:
    """A cache, a checkpoint and the splits to search. Raises UserError, CacheError or
    CheckpointError (one-line messages) for what cannot be searched."""

    def __init__(self, cache, checkpoint, splits=None, device: str = "auto", chunk: int | None = None,
                 mode: str = "auto", candidates: int | None = None, console=None, progress: bool = True):
        from ..cache.reader import open_cache
        from ..evaluate import pick_device
        from ..model.checkpoint import check_compatible, load, read_meta, resolve

        if mode not in MODES:
            raise UserError(f"--mode {mode}: choose from {', '.join(MODES)}")
        if candidates is not None and candidates < 1:
            raise UserError(f"--candidates {candidates}: must be >= 1")
        if chunk is not None and chunk < 1:
            raise UserError(f"--chunk {chunk}: must be >= 1")
        self.device = pick_device(device)
        self.chunk = chunk or default_chunk(self.device)
        self.mode, self.candidates = mode, None if candidates is None else int(candidates)
        self.console, self.progress = console, progress
        self.cache = open_cache(cache)
        try:
            names = list(splits) if splits else self.cache.splits
            if not names:
                raise UserError(f"{self.cache.path}: holds no split to search")
            self.sources = [CacheVideos(self.cache.split(s)) for s in dict.fromkeys(names)]
            if sum(s.n for s in self.sources) == 0:
                raise UserError(f"{self.cache.path}: no extracted video in split(s) {', '.join(names)}")
            self.checkpoint = resolve(checkpoint)
            check_compatible(read_meta(self.checkpoint), self.cache, self.checkpoint)
            self.model, self.meta = load(self.checkpoint, self.device)
        except BaseException:
            self.cache.close()
            raise
        self.kind = self.model.kind
        self.index_info: dict[str, IndexInfo] = {}
        self._indexes: dict[str, VideoIndex] = {}
        self._encoders: dict[tuple, object] = {}
        self._reported: set[str] = set()

    def close(self) -> None:
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- queries -----------------------------------------------------------------------------
    def _encoder(self, cls, override: str | None):
        """The frozen encoder of the model's kind of query (CLIP or CLAP, `cls`), loaded from
        `override` or the name the cache recorded, refused unless its config and weights hash as
        the cache records."""
        from ..encoders.frozen import quiet_transformers

        if (cls, override) in self._encoders:  # loaded once per Searcher (a server's many queries)
            return self._encoders[cls, override]
        which = self.kind.encoder
        rec = _encoder_record(self.cache, which)
        name = override or rec.get("name")
        quiet_transformers()
        try:
            enc = cls(str(name), self.device)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        _check_encoder(enc.info(), rec, f"--{which}-model", name, self.cache.path)
        self._encoders[cls, override] = enc
        return enc

    def load_encoder(self, override: str | None = None):
        """The query encoder of the model's kind (CLIP or CLAP), loaded now (a server's start)."""
        from ..encoders.frozen import ClapEncoder, ClipEncoder

        return self._encoder(ClipEncoder if self.kind is TEXT else ClapEncoder, override)

    def text_features(self, texts: list[str], clip_model: str | None = None) -> dict[str, np.ndarray]:
        """CLIP word features, mask and sentence of `texts`, as extraction computes captions."""
        from ..encoders.frozen import ClipEncoder

        if self.kind is not TEXT:
            raise UserError(f"{self.checkpoint}: trained for audio queries; pass --audio FILE (or a --queries file "
                            "of audio paths), not text")
        texts = check_texts(texts)
        clip = self._encoder(ClipEncoder, clip_model)
        L = self.cache.spec.max_words
        long = [i + 1 for i in clip.cut(texts, L)]
        if long and self.console is not None:
            self.console.print(f"note: query {', '.join(map(str, long[:5]))}{' ...' if len(long) > 5 else ''} "
                               f"cut to {L} tokens (the cache's max_words, as captions were)", highlight=False)
        parts = [clip.encode_text(texts[s:s + TEXT_BATCH], L) for s in range(0, len(texts), TEXT_BATCH)]
        return {"word_feat": torch.cat([p[0] for p in parts]).numpy(),
                "word_mask": torch.cat([p[1] for p in parts]).numpy(),
                "sentence": torch.cat([p[2] for p in parts]).numpy()}

    def audio_features(self, files: list, clap_model: str | None = None) -> dict[str, np.ndarray]:
        """CLAP embeddings of the extraction's windows of each audio clip, and their mask."""
        from ..encoders.frozen import ClapEncoder, preprocess_audio
        from ..media.audio import AUDIO_RATE

        if self.kind is not AUDIO:
            raise UserError(f"{self.checkpoint}: trained for text queries; --audio needs a checkpoint trained with "
                            "--query audio")
        check_segments(self.model.cfg, self.cache, self.checkpoint)
        na = self.cache.spec.audio_segments or self.model.cfg.audio_segments
        clips = [read_query_audio(f, na) for f in files]        # bad files fail before any model loads
        clap = self._encoder(ClapEncoder, clap_model)
        feat = np.zeros((len(clips), na, clap.dim), np.float32)
        for i, c in enumerate(clips):
            feat[i, c["mask"]] = clap.encode_windows(preprocess_audio(clap.extractor, c["windows"], AUDIO_RATE),
                                                     AUDIO_BATCH)
        return {"seg_feat": feat, "seg_mask": np.stack([c["mask"] for c in clips])}

    # ---- search ------------------------------------------------------------------------------
    def pool(self, source: CacheVideos) -> int:
        """Candidates per query in a two-stage split: --candidates, else default_pool."""
        return min(self.candidates or default_pool(source.n), source.n)

    def split_mode(self, source: CacheVideos) -> str:
        if self.mode != "auto":
            return self.mode
        return "two-stage" if source.n > AUTO_TWO_STAGE else "exhaustive"

    def index(self, source: CacheVideos) -> VideoIndex:
        """The split's stored index, opened once (built, with a progress bar, when missing)."""
        if source.name not in self._indexes:
            show = self.console is not None and self.progress
            bar = (lambda: progress_bar(self.console, True, transient=False)) if show else None
            idx, info = open_index(self.model, self.cache, source, self.checkpoint, self.device, progress=bar)
            self._indexes[source.name], self.index_info[source.name] = idx, info
            if self.console is not None and (info.note or info.built):
                what = info.note or f"built the index of split {source.name} ({source.n} videos): {info.path}"
                self.console.print(f"note: {lit(what)}", highlight=False, soft_wrap=True)
        return self._indexes[source.name]

    @torch.inference_mode()
    def search(self, feats: dict[str, np.ndarray], labels: list[str], top: int = 10) -> dict:
        """Rank every searched split for each query (features as `text_features` / `audio_features`
        return them, or as the cache stores captions) and describe the best `top` hits. Returns
        the JSON-ready result (what --json writes)."""
        if top < 1:
            raise UserError(f"--top {top}: must be >= 1")
        n_q = len(next(iter(feats.values())))
        if n_q == 0 or n_q != len(labels):
            raise UserError("no query to search with" if n_q == 0 else f"{len(labels)} labels for {n_q} queries")
        q = encode_queries(self.model.eval(), feats, self.device)
        ranked, splits = zip(*(self._rank_split(src, q, top) for src in self.sources))
        hits = self._merge_splits(list(ranked), top)
        details = self._details(q, hits)
        queries = []
        for qi, label in enumerate(labels):  # a hit: (split index, position, ...), best first
            queries.append({"query": label, "hits": [{"rank": r + 1, **details[(qi, h[0], h[1])]}
                                                    for r, h in enumerate(hits[qi])]})
        return {**self._settings(top), "splits": list(splits), "span_rule": self._span_rule(), "queries": queries}

    def _rank_split(self, src: CacheVideos, q: QueryEmb, top: int) -> tuple[Ranked, dict]:
        """The best `top` videos of one split per query (exhaustive or two-stage), and the split's
        record in the result."""
        mode = self.split_mode(src)
        info = cands = idx = None
        if src.n:
            idx, info = self.index(src), self.index_info[src.name]
        if src.n and mode == "two-stage":
            cands = idx.candidates(q, self.pool(src))
        show = self.console is not None and self.progress and src.n > 8 * self.chunk
        with progress_bar(self.console, show) as prog:
            ranked = top_k(self.model, idx if src.n else src, q, top, cands, self.chunk, self.device, progress=prog)
        return ranked, {"name": src.name, "videos": int(src.n), "mode": mode,
                        "candidates": self.pool(src) if mode == "two-stage" else None,
                        "exact": mode == "exhaustive" or self.pool(src) >= src.n,
                        "root": src.root,
                        "index": None if info is None else self._index_record(src.name)}

    def _index_record(self, name: str) -> dict:
        """The split's index as a result records it: "built" in the first search after it was built
        only (a server's later answers, like a later varcmp-search, find it stored)."""
        rec = self.index_info[name].record()
        if name in self._reported:
            rec["built"] = False
        self._reported.add(name)
        return rec

    def _settings(self, top: int) -> dict:
        """The head of the result: what was searched, and with what."""
        from .. import __version__

        cfg = self.model.cfg
        return {"varcmp_version": __version__, "cache": str(self.cache.path), "checkpoint": str(self.checkpoint),
                "query_kind": self.kind.name, "levels": list(cfg.levels),
                "anomaly_weighting": bool(cfg.anomaly_weighting), "top": int(top), "device": str(self.device),
                "num_frames": int(self.cache.spec.num_frames)}

    def _span_rule(self) -> str:
        return (f"peak of r_j = (w_j / max w) * (s_j - min s) / (max s - min s), extended over consecutive "
                f"frames with r_j >= {SPAN_THRESHOLD} r_peak; s_j: {self.kind.frame_term}, w_j: the fine level's "
                "frame weights")

    def _merge_splits(self, per_split: list[Ranked], top: int) -> list[list[tuple]]:
        """Per query: [(split index, position, scores dict, video_score, anomalous)], best first
        (total descending, then split order, then position)."""
        out = []
        for qi in range(len(per_split[0].pos) if per_split else 0):
            cand = []
            for si, r in enumerate(per_split):
                for j in range(r.pos.shape[1]):
                    total = float(r.scores["total"][qi, j])
                    if not np.isfinite(total):
                        continue
                    cand.append((-total, si, int(r.pos[qi, j]), {k: float(v[qi, j]) for k, v in r.scores.items()},
                                 float(r.video_score[qi, j]), bool(r.anomalous[qi, j])))
            cand.sort(key=lambda c: c[:3])
            out.append([c[1:] for c in cand[:top]])
        return out

    def _details(self, q: QueryEmb, hits: list[list[tuple]]) -> dict:
        """The JSON record of every hit, by (query, split, position): span and frame curves."""
        by_split: dict[int, list] = {}
        for qi, hs in enumerate(hits):
            for h in hs:
                by_split.setdefault(h[0], []).append((qi, h))
        out = {}
        for si, items in by_split.items():
            src = self.sources[si]
            curves = self._frame_curves(src, q, [qi for qi, _ in items], [h[1] for _, h in items])
            for (qi, h), curve in zip(items, curves):
                out[(qi, si, h[1])] = self._hit_record(src, h, *curve)
        return out

    def _frame_curves(self, src: CacheVideos, q: QueryEmb, queries: list[int], positions: list[int]) -> list[tuple]:
        """Per (query, position) pair of one split: (frame similarity s_j, frame weight w_j, anomaly
        A_j, frame mask, frame times), each [N], from the split's index."""
        uniq = np.unique(positions)
        idx = self.index(src)
        v = idx.embed(uniq, self.device, patches=False)  # frames, weights and A do not depend on the patches
        times = idx.array("frame_time", uniq)
        row_of = {int(p): i for i, p in enumerate(uniq)}
        rows = [row_of[p] for p in positions]
        vv = v.take(torch.tensor(rows, device=v.video.device))
        sim = self.model.frame_terms(vv, q.take(torch.tensor(queries, device=q.glob.device))).cpu().numpy()
        w, A = (x.float().cpu().numpy() for x in (vv.frame_weights, vv.anomaly))
        m = vv.frame_mask.cpu().numpy()
        return [(sim[k], w[k], A[k], m[k], times[r]) for k, r in enumerate(rows)]

    def _hit_record(self, src: CacheVideos, hit: tuple, sim, w, A, valid, times) -> dict:
        """One hit as --json writes it: the video, its scores, its span and its frame curves."""
        _, pos, scores, vscore, anom = hit
        dur = float(src.durations[pos])
        span = best_span(sim, w, valid, times, dur)
        rel = relevance(sim, w, valid)
        return {"video": str(src.paths[pos]), "split": src.name, "row": int(src.rows[pos]),
                "score": scores["total"], "levels": {lv: scores[lv] for lv in self.model.cfg.levels},
                "anomaly": vscore, "predicted_anomalous": anom, "duration": dur,
                "span": dataclasses.asdict(span),
                "frames": {"index": [int(j) for j in np.flatnonzero(valid)],
                           "time": [float(x) for x in times[valid]],
                           "similarity": [float(x) for x in sim[valid]],
                           "weight": [float(x) for x in w[valid]],
                           "anomaly": [float(x) for x in A[valid]],
                           "relevance": [float(x) for x in rel[valid]]}}


def search_features(cache, checkpoint, feats: dict[str, np.ndarray], labels: list[str] | None = None,
                    top: int = 10, **kw) -> dict:
    """Search with query features given directly (e.g. a cached caption's word_feat, word_mask and
    sentence, or CLAP segment features seg_feat, seg_mask): no encoder is loaded."""
    n = len(next(iter(feats.values())))
    labels = labels if labels is not None else [f"query {i + 1}" for i in range(n)]
    kw.setdefault("progress", False)
    with Searcher(cache, checkpoint, **kw) as s:
        return s.search(feats, labels, top)


def run_search(cache, checkpoint, texts=(), audio=(), queries_file=None, splits=(), top: int = 10,
               clip_model=None, clap_model=None, mode: str = "auto", candidates: int | None = None,
               device: str = "auto", chunk: int | None = None, console=None, progress: bool = True) -> dict:
    """Everything `varcmp-search` does short of printing: encode the queries and search."""
    texts, audio = list(texts), [Path(a) for a in audio]
    given = [bool(texts), bool(audio), queries_file is not None]
    if sum(given) == 0:
        raise UserError("give a query: text QUERY..., --audio FILE... or --queries FILE")
    if sum(given) > 1:
        raise UserError("give text QUERY..., --audio FILE... or --queries FILE, not several of them")
    lines = None if queries_file is None else read_queries_file(Path(queries_file))
    check_texts(texts)  # before any model loads
    with Searcher(cache, checkpoint, splits, device, chunk, mode, candidates, console, progress) as s:
        if lines is not None and s.kind is AUDIO:  # audio paths, relative to the file's folder
            audio = [p if p.is_absolute() else Path(queries_file).parent / p for p in map(Path, lines)]
        elif lines is not None:
            texts = lines
        if texts:
            feats, labels = s.text_features(texts, clip_model), texts
        else:
            feats, labels = s.audio_features(audio, clap_model), [str(a) for a in audio]
        return s.search(feats, labels, top)


def read_queries_file(path: Path) -> list[str]:
    """The non-empty lines of a --queries file, stripped; UserError for an unreadable or empty file."""
    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--queries {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [x for x in lines if x]
    if not lines:
        raise UserError(f"--queries {path}: no queries in it (one per line)")
    return lines
