"""Tests of varcmp.search: ranking, spans, the two modes and their stored index, JSON and HTML
output, the `varcmp-search` command end to end (tiny CLIP on real mp4 files), and bad input."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SPEC, one_line_error, write_planted_cache

from varcmp.model import checkpoint
from varcmp.cache.reader import open_cache
from varcmp.retrieval.pairs import load_eval_data
from varcmp.evaluate import zero_shot_model
from varcmp.model import VarCMP
from varcmp.retrieval.index import INDEX_DIR, default_pool
from varcmp.retrieval.search import Searcher, search_features
from varcmp.retrieval.spans import best_span, relevance
from varcmp.cli.search import main
from varcmp.retrieval.report import print_results, render_html, write_json
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix

# ----------------------------------------------------------------------------- fixtures

HALF_TOL = 2e-3  # scores from the stored index (float16 e_v, frames, patches) against a float32 encoding


def save_checkpoint(model: VarCMP, cache_path: Path, out: Path) -> Path:
    with open_cache(cache_path) as c:
        return checkpoint.save(out, model, {"cache": checkpoint.cache_fingerprint(c)})


def perturbed(spec, query="text", seed=1) -> VarCMP:
    """Heads with other (random) weights than zero-shot: another checkpoint of the same cache."""
    model = zero_shot_model(spec, query)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A clean planted cache: each caption's sentence and words carry its video's concept, which an
    anomalous video shows only in its planted span of frames (and a few patches)."""
    return write_planted_cache(tmp_path_factory.mktemp("planted") / "planted.zarr", {"train": 40, "test": 24},
                               noise=0.1)


@pytest.fixture(scope="module")
def zero_ckpt(planted, tmp_path_factory) -> Path:
    """Untrained heads (uniform frame weights, no video predicted anomalous): the frozen-CLIP baseline."""
    return save_checkpoint(zero_shot_model(SPEC, "text"), planted, tmp_path_factory.mktemp("zs") / "best.safetensors")


def captions(cache_path: Path, split: str = "test") -> tuple[dict, list[str], np.ndarray]:
    with open_cache(cache_path) as c:
        t = c.split(split).load_text()
    feats = {"word_feat": t.word_feat, "word_mask": t.word_mask, "sentence": t.sentence}
    return feats, [str(x) for x in t.text], t.video_index


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- ranking and spans


