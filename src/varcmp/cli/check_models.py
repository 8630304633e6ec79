"""`varcmp check-models`: load the CLIP (and CLAP) checkpoints exactly as `varcmp-extract` will (the
same encoder classes), print what they are (names, config and weight hashes, sizes, the dims the
cache will get, the preprocessing), run one image, one caption and one audio window through them,
and say in one line whether they are the paper's setting (CLIP ViT-B/32, 512-d; fused CLAP,
512-d) or what differs from it. Exit code 0: the paper's setting; 1: it differs (or an output is
not finite); 2: a checkpoint cannot be loaded."""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import click
import numpy as np

from ..errors import VarcmpError
from .common import OneLineErrors

CAPTION = "a man in a black shirt hits a dog with a stick"
BICUBIC = 3  # PIL's code, as image processors store it


class ModelCheckError(VarcmpError):
    """A checkpoint that cannot be loaded as the encoder it was given for."""


def differences(actual: dict, expected: dict, where: str) -> list[str]:
    """`where.field actual (paper: expected)` for each field of `expected` that `actual` does not match."""
    return [f"{where}{k} {actual.get(k)!r} (paper: {v!r})" for k, v in expected.items() if actual.get(k) != v]


def untrained(name: str, scale, initial: float) -> list[str]:
    """A logit scale still at its initial value: the weights were never trained (random, as the
    test checkpoints' are), whatever the architecture. Trained CLIP ends at ln 100."""
    value = float(scale.detach())
    if math.isclose(value, initial, rel_tol=0, abs_tol=1e-6):
        return [f"{name} weights look untrained (logit scale {value:.4f}, its initial value)"]
    return []


def clip_differences(clip) -> list[str]:
    from ..encoders.published import CLIP_B32, CLIP_IMAGE_PROCESSOR

    cfg = clip.model.config
    vision = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
    text = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings")
    proc = ("size", "crop_size", "resample", "image_mean", "image_std")
    p = clip.processor
    return (untrained("CLIP", clip.model.logit_scale, cfg.logit_scale_init_value)
            + differences({"projection_dim": cfg.projection_dim}, {"projection_dim": 512}, "CLIP ")
            + differences(cfg.vision_config.to_dict(), {k: CLIP_B32["vision_config"][k] for k in vision}, "CLIP vision ")
            + differences(cfg.text_config.to_dict(), {k: CLIP_B32["text_config"][k] for k in text}, "CLIP text ")
            + differences({"tokenizer entries": len(clip.tokenizer)}, {"tokenizer entries": 49408}, "CLIP ")
            + differences({k: _plain(getattr(p, k, None)) for k in proc}, {k: CLIP_IMAGE_PROCESSOR[k] for k in proc},
                          "CLIP image processor "))


def clap_differences(clap) -> list[str]:
    from ..encoders.published import CLAP_FEATURE_EXTRACTOR, CLAP_FUSED

    cfg = clap.model.config
    audio = ("enable_fusion", "hidden_size", "depths", "num_attention_heads", "num_mel_bins", "spec_size")
    ext = ("sampling_rate", "feature_size", "hop_length", "fft_window_size", "max_length_s", "truncation", "padding")
    return (untrained("CLAP", clap.model.logit_scale_a, math.log(cfg.logit_scale_init_value))
            + differences({"projection_dim": cfg.projection_dim}, {"projection_dim": 512}, "CLAP ")
            + differences(_plain(cfg.audio_config.to_dict()), {k: CLAP_FUSED["audio_config"][k] for k in audio},
                          "CLAP audio ")
            + differences({k: getattr(clap.extractor, k, None) for k in ext}, {k: CLAP_FEATURE_EXTRACTOR[k] for k in ext},
                          "CLAP feature extractor "))


