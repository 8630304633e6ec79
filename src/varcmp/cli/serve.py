"""`varcmp serve`: the search page and its JSON API on a local web server (uvicorn), over the stored
index of a checkpoint (`varcmp.serve.app`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import UserError
from ..retrieval.search import MODES
from .common import Interrupted, OneLineErrors


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run directory (its best.safetensors, else last.safetensors) or checkpoint file.")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface; "
                                                   "the page has no login).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="Split(s) to search; repeat for several [default: every split of the cache].")
@click.option("--clip-model", default=None, help="Where to load CLIP from [default: the name the cache recorded].")
@click.option("--clap-model", default=None, help="The same for CLAP (audio checkpoints).")
@click.option("--mode", type=click.Choice(MODES), default="auto", help="As varcmp-search --mode.")
@click.option("--candidates", default=None, type=click.IntRange(1), help="As varcmp-search --candidates.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
def serve(cache, checkpoint, host, port, splits, clip_model, clap_model, mode, candidates, device):
    """Search a cache in the browser: type a query (or send an audio clip, for an audio checkpoint)
    and see the ranked videos with their per-level scores, anomaly probability, a thumbnail, the
    time span and the anomaly and similarity curves; a click plays the original video from the
    span's start. The checkpoint, the splits' stored index (built first when missing, as
    varcmp-index builds it) and the query encoder are loaded once, at start.

    \b
    Examples:
      varcmp serve cache.zarr --checkpoint runs/ucf              # then open http://127.0.0.1:8000
      varcmp serve cache.zarr --checkpoint runs/xd --port 8080
      curl 'http://127.0.0.1:8000/search?q=a+man+hits+a+dog&top=5'   # what varcmp-search --json writes
    """
    from rich.console import Console

    from ..retrieval.search import Searcher

    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise UserError(f"varcmp serve needs the 'serve' extra ({e.name} is missing): "
                        "pip install 'varcmp[serve]'") from None
    err = Console(stderr=True)
    _listenable(host, port)
    t0 = time.perf_counter()
    searcher = Searcher(cache, checkpoint, splits, device, None, mode, candidates, err, True)
    try:
        app = create_app(searcher, clip_model, clap_model)
        videos = sum(s.n for s in searcher.sources)
        err.print(f"varcmp serve: {videos} videos ready in {time.perf_counter() - t0:.1f} s on "
                  f"http://{host}:{port} (Ctrl-C stops)", highlight=False, markup=False)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        try:
            server.run()  # on Ctrl-C uvicorn shuts down, then raises the signal again (uvicorn.run would swallow it)
        except KeyboardInterrupt:
            raise Interrupted("interrupted: the server stopped") from None
    finally:
        searcher.close()


def _listenable(host: str, port: int) -> None:
    """One line now, rather than uvicorn's log line and exit code 1, when the address is taken."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