def test_a_caption_ranks_its_video_first_and_its_span_covers_the_planted_frames(planted, zero_ckpt):
    feats, texts, video = captions(planted)
    r = search_features(planted, zero_ckpt, feats, texts, top=5, splits=["test"], device="cpu")
    assert r["query_kind"] == "text" and len(r["queries"]) == 24
    with open_cache(planted) as c:
        notes, paths = c.split("test").notes, c.split("test").paths
    covered = 0
    for qi, q in enumerate(r["queries"]):
        hits = q["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        top = hits[0]
        assert top["row"] == video[qi] and top["video"] == paths[video[qi]], (qi, top["video"])
        for h in hits:  # total = mean of the levels; anomaly is a probability; the span lies in the video
            assert h["score"] == pytest.approx(np.mean(list(h["levels"].values())), abs=1e-6)
            assert 0.0 <= h["anomaly"] <= 1.0 and 0.0 <= h["span"]["start"] < h["span"]["end"] <= h["duration"]
        m = re.search(r"planted span (\d+)-(\d+)", notes[video[qi]])
        if m:  # an anomalous video: its concept is only in frames a..b-1 (8 frames over 10 s)
            a, b = int(m.group(1)), int(m.group(2))
            span = top["span"]
            assert span["first_frame"] <= a and span["last_frame"] >= b - 1, (qi, span, notes[video[qi]])
            assert span["start"] <= a * 10 / 8 + 1e-6 and span["end"] >= b * 10 / 8 - 1e-6
            assert a <= span["peak_frame"] < b  # the best frame is a planted one
            covered += 1
    assert covered >= 12  # most planted videos are anomalous (have a span)


def test_span_definition_on_hand_made_frames():
    t = (np.arange(8) + 0.5) * 10 / 8  # uniform sampling of a 10 s video: frame j covers [1.25 j, 1.25 (j + 1)]
    mask = np.ones(8, bool)
    flat = np.full(8, 1 / 8)
    sim = np.array([0.1, 0.1, 0.2, 0.9, 0.8, 0.1, 0.6, 0.1])
    s = best_span(sim, flat, mask, t, 10.0)
    assert (s.first_frame, s.last_frame, s.peak_frame) == (3, 4, 3)  # frame 6 (0.6) is not contiguous
    assert (s.start, s.end) == pytest.approx((3.75, 6.25))
    # frame weights count: the anomaly-biased weights favour frame 6, which then wins
    w = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.02, 0.7, 0.02])
    s = best_span(sim, w, mask, t, 10.0)
    assert (s.first_frame, s.last_frame, s.peak_frame) == (6, 6, 6) and (s.start, s.end) == pytest.approx((7.5, 8.75))
    r = relevance(sim, w, mask)
    assert r.argmax() == 6 and r.max() == pytest.approx((0.6 - 0.1) / 0.8)
    # padded frames never belong to a span; the last valid frame ends at the video's end
    mask5 = np.arange(8) < 5
    t5 = np.where(mask5, (np.arange(8) + 0.5) * 4.0 / 5, 0)
    s = best_span(np.array([0, 0, 0, 0.5, 0.9, 1, 1, 1.0]), flat, mask5, t5, 4.0)
    assert (s.first_frame, s.last_frame) == (3, 4) and (s.start, s.end) == pytest.approx((2.4, 4.0))
    # a video with one valid frame: the whole video; equal similarities: the peak of the weights
    one = np.arange(8) < 1
    assert best_span(sim, flat, one, t, 3.0).__dict__ == {"start": 0.0, "end": 3.0, "first_frame": 0,
                                                         "last_frame": 0, "peak_frame": 0}
    s = best_span(np.full(8, 0.3), w, mask, t, 10.0)
    assert s.peak_frame == 6


def test_json_round_trip(planted, zero_ckpt, tmp_path):
    feats, texts, _ = captions(planted)
    r = search_features(planted, zero_ckpt, {k: v[:3] for k, v in feats.items()}, texts[:3], top=4, device="cpu")
    path = tmp_path / "out" / "hits.json"
    write_json(r, path)
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == r  # every value survives, floats exactly
    assert {s["name"] for s in back["splits"]} == {"train", "test"}  # every split by default
    assert [len(q["hits"]) for q in back["queries"]] == [4, 4, 4]
    h = back["queries"][0]["hits"][0]
    assert set(h) == {"rank", "video", "split", "row", "score", "levels", "anomaly", "predicted_anomalous",
                      "duration", "span", "frames"}
    assert set(h["levels"]) == {"coarse", "fine", "finer"} and len(h["frames"]["time"]) == len(h["frames"]["anomaly"])
    # what is printed from the JSON is what is printed from the result
    from rich.console import Console

    a, b = Console(file=io.StringIO(), width=160), Console(file=io.StringIO(), width=160)
    print_results(r, a)
    print_results(back, b)
    assert a.file.getvalue() == b.file.getvalue() and h["video"] in a.file.getvalue()
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temp file left
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # a plain file's permissions, not mkstemp's 0600


# ----------------------------------------------------------------------------- two stages and the index


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> Path:
    """Enough videos for several pages and query groups at --chunk 8."""
    return write_planted_cache(tmp_path_factory.mktemp("bigger") / "bigger.zarr", {"test": 70}, seed=3, noise=0.6)


