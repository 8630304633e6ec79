"""`varcmp-search`: the command. The search itself is `varcmp.retrieval.search`; the reports are
`varcmp.retrieval.report`."""

from __future__ import annotations

from pathlib import Path

import click

from ..retrieval.index import DEFAULT_CANDIDATES, DEFAULT_POOL_SHARE, INDEX_DIR
from ..retrieval.report import print_results, write_html, write_json
from ..retrieval.scoring import DEFAULT_CHUNK, DEFAULT_CHUNK_CUDA
from ..retrieval.search import AUTO_TWO_STAGE, MODES, run_search
from ..retrieval.spans import SPAN_THRESHOLD
from .common import CommandError, OneLineErrors, OutputFile, report_console

# --------------------------------------------------------------------------
# The command


EPILOG = (f"The videos come encoded from the split's stored index (varcmp-index), built once per cache, "
          f"checkpoint and split in the cache's {INDEX_DIR}/ folder (here, with a progress bar, when it is missing). "
          f"Modes: exhaustive scores every video with the full three-level score; two-stage takes the "
          f"--candidates videos of highest first-stage score (the coarse level, plus for text the weighted-mean "
          f"half of the fine level: one inner product per video, exact faiss search) and "
          f"reranks them with the full score; auto uses two-stage for splits of more than {AUTO_TWO_STAGE} "
          f"videos. With --candidates >= the split's size both modes give identical results. Span: the frames "
          f"around the one maximising frame weight x query similarity, extended while neighbours keep "
          f"{SPAN_THRESHOLD} of its relevance or more (python -c 'import varcmp.retrieval.spans as s; help(s)').")


@click.command(cls=OneLineErrors, epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("query", nargs=-1)
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Run directory (its best.safetensors, else last.safetensors) or checkpoint file.")
@click.option("--audio", "audio", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Audio clip(s) to search with (audio checkpoints); repeat for several.")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="One query per line: text, or audio file paths (relative to FILE's folder) for an audio "
                   "checkpoint. Batched: videos are read and encoded once for all of them.")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="Split(s) to search; repeat for several [default: every split of the cache].")
@click.option("--top", default=10, type=click.IntRange(1), help="Hits per query.")
@click.option("--json", "json_out", type=OutputFile(), default=None,
              help="Also write the hits as JSON (scores, per-level scores, anomaly, span, frame curves).")
@click.option("--html", "html_out", type=OutputFile(), default=None,
              help="Also write a self-contained HTML report (thumbnails and plots embedded).")
@click.option("--clip-model", default=None,
              help="Where to load CLIP from [default: the name the cache recorded]; its config and weights "
                   "must hash as the cache's.")
@click.option("--clap-model", default=None, help="The same for CLAP (audio queries).")
@click.option("--mode", type=click.Choice(MODES), default="auto",
              help=f"auto: two-stage above {AUTO_TWO_STAGE} videos in a split, else exhaustive.")
@click.option("--candidates", default=None, type=click.IntRange(1),
              help=f"Two-stage: videos per query (and split) that the full score reranks [default: "
                   f"{DEFAULT_POOL_SHARE:.0%} of the split, at least {DEFAULT_CANDIDATES}].")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
@click.option("--chunk", type=int, default=None,
              help=f"Videos per page (read, encoded, scored together) and queries per scoring block "
                   f"[default: {DEFAULT_CHUNK} on CPU, {DEFAULT_CHUNK_CUDA} on CUDA]. Results do not depend on it "
                   "beyond float rounding.")
def main(cache, query, checkpoint, audio, queries_file, splits, top, json_out, html_out, clip_model, clap_model,
         mode, candidates, device, chunk):
    """Search a feature cache with a text or audio query: the matching videos ranked by a trained
    checkpoint, each with its per-level scores, predicted anomaly probability and the time span
    where it matches best.

    \b
    Examples:
      varcmp-search cache.zarr --checkpoint runs/ucf "a man in a black shirt hits a dog with a stick" --top 10
      varcmp-search cache.zarr --checkpoint runs/xd --audio gunshot.wav --top 5
      varcmp-search cache.zarr --checkpoint runs/ucf --queries queries.txt --json hits.json
      varcmp-search cache.zarr --checkpoint runs/ucf "car on fire" --html report.html
      varcmp-search big.zarr --checkpoint runs/ucf "a fight" --mode two-stage --candidates 2000
    """
    from rich.console import Console

    err = Console(stderr=True)
    result = run_search(cache, checkpoint, query, audio, queries_file, splits, top, clip_model, clap_model,
                        mode, candidates, device, chunk, console=err)
    for flag, path, write in (("--json", json_out, write_json), ("--html", html_out, write_html)):
        if path is not None:  # the files first: nothing printed can then cost them
            try:
                write(result, path)
            except OSError as e:
                raise CommandError(f"{flag} {path}: {e.strerror or e}") from None
    print_results(result, report_console())


if __name__ == "__main__":
    main()
