"""OpenAI's CLIP tokenizer without the hub: the `vocab.json` and `merges.txt` that `CLIPTokenizer`
loads, built from the BPE merges file that OpenAI's CLIP code ships (`bpe_simple_vocab_16e6.txt.gz`,
carried by the `open_clip_torch` package on PyPI). The vocabulary is built the way that code builds
it: the 256 byte symbols, the same with `</w>`, one entry per merge, then the start and end tokens
(49,408 entries). `tools/clip_tokenizer.py` is the command; the tests build the production-size
CLIP with it."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from ..errors import VarcmpError
from .tiny import bytes_to_unicode

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges OpenAI's tokenizer keeps (its vocabulary is 49,408)
START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 77  # CLIP's text positions


class BpeError(VarcmpError):
    """The BPE file is missing or is not CLIP's."""


def find_bpe() -> Path:
    """The BPE file inside an installed `open_clip` package, found without importing it (its
    `__init__` imports torchvision, which the tokenizer does not need)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_NAME).is_file():
            return Path(folder) / BPE_NAME
    raise BpeError(f"{BPE_NAME} not found: install it with `pip install --no-deps open_clip_torch` "
                   "(no dependencies: only the file is needed), or pass the file's path")


def read_merges(bpe: Path) -> list[str]:
    """The merges OpenAI's tokenizer uses, one `a b` pair per line (the first line is a header)."""
    try:
        lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BpeError(f"{bpe}: not a gzip-compressed BPE file ({type(e).__name__})") from None
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise BpeError(f"{bpe}: not CLIP's BPE file (expected {NUM_MERGES} merge pairs after the header line)")
    return merges


def write_clip_tokenizer(out: str | Path, bpe: str | Path | None = None) -> Path:
    """A CLIP tokenizer directory at `out` (vocab.json, merges.txt and the tokenizer's config, as
    `CLIPTokenizer.save_pretrained` writes them; model_max_length 77), from `bpe` or the installed
    open_clip's file."""
    from transformers import CLIPTokenizer

    merges = read_merges(Path(bpe) if bpe else find_bpe())
    symbols = list(bytes_to_unicode().values())
    names = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START, END]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(names)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=CONTEXT)
    tok.save_pretrained(out)
    return out