def test_two_stage_equals_exhaustive_when_the_pool_covers_the_collection(bigger, tmp_path):
    ckpt = save_checkpoint(perturbed(SPEC, seed=2), bigger, tmp_path / "run" / "best.safetensors")
    feats, texts, _ = captions(bigger)
    feats = {k: v[:20] for k, v in feats.items()}
    kw = dict(top=10, device="cpu", chunk=8)
    ex = search_features(bigger, ckpt, feats, texts[:20], mode="exhaustive", **kw)
    for k in (70, 500):
        two = search_features(bigger, ckpt, feats, texts[:20], mode="two-stage", candidates=k, **kw)
        assert two["splits"][0]["mode"] == "two-stage" and two["splits"][0]["exact"] is True
        assert two["queries"] == ex["queries"]  # same hits, same scores to the last bit, same spans
    assert ex["splits"][0]["mode"] == "exhaustive" and ex["splits"][0]["index"]["stored"] is True

    # a small pool: the hits are the best of the first stage's top K, scored as exhaustive scores them
    K = 12
    two = search_features(bigger, ckpt, feats, texts[:20], mode="two-stage", candidates=K, **kw)
    assert two["splits"][0]["exact"] is False and two["splits"][0]["candidates"] == K
    model, _ = checkpoint.load(ckpt)
    with open_cache(bigger) as c:
        data = load_eval_data(c.split("test"), "text")
    v = encode_videos(model, data.videos, "cpu")
    q = encode_queries(model, feats, "cpu")
    sims = score_matrix(model, v, q)
    total = sims["total"]
    # the first stage is exactly coarse + the weighted-mean half of fine (fine minus its max half)
    assert model.linear_levels() == "coarse+fine-mean"
    first = model.video_vectors(v).numpy() @ model.query_vectors(q).numpy().T
    f = torch.nn.functional.normalize(v.frames.float(), dim=-1)
    s_max = torch.einsum("vnc,qc->vqn", f, torch.nn.functional.normalize(q.glob, dim=-1))
    s_max = s_max.masked_fill(~v.frame_mask[:, None, :], float("-inf")).amax(-1).numpy()
    assert np.allclose(first, sims["coarse"] + sims["fine"] - 0.5 * s_max, atol=1e-5)
    differs = 0
    for qi, (a, b) in enumerate(zip(ex["queries"], two["queries"])):
        pool = set(np.argsort(-first[:, qi], kind="stable")[:K].tolist())
        rows = [h["row"] for h in b["hits"]]
        assert set(rows) <= pool
        best = sorted(pool, key=lambda r: (-total[r, qi], r))[:10]
        # rank by rank the best score of the pool, up to the index's float16 rounding (near ties may swap)
        assert np.allclose(total[rows, qi], total[best, qi], atol=HALF_TOL), (total[rows, qi], total[best, qi])
        for h in b["hits"]:
            assert h["score"] == pytest.approx(float(total[h["row"], qi]), abs=HALF_TOL)  # the index's float16
        differs += [h["row"] for h in a["hits"]] != rows
    assert differs > 0  # K = 12 of 70 does lose hits here: the test above is not vacuous
    assert default_pool(70) == 70 and default_pool(10_000) == 1000 and default_pool(1_000_000) == 20_000


def index_files(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / INDEX_DIR).glob("*/index.json"))


