"""`varcmp serve`'s web application (FastAPI): one `Searcher` holding the checkpoint, the splits'
stored indexes and the query encoder, loaded once, behind

    GET  /                      the search page (page.html: no script or style from elsewhere)
    GET  /search?q=TEXT&top=K   what `varcmp-search --json` writes for that query (text checkpoints)
    POST /search/audio?top=K    the same for an audio clip sent as the request body (audio checkpoints)
    GET  /video/SPLIT/ROW       the original video of a hit, with HTTP range requests (seeking)
    GET  /thumb/SPLIT/ROW?t=S   a JPEG of its sampled frame nearest S seconds

A video is named by its split and its row in the cache, as hits name it; its file is the split's
recorded root joined with the path the cache stores, and must lie inside that root. Anything else
(another split or row, a path, `..`, an encoded variant) is 404. Searches run one at a time (one
model, one set of torch threads); the file routes do not wait for them."""

from __future__ import annotations

import tempfile
import threading
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from ..errors import VarcmpError
from ..retrieval.report import VideoFrames, json_text, thumb_jpeg
from ..retrieval.search import Searcher

MAX_TOP = 100                 # hits per query a request may ask for
MAX_AUDIO_BYTES = 64 << 20    # the largest audio upload
THUMBS_KEPT = 64              # videos whose decoded frames stay in memory


def page_html(kind: str) -> str:
    """The search page, told which kind of query the checkpoint takes ("text" or "audio")."""
    text = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    return text.replace("__QUERY_KIND__", kind)


def warm_up(searcher: Searcher, encoder: str | None) -> None:
    """Load the query encoder (checked against the cache) and open every split's index (built when
    missing) with one search of a placeholder query, so that the first request waits for neither."""
    import numpy as np

    searcher.load_encoder(encoder)
    spec, cfg = searcher.cache.spec, searcher.model.cfg
    if searcher.kind.name == "text":
        L = spec.max_words
        feats = {"word_feat": np.ones((1, L, spec.dim), np.float32), "word_mask": np.arange(L)[None] < 2,
                 "sentence": np.ones((1, spec.dim), np.float32)}
    else:
        na = spec.audio_segments or cfg.audio_segments
        feats = {"seg_feat": np.ones((1, na, spec.audio_dim), np.float32), "seg_mask": np.arange(na)[None] < 1}
    searcher.search(feats, ["warm-up"], 1)


def create_app(searcher: Searcher, clip_model: str | None = None, clap_model: str | None = None):
    """The application over an open `searcher` (warmed up here, before the first request)."""
    warm_up(searcher, clip_model if searcher.kind.name == "text" else clap_model)
    lock = threading.Lock()
    splits = {src.name: src for src in searcher.sources}
    rows = {src.name: {int(r): i for i, r in enumerate(src.rows)} for src in searcher.sources}
    frames = VideoFrames(searcher.cache.spec.num_frames, keep=THUMBS_KEPT)
    frames_lock = threading.Lock()
    app = FastAPI(title="varcmp", docs_url=None, redoc_url=None, openapi_url=None)
    not_found = Response("not found\n", status_code=404, media_type="text/plain")

    def answer(search) -> Response:
        try:
            with lock:
                return Response(json_text(search()), media_type="application/json")
        except VarcmpError as e:
            return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)

    def check_top(top: int) -> JSONResponse | None:
        if not 1 <= top <= MAX_TOP:
            return JSONResponse({"error": f"top={top}: must be 1 to {MAX_TOP}"}, status_code=400)
        return None

    def video_file(split: str, row: str) -> Path | None:
        """The file of (split, row) when both name a searched video and it lies inside the root."""
        src = splits.get(split)
        if src is None or not row.isdecimal() or int(row) not in rows[split] or not src.root:
            return None
        root = Path(src.root).resolve()
        path = (root / str(src.paths[rows[split][int(row)]])).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(page_html(searcher.kind.name))

    @app.get("/search")
    def search(q: str = "", top: int = 10):
        if searcher.kind.name != "text":
            return JSONResponse({"error": "this checkpoint takes audio queries: POST the clip to /search/audio"},
                                status_code=400)
        return check_top(top) or answer(lambda: searcher.search(searcher.text_features([q], clip_model), [q], top))

    @app.post("/search/audio")
    async def search_audio(request: Request, top: int = 10, name: str = "clip"):
        body = await request.body()
        if len(body) > MAX_AUDIO_BYTES:
            return JSONResponse({"error": f"audio larger than {MAX_AUDIO_BYTES >> 20} MB"}, status_code=413)
        if bad := check_top(top):
            return bad
        suffix = Path(name).suffix if Path(name).suffix.isascii() else ""
        with tempfile.TemporaryDirectory(prefix="varcmp-serve-") as tmp:
            clip = Path(tmp) / f"query{suffix[:10]}"
            clip.write_bytes(body)
            return await run_in_threadpool(
                answer, lambda: searcher.search(searcher.audio_features([clip], clap_model), [name], top))

    @app.get("/video/{split}/{row}")
    def video(split: str, row: str):
        path = video_file(split, row)
        return not_found if path is None else FileResponse(path)

    @app.get("/thumb/{split}/{row}")
    def thumb(split: str, row: str, t: float = 0.0):
        path = video_file(split, row)
        if path is None:
            return not_found
        src = splits[split]
        with frames_lock:
            got, _ = frames.get(src.root, str(src.paths[rows[split][int(row)]]))
        if got is None:
            return not_found
        best = min(range(len(got.times)), key=lambda i: abs(got.times[i] - t))
        return Response(thumb_jpeg(got.images[best]), media_type="image/jpeg")

    return app