def _plain(x):
    """Values as they read in a config.json: tuples as lists, PIL enums as ints, a processor's
    size (a dataclass) as the dict of its set fields."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: v for k, v in dataclasses.asdict(x).items() if v is not None}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "value") and isinstance(getattr(x, "value"), int):
        return int(x.value)
    return x


def _size(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f} M parameters, {next(model.parameters()).dtype}".replace("torch.", "")


def _finite(name: str, *arrays, problems: list[str]) -> str:
    ok = all(np.isfinite(np.asarray(a)).all() for a in arrays)
    if not ok:
        problems.append(f"{name}: output is not finite")
    return "finite" if ok else "NOT FINITE"


def check_clip(clip, caption: str, max_words: int, problems: list[str]) -> None:
    from ..encoders.frozen import preprocess_images, tokenize

    cfg, vc, tc, p = clip.model.config, clip.model.config.vision_config, clip.model.config.text_config, clip.processor
    click.echo(f"CLIP {clip.name}")
    click.echo(f"  config {clip.config_hash}  weights {clip.info()['weights_hash']}  {_size(clip.model)}")
    click.echo(f"  vision: hidden {vc.hidden_size}, {vc.num_hidden_layers} layers, {vc.num_attention_heads} heads, "
               f"patch {vc.patch_size}, image {vc.image_size} ({clip.num_patches} patches); projection {cfg.projection_dim}")
    click.echo(f"  text: hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, {tc.num_attention_heads} heads, "
               f"vocabulary {tc.vocab_size}, {tc.max_position_embeddings} positions; tokenizer "
               f"{type(clip.tokenizer).__name__} ({len(clip.tokenizer)} entries)")
    click.echo(f"  image preprocessing: {type(p).__name__}, resize {_plain(p.size)} (resample {_plain(p.resample)}"
               f"{', bicubic' if _plain(p.resample) == BICUBIC else ''}), centre crop {_plain(p.crop_size)}, "
               f"mean {_plain(p.image_mean)}, std {_plain(p.image_std)}")
    click.echo(f"  cache dims: frames [N, {clip.dim}], patches [N, {clip.num_patches}, {clip.dim}], "
               f"words [{max_words}, {clip.dim}], sentence [{clip.dim}]")
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    t = time.perf_counter()
    cls, patches = clip.encode_images(preprocess_images(p, [image]).to(clip.device))
    ms = 1000 * (time.perf_counter() - t)
    click.echo(f"  one 320x240 image -> [CLS] {list(cls.shape[1:])}, patches {list(patches.shape[1:])}, "
               f"{_finite('CLIP image', cls, patches, problems=problems)}, {ms:.0f} ms")
    n = len(tokenize(clip.tokenizer, [caption])["input_ids"][0])
    t = time.perf_counter()
    words, mask, sentence = clip.encode_text([caption], max_words)
    ms = 1000 * (time.perf_counter() - t)
    click.echo(f"  one caption ({n} tokens{f', cut to {max_words}' if n > max_words else ''}) -> words "
               f"{list(words.shape[1:])} ({int(mask.sum())} valid), sentence {list(sentence.shape[1:])}, "
               f"{_finite('CLIP text', words, sentence, problems=problems)}, {ms:.0f} ms")


def check_clap(clap, problems: list[str]) -> None:
    from ..encoders.frozen import preprocess_audio

    a, e = clap.model.config.audio_config, clap.extractor
    click.echo(f"CLAP {clap.name}")
    click.echo(f"  config {clap.config_hash}  weights {clap.info()['weights_hash']}  {_size(clap.model)}")
    click.echo(f"  audio: HTS-AT hidden {a.hidden_size}, depths {list(a.depths)}, heads {list(a.num_attention_heads)}, "
               f"fusion {'on' if a.enable_fusion else 'off'}; projection {clap.dim}")
    click.echo(f"  audio preprocessing: {e.sampling_rate} Hz mono, {e.feature_size} mel bins, hop {e.hop_length}, "
               f"FFT {e.fft_window_size}, {e.max_length_s} s, truncation {e.truncation!r}, padding {e.padding!r}")
    click.echo(f"  cache dims: audio segments [N_a, {clap.dim}]")
    t = np.arange(int(e.max_length_s * clap.rate)) / clap.rate  # the longest window extraction makes
    window = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    start = time.perf_counter()
    out = clap.encode(preprocess_audio(e, [window], clap.rate))
    ms = 1000 * (time.perf_counter() - start)
    click.echo(f"  one {e.max_length_s:g} s window (a 440 Hz tone) -> {list(out.shape[1:])}, "
               f"{_finite('CLAP audio', out, problems=problems)}, {ms:.0f} ms")


def verdict(clip_diff: list[str], clap_diff: list[str] | None, problems: list[str]) -> tuple[str, int]:
    """The one line, and the exit code."""
    if problems:
        return "problem: " + "; ".join(problems), 1
    diff = clip_diff + (clap_diff or [])
    if diff:
        return "differs from the paper's setting: " + "; ".join(diff), 1
    clap = ("fused CLAP, 512-d" if clap_diff is not None else
            "CLAP not checked: give --clap-model to check the audio encoder")
    return f"the paper's setting: CLIP ViT-B/32, 512-d; {clap}", 0


@click.command("check-models", cls=OneLineErrors)
@click.option("--clip-model", default="openai/clip-vit-base-patch32", show_default=True,
              help="CLIP hub id or local directory, as varcmp-extract takes it.")
@click.option("--clap-model", default=None, help="CLAP hub id or local directory (checked only when given).")
@click.option("--max-words", default=32, show_default=True, type=click.IntRange(3, 77),
              help="Text tokens per caption, as varcmp-extract's --max-words.")
@click.option("--caption", default=CAPTION, show_default=True, help="The caption run through CLIP.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
def check_models(clip_model, clap_model, max_words, caption, device):
    """Check the encoder checkpoints before extraction: load them as varcmp-extract does, print what
    they are, run one image, caption and audio window, and say whether they are the paper's setting.

    \b
    Examples:
      varcmp check-models --clip-model /models/clip-vit-base-patch32 --clap-model /models/clap-htsat-fused
      varcmp check-models                       # the hub's openai/clip-vit-base-patch32 (needs the network)

    Exit code 0: the paper's setting; 1: something differs (named); 2: a checkpoint cannot be loaded.
    """
    from ..encoders.frozen import ClapEncoder, ClipEncoder, model_path_problem, quiet_transformers, resolve_device

    for flag, name in (("--clip-model", clip_model), ("--clap-model", clap_model)):
        if problem := model_path_problem(flag, name):
            raise click.UsageError(problem)
    quiet_transformers()
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    problems: list[str] = []
    try:
        clip = ClipEncoder(clip_model, dev)
        clap = ClapEncoder(clap_model, dev) if clap_model else None
    except RuntimeError as e:
        raise ModelCheckError(str(e)) from None
    check_clip(clip, caption, max_words, problems)
    if clap is not None:
        check_clap(clap, problems)
    line, code = verdict(clip_differences(clip), clap_differences(clap) if clap else None, problems)
    click.echo(line)
    sys.exit(code)