def test_index_is_stored_reused_and_rebuilt_for_other_weights(bigger, tmp_path):
    work = tmp_path / "c.zarr"
    shutil.copytree(bigger, work, ignore=shutil.ignore_patterns(INDEX_DIR))  # other tests' indexes stay behind
    a = save_checkpoint(perturbed(SPEC, seed=4), work, tmp_path / "a" / "best.safetensors")
    b = save_checkpoint(perturbed(SPEC, seed=5), work, tmp_path / "b" / "best.safetensors")
    feats, texts, _ = captions(work)
    feats = {k: v[:3] for k, v in feats.items()}
    kw = dict(top=5, device="cpu", mode="two-stage", candidates=20)

    first = search_features(work, a, feats, texts[:3], **kw)
    ix = first["splits"][0]["index"]
    assert ix["built"] is True and ix["stored"] is True and Path(ix["path"]).is_dir()
    assert index_files(work) == [Path(ix["path"])] and Path(ix["path"]).parent == work / INDEX_DIR
    stamp = (Path(ix["path"]) / "index.json").stat().st_mtime_ns
    again = search_features(work, a, feats, texts[:3], **kw)
    assert again["splits"][0]["index"]["built"] is False and again["splits"][0]["index"]["path"] == ix["path"]
    assert (Path(ix["path"]) / "index.json").stat().st_mtime_ns == stamp and again["queries"] == first["queries"]
    # the cache with its index is still a valid cache, and the index survives reading it
    with open_cache(work) as c:
        assert c.splits == ["test"]

    other = search_features(work, b, feats, texts[:3], **kw)
    ob = other["splits"][0]["index"]
    assert ob["built"] is True and ob["key"] != ix["key"] and ob["path"] != ix["path"]
    assert len(index_files(work)) == 2 and other["queries"] != first["queries"]
    # retrained in place (same checkpoint path, other weights): a new index, the stale one deleted
    save_checkpoint(perturbed(SPEC, seed=6), work, a)
    re_a = search_features(work, a, feats, texts[:3], **kw)
    assert re_a["splits"][0]["index"]["built"] is True and not Path(ix["path"]).exists()
    assert len(index_files(work)) == 2
    # an index that does not hold these embeddings is not trusted: rebuilt
    for f in (Path(ob["path"]) / "chunk-00000").glob("*.npy"):
        f.write_bytes((Path(re_a["splits"][0]["index"]["path"]) / "chunk-00000" / f.name).read_bytes())
    again_b = search_features(work, b, feats, texts[:3], **kw)
    assert again_b["splits"][0]["index"]["built"] is True and again_b["queries"] == other["queries"]


def test_auto_mode_and_progress(bigger, tmp_path, monkeypatch):
    import varcmp.retrieval.search as S

    ckpt = save_checkpoint(perturbed(SPEC, seed=7), bigger, tmp_path / "r" / "best.safetensors")
    feats, texts, _ = captions(bigger)
    one = {k: v[:1] for k, v in feats.items()}
    from rich.console import Console

    def searched(**kw):
        out = io.StringIO()
        with Searcher(bigger, ckpt, device="cpu", console=Console(file=out, width=100, force_terminal=True),
                      **kw) as s:
            return s.search(one, texts[:1], top=3), out.getvalue()

    r, said = searched()
    assert r["splits"][0]["mode"] == "exhaustive"
    assert "indexing test" in said and "built the index of split test" in said  # the first search builds it
    monkeypatch.setattr(S, "AUTO_TWO_STAGE", 50)
    r, said = searched(candidates=30)
    assert r["splits"][0]["mode"] == "two-stage" and r["splits"][0]["candidates"] == 30
    assert r["splits"][0]["index"]["built"] is False and "index" not in said  # then it is only opened


# ----------------------------------------------------------------------------- HTML


