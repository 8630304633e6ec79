"""`varcmp`: the umbrella command. `varcmp demo` runs the whole job (generate, train,
evaluate) on the built-in synthetic benchmark: no download, no data of yours.

The demo's table is shaped like the paper's Tables 3-5: the frozen-CLIP baseline
(zero-shot), then VarCMP trained with the coarse level only, coarse+fine, all three
levels, and all three without anomaly-biased weighting; R@1, R@10 and MdR in both
directions on the synthetic test split. A killed demo resumes where it stopped
when run again with the same options."""

from __future__ import annotations

import click

from .check_models import check_models
from .demo import demo
from .serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="varcmp")
def main():
    """varcmp: video anomaly retrieval with frozen CLIP/CLAP features (VarCMP, AAAI 2025).

    \b
    The stages have commands of their own:
      varcmp-extract   videos -> feature cache (CLIP frames/patches/words, CLAP audio)
      varcmp-train     cache -> trained heads (checkpoints)
      varcmp-eval      cache + checkpoint -> R@K, MdR, MnR in both directions
      varcmp-index     cache + checkpoint -> the stored video side that search, serve and eval read
      varcmp-search    cache + checkpoint + a text or audio query -> ranked videos and time spans
      varcmp-synth     a synthetic benchmark as a cache
    """


main.add_command(demo)
main.add_command(check_models)
main.add_command(serve)

if __name__ == "__main__":
    main()
