"""`varcmp-index`: build (or finish, or check) the stored video index of a checkpoint on every split
of a cache, the index that `varcmp-search`, `varcmp serve` and `varcmp-eval` read
(`varcmp.retrieval.index`)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import CommandError, Interrupted, OneLineErrors


def size_text(n: float) -> str:
    """Bytes for people: 512 B, 74.6 KB, 1.2 GB."""
    units = ("B", "KB", "MB", "GB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{int(n)} B" if i == 0 else f"{n:.1f} {units[i]}"


def check_writable(folder: Path) -> None:
    """CommandError (one line, before any work) when the index cannot be stored in `folder`."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CommandError(f"{folder}: cannot store the index there ({e.strerror or e})") from None


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run directory (its best.safetensors, else last.safetensors) or checkpoint file.")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="Split(s) to index; repeat for several [default: every split of the cache].")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(cache, checkpoint, splits, device, quiet):
    """Encode every video of a cache once with a trained checkpoint and store the result with the
    cache: what a query's score needs of each video (the temporal encoder's embedding, the frames
    and their weights, the selected patches and theirs, the anomaly scores) and the first-stage
    vectors of two-stage search. Searches then only encode the query.

    \b
    Examples:
      varcmp-index cache.zarr --checkpoint runs/ucf
      varcmp-index cache.zarr --checkpoint runs/ucf --split test

    The index lives in the cache's .varcmp-search/ folder (next to an HDF5 cache: CACHE.varcmp-search/),
    one folder per split and checkpoint, keyed by the checkpoint's weights, the split's videos and the
    encoders. Killed, the same command finishes it without redoing what is stored; an index of other
    weights or videos is never used. varcmp-search builds it itself when it is missing.
    """
    from rich.console import Console

    from ..cli.markup import lit
    from ..retrieval.index import index_folder
    from ..retrieval.search import Searcher

    err = Console(stderr=True)
    try:
        with Searcher(cache, checkpoint, splits, device, console=err, progress=not quiet) as s:
            check_writable(index_folder(s.cache.path))
            for src in s.sources:
                if not src.n:
                    err.print(f"{lit(src.name)}: no extracted video, nothing to index", highlight=False)
                    continue
                idx = s.index(src)
                info = s.index_info[src.name]
                size = idx.meta.get("bytes", 0)
                what = (f"built {info.chunks_built} of {-(-src.n // idx.chunk)} chunks in {info.seconds:.1f} s"
                        if info.built else "up to date")
                click.echo(f"{src.name}: {src.n} videos, {what}, {size_text(size)} "
                           f"({size_text(size / src.n)} per video): {info.path or 'in memory only'}")
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the chunks stored so far are kept; the same command finishes the index")


if __name__ == "__main__":
    main()