class StrictHTML(HTMLParser):
    """Well-formedness beyond html.parser's leniency: every non-void element closed, in order."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.doctype, self.imgs, self.ids, self.texts = [], None, [], [], []
        self.hits: list[str] = []
        self._h3 = False

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("href", "src"):
            assert not (a.get(key) or "").startswith(("http:", "https:", "//", "file:")), a
        if tag == "img":
            self.imgs.append(a)
        if tag == "h3":
            self._h3 = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        assert tag in self.VOID, f"self-closed <{tag}/>"
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        assert tag not in self.VOID, f"</{tag}>"
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "h3":
            self._h3 = False

    def handle_data(self, data):
        self.texts.append(data)
        if self._h3:
            self.hits.append(data)


def check_html(text: str) -> StrictHTML:
    p = StrictHTML()
    p.feed(text)
    p.close()
    assert p.doctype == "DOCTYPE html" and not p.stack and len(p.ids) == len(set(p.ids))
    for img in p.imgs:
        src = img["src"]
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) and img.get("alt")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n" if "png" in src[:20] else b"\xff\xd8\xff")
    return p


def test_html_without_reachable_videos_says_so(planted, zero_ckpt, tmp_path):
    feats, texts, _ = captions(planted)
    r = search_features(planted, zero_ckpt, {k: v[:2] for k, v in feats.items()}, texts[:2], top=3, device="cpu")
    text = render_html(r)
    p = check_html(text)
    hits = [h for q in r["queries"] for h in q["hits"]]
    assert len(p.hits) == len(hits) == 6
    assert [x.split(" ", 1)[1] for x in p.hits] == [h["video"] for h in hits]
    plots = [i for i in p.imgs if i["src"].startswith("data:image/png")]
    assert len(plots) == 6 and len(p.imgs) == 6  # a plot per hit; no thumbnails without the videos
    assert text.count("the split records no video root: no thumbnails") == 6


# ----------------------------------------------------------------------------- end to end


def test_cli_end_to_end_with_real_text(extracted, video_root, tmp_path):
    cache, ckpt = extracted
    js, page = tmp_path / "hits.json", tmp_path / "report.html"
    r = run(cache, "--checkpoint", ckpt.parent, "a man hits a dog with a stick", "car on fire", "--top", 3,
            "--json", js, "--html", page, "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    with open_cache(cache) as c:
        s = c.split("test")
        done = {str(s.paths[i]): float(s.durations[i]) for i in s.done_index()}
    assert res["query_kind"] == "text" and res["splits"][0]["mode"] == "exhaustive"
    assert res["splits"][0]["root"] == str(video_root.resolve())
    assert [q["query"] for q in res["queries"]] == ["a man hits a dog with a stick", "car on fire"]
    for q in res["queries"]:
        assert [h["rank"] for h in q["hits"]] == [1, 2, 3] and len({h["video"] for h in q["hits"]}) == 3
        for h in q["hits"]:
            assert h["video"] in done and h["duration"] == pytest.approx(done[h["video"]])
            assert 0.0 <= h["span"]["start"] < h["span"]["end"] <= h["duration"] + 1e-9
            assert f"{h['score']:.4f}" in r.output and h["video"][:20] in r.output
    assert "1. a man hits a dog with a stick" in r.output and "2. car on fire" in r.output
    # the HTML report: every hit, thumbnails decoded from the original videos, a plot each
    p = check_html(page.read_text(encoding="utf-8"))
    assert len(p.hits) == 6
    jpeg = [i for i in p.imgs if i["src"].startswith("data:image/jpeg")]
    png = [i for i in p.imgs if i["src"].startswith("data:image/png")]
    assert len(png) == 6 and len(jpeg) >= 6 and "no thumbnails" not in page.read_text(encoding="utf-8")

    # --queries FILE: the same queries batched give the same hits
    qf = tmp_path / "queries.txt"
    qf.write_text("a man hits a dog with a stick\n\ncar on fire\n")
    r2 = run(cache, "--checkpoint", ckpt, "--queries", qf, "--top", 3, "--json", tmp_path / "b.json",
             "--device", "cpu")
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "b.json").read_text())["queries"] == res["queries"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); the "
                                             "report's validity is still checked by check_html")
def test_html_report_renders_in_headless_chromium(extracted, tmp_path):
    """A real browser draws the page: the screenshot holds the plot's similarity curve (#1565c0)
    and the span outline of the thumbnails (#f4b400), which only decoded embedded images and the
    stylesheet can put there."""
    import subprocess

    from PIL import Image

    cache, ckpt = extracted
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    r = run(cache, "--checkpoint", ckpt, "a dog", "--top", 1, "--html", page, "--device", "cpu")
    assert r.exit_code == 0, r.output
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,900", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)

    def share(rgb, tol=40):
        return float((np.abs(px - np.array(rgb)).sum(1) < tol).mean())

    assert share((0x15, 0x65, 0xC0)) > 1e-4   # the similarity curve of the embedded PNG plot
    assert share((0xF4, 0xB4, 0x00)) > 1e-4   # the CSS outline of thumbnails inside the span
    assert share((255, 255, 255)) > 0.3        # and a page, not a blank or an error screen


def test_cli_refuses_another_clip_and_reports_unreachable_videos(extracted, tmp_path):
    from varcmp.encoders.tiny import make_tiny_clip

    cache, ckpt = extracted
    other = make_tiny_clip(tmp_path / "other-clip", seed=1)
    one_line_error(run(cache, "--checkpoint", ckpt, "a dog", "--clip-model", other, "--device", "cpu"),
                   "--clip-model", "weights", "differ")
    one_line_error(run(cache, "--checkpoint", ckpt, "a dog", "--clip-model", tmp_path / "nowhere"),
                   "cannot load CLIP")
    # the videos moved away: the report says so instead of thumbnails
    import zarr

    moved = tmp_path / "moved.zarr"
    shutil.copytree(cache, moved)
    g = zarr.open_group(str(moved), mode="r+", use_consolidated=False)
    g["test"].attrs["varcmp_split"] = {**dict(g["test"].attrs["varcmp_split"]), "root": str(tmp_path / "gone")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(moved))
    page = tmp_path / "r.html"
    r = run(moved, "--checkpoint", ckpt, "a dog", "--top", 2, "--html", page)
    assert r.exit_code == 0, r.output
    text = page.read_text(encoding="utf-8")
    check_html(text)
    assert text.count("original video not reachable") == 2


def test_cli_end_to_end_with_real_audio(video_root, tiny_clip, tiny_clap, tmp_path):
    """An audio cache extracted with the tiny CLAP; a video's own track as the query is encoded in
    the extraction's windows: its segment features are those stored for that video."""
    from varcmp.extract import Options, run as extract

    cache = tmp_path / "xd.zarr"
    s = extract(Options(root=video_root, out=cache, split="test", clip_model=str(tiny_clip),
                        clap_model=str(tiny_clap), audio="video", workers=0, frames=8, audio_segments=6))
    assert s.done == 4
    with open_cache(cache) as c:
        ckpt = save_checkpoint(zero_shot_model(c.spec, "audio"), cache, tmp_path / "run" / "best.safetensors")
        v = c.split("test").load_videos()
    clip = video_root / "Abuse/Abuse001_x264.mp4"  # 6 s of video and 6 s of audio
    js = tmp_path / "a.json"
    r = run(cache, "--checkpoint", ckpt, "--audio", clip, "--top", 3, "--json", js)
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["query_kind"] == "audio" and res["queries"][0]["query"] == str(clip)
    hits = res["queries"][0]["hits"]
    assert len(hits) == 3 and all(0 <= h["span"]["start"] < h["span"]["end"] <= h["duration"] + 1e-9 for h in hits)
    with Searcher(cache, ckpt, device="cpu", progress=False) as srch:
        f = srch.audio_features([clip])
    i = list(v.paths).index("Abuse/Abuse001_x264.mp4")
    assert f["seg_mask"][0].tolist() == v.audio_mask[i].tolist() == [True] * 6
    a, b = f["seg_feat"][0], v.audio_feat[i].astype(np.float32)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99  # the same windows (the clip's AAC padding shifts them by a few ms)
    one_line_error(run(cache, "--checkpoint", ckpt, "--audio", clip, "--clap-model", tiny_clip), "cannot load CLAP")


# ----------------------------------------------------------------------------- bad input


def write_silent(path: Path, seconds: float = 2.0) -> Path:
    import av

    from varcmp.media.audio import audio_stream, mux_audio

    with av.open(str(path), "w") as c:
        mux_audio(c, audio_stream(c, 48_000), np.zeros(int(48_000 * seconds), np.float32), 48_000)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def listed_silence(folder: Path) -> Path:
    """A --queries file naming a silent clip beside it (relative path)."""
    write_silent(folder / "silent.m4a")
    return write_text(folder / "audio.txt", "silent.m4a\n")


@pytest.fixture(scope="module")
def audio_ckpt(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audio") / "best.safetensors"
    return save_checkpoint(zero_shot_model(SPEC, "audio"), planted, out)


NOT_AUDIO = "not audio at all\n" * 20


@pytest.mark.parametrize("args, needle", [
    (lambda p, z, a, t: (p, "--checkpoint", z, ""), "empty query"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "a dog", "   "), "empty query (query 2)"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "--queries", write_text(t / "empty.txt", "\n  \n")), "no queries"),
    (lambda p, z, a, t: (p, "--checkpoint", z), "give a query"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "a dog", "--audio", write_text(t / "empty.txt", "\n  \n")),
     "not several"),
    (lambda p, z, a, t: (p, "a dog"), "--checkpoint"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "a dog", "--mode", "fast"), "--mode"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "a dog", "--top", 0), "--top"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "a dog", "--split", "val"), "no split 'val'"),
    (lambda p, z, a, t: (t / "none.zarr", "--checkpoint", z, "a dog"), "no such cache"),
    (lambda p, z, a, t: (p, "--checkpoint", t / "none", "a dog"), "no such checkpoint"),
    # a query of the wrong kind for the checkpoint
    (lambda p, z, a, t: (p, "--checkpoint", a, "a dog"), "trained for audio queries"),
    (lambda p, z, a, t: (p, "--checkpoint", z, "--audio", write_text(t / "notes.wav", NOT_AUDIO)),
     "trained for text queries"),
    # missing and silent audio (audio paths in --queries are relative to the file's folder)
    (lambda p, z, a, t: (p, "--checkpoint", a, "--audio", t / "nope.wav"), "no such file"),
    (lambda p, z, a, t: (p, "--checkpoint", a, "--audio", write_silent(t / "silent.m4a")), "silent audio track"),
    (lambda p, z, a, t: (p, "--checkpoint", a, "--queries", listed_silence(t)), "silent audio track"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_is_one_line_with_exit_code_2(planted, zero_ckpt, audio_ckpt, tmp_path, args, needle):
    """args(planted cache, text checkpoint, audio checkpoint, tmp_path): the command line (writing
    the files it names); needle: in its one error line."""
    one_line_error(run(*args(planted, zero_ckpt, audio_ckpt, tmp_path)), needle)


def test_unreadable_audio_and_a_foreign_checkpoint_are_one_line(planted, audio_ckpt, tmp_path):
    notes = write_text(tmp_path / "notes.wav", NOT_AUDIO)
    one_line_error(run(planted, "--checkpoint", audio_ckpt, "--audio", notes), str(notes), "not a readable media file")
    # a checkpoint from a cache of other encoders
    other = tmp_path / "other.zarr"
    shutil.copytree(planted, other)
    root = json.loads((other / "zarr.json").read_text())
    root["attributes"]["varcmp"]["encoders"]["clip"]["weights_hash"] = "sha256:retrained"
    (other / "zarr.json").write_text(json.dumps(root))
    foreign = save_checkpoint(zero_shot_model(SPEC, "text"), other, tmp_path / "foreign" / "best.safetensors")
    one_line_error(run(planted, "--checkpoint", foreign, "a dog"), "other encoders")


def test_damaged_features_are_named_not_searched(planted, zero_ckpt, tmp_path):
    """An infinity in one video's patch features: the search stops with one line naming that video
    (the CLI prints it as 'error: ...', exit code 2, as every CacheError)."""
    import zarr

    from varcmp.cache_schema import DamagedCacheError

    bad = tmp_path / "bad.zarr"
    shutil.copytree(planted, bad, ignore=shutil.ignore_patterns(INDEX_DIR))
    with open_cache(bad) as c:
        path = c.split("test").paths[5]
    zarr.open_group(str(bad), mode="r+", use_consolidated=False)["test/videos/patch_feat"][5, 0, 0, 0] = np.inf
    feats, texts, _ = captions(bad)
    with pytest.raises(DamagedCacheError, match=rf"video {re.escape(str(path))} \(row 5 of split 'test'\): its "
                                                r"videos/patch_feat holds NaN or infinite values"):
        search_features(bad, zero_ckpt, {k: v[:1] for k, v in feats.items()}, texts[:1], splits=["test"],
                        device="cpu")


def test_help_has_examples():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for s in ("Examples:", "--audio gunshot.wav", "--queries queries.txt", "--html report.html", "--mode",
              "--candidates", "two-stage"):
        assert s in r.output
