"""OpenAI's CLIP tokenizer, offline: writes `vocab.json`, `merges.txt` and the tokenizer config that
`CLIPTokenizer.from_pretrained(OUT)` loads, from the BPE file that ships in `open_clip_torch`
(install it without its dependencies: `pip install --no-deps open_clip_torch`) or from `--bpe FILE`.
With `--captions FILE` (one caption a line, '#' lines skipped) it also says how many captions are
longer than `--max-words` tokens (start and end included), i.e. cut by `varcmp-extract`.

    python tools/clip_tokenizer.py /models/clip-tokenizer
    python tools/clip_tokenizer.py /tmp/tok --captions tests/data/ucfcrime_ar_like_captions.txt --max-words 32
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import click

from varcmp.errors import VarcmpError


def captions_of(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bpe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="bpe_simple_vocab_16e6.txt.gz (default: the one inside the installed open_clip).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A caption file to measure: how many are cut at --max-words.")
@click.option("--max-words", default=32, show_default=True, type=click.IntRange(3, 77))
def main(out: Path, bpe: Path | None, captions: Path | None, max_words: int) -> None:
    from transformers import CLIPTokenizer

    from varcmp.encoders.bpe import write_clip_tokenizer
    from varcmp.encoders.frozen import quiet_transformers, tokenize

    quiet_transformers()
    try:
        write_clip_tokenizer(out, bpe)
    except VarcmpError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    tok = CLIPTokenizer.from_pretrained(out)
    click.echo(f"{out}: CLIP tokenizer, {len(tok)} entries")
    if captions:
        texts = captions_of(captions)
        lengths = [len(ids) for ids in tokenize(tok, texts)["input_ids"]]
        cut = sum(n > max_words for n in lengths)
        click.echo(f"{captions}: {cut} of {len(texts)} captions ({100 * cut / len(texts):.1f} %) are longer than "
                   f"{max_words} tokens (start and end included); tokens per caption: median "
                   f"{statistics.median(lengths):g}, longest {max(lengths)}")


if __name__ == "__main__":
    main()
