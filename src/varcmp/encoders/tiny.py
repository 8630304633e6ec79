"""Tiny, randomly initialised CLIP and CLAP checkpoints with the production
shapes (512-d outputs, 7x7 patches, 48 kHz audio), built from config objects
and saved with `save_pretrained`, so that tests and the `--media` demo run the
real loading code (`from_pretrained(dir)`) without any download.

Their features are meaningless: retrieval needs the pre-trained checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP's tokenizer uses it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def make_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """A character-level CLIP (2 layers, width 32, projection 512) saved to `out`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(**small, max_position_embeddings=77, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(**small, image_size=224, patch_size=32),
        projection_dim=512,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)
    return out


def make_tiny_clap(out: str | Path, seed: int = 0) -> Path:
    """A CLAP with a one-block-per-stage HTS-AT (fusion on, 64 mel bins, 48 kHz), projection 512."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ClapConfig(
        audio_config=dict(enable_fusion=True, fusion_type="aff_2d", patch_embeds_hidden_size=8, hidden_size=64,
                          depths=(1, 1, 1, 1), num_attention_heads=(1, 1, 1, 1), window_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
        projection_dim=512,
    )
    torch.manual_seed(seed)
    ClapModel(cfg).eval().save_pretrained(out)
    ClapFeatureExtractor().save_pretrained(out)
    return out
