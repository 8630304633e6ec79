"""`varcmp check-models` on the tiny checkpoints: what it prints is what extraction loads (hashes,
dims, token counts), what differs from the paper's setting is named, and anything that is not a
CLIP or CLAP checkpoint is refused in one line. The production-size checkpoints are checked in
tests/test_production.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error

from varcmp.cli.main import main


def check(*args):
    return CliRunner().invoke(main, ["check-models", *map(str, args)])


def test_tiny_checkpoints_are_described_and_their_differences_named(tiny_clip, tiny_clap):
    from varcmp.encoders.frozen import ClapEncoder, ClipEncoder, weights_hash

    r = check("--clip-model", tiny_clip, "--clap-model", tiny_clap, "--device", "cpu")
    assert r.exit_code == 1, r.output
    clip, clap = ClipEncoder(str(tiny_clip), torch.device("cpu")), ClapEncoder(str(tiny_clap), torch.device("cpu"))
    for enc in (clip, clap):
        assert f"config {enc.config_hash}  weights {weights_hash(enc.model)}" in r.output
    caption = "a man in a black shirt hits a dog with a stick"  # the tiny tokenizer: a token per letter
    assert f"one caption ({len(caption.replace(' ', '')) + 2} tokens, cut to 32) -> words [32, 512] (32 valid)" in r.output
    assert "one 320x240 image -> [CLS] [512], patches [49, 512], finite" in r.output
    assert "one 10 s window (a 440 Hz tone) -> [512], finite" in r.output
    assert "48000 Hz mono, 64 mel bins, hop 480, FFT 1024, 10 s, truncation 'fusion', padding 'repeatpad'" in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("differs from the paper's setting: CLIP weights look untrained")
    for field in ("CLIP vision hidden_size 32 (paper: 768)", "CLIP text vocab_size 514 (paper: 49408)",
                  "CLIP tokenizer entries 514 (paper: 49408)", "CLAP audio depths [1, 1, 1, 1] (paper: [2, 2, 6, 2])"):
        assert field in last
    assert "patch_size" not in last and "enable_fusion" not in last and "image processor" not in last


def test_without_clap_only_clip_is_checked(tiny_clip):
    r = check("--clip-model", tiny_clip, "--max-words", 77, "--caption", "a dog")
    assert r.exit_code == 1 and "CLAP" not in r.output, r.output
    assert "one caption (6 tokens) -> words [77, 512] (6 valid)" in r.output


def test_non_finite_outputs_are_a_problem(tiny_clip, tmp_path):
    from transformers import CLIPModel

    bad = tmp_path / "nan-clip"
    shutil.copytree(tiny_clip, bad)
    model = CLIPModel.from_pretrained(bad)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] = float("nan")
    model.save_pretrained(bad)
    r = check("--clip-model", bad)
    assert r.exit_code == 1 and "patches [49, 512], NOT FINITE" in r.output, r.output
    assert r.output.strip().splitlines()[-1] == "problem: CLIP image: output is not finite"


def partial_weights(src: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = load_file(out / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "encoder.layers.1." not in k}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case, needles", [
    ("empty folder", ("cannot load CLIP", "no config.json in that folder")),
    ("a folder of other files", ("cannot load CLIP", "no config.json in that folder")),
    ("missing folder", ("--clip-model", "no such directory")),
    ("CLAP given as CLIP", ("cannot load CLIP", "not a CLIP checkpoint", "model_type 'clap'")),
    ("CLIP given as CLAP", ("cannot load CLAP", "not a CLAP checkpoint", "model_type 'clip'")),
    ("weights missing", ("cannot load CLIP", "weights are missing", "they would be random")),
])
def test_what_is_not_a_clip_or_clap_checkpoint_is_refused_in_one_line(tiny_clip, tiny_clap, tmp_path, case,
                                                                       needles):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty").mkdir()
    args = {
        "empty folder": ("--clip-model", tmp_path / "empty"),
        "a folder of other files": ("--clip-model", other),
        "missing folder": ("--clip-model", tmp_path / "nowhere"),
        "CLAP given as CLIP": ("--clip-model", tiny_clap),
        "CLIP given as CLAP": ("--clip-model", tiny_clip, "--clap-model", tiny_clip),
        "weights missing": ("--clip-model", partial_weights(tiny_clip, tmp_path / "partial")),
    }[case]
    r = check(*args)
    one_line_error(r, *needles)
    assert str(args[-1]) in r.output or case == "missing folder"


def test_a_checkpoint_without_some_buffers_still_loads(tiny_clap, tmp_path):
    """Buffers (index tables, position ids) that an older file lacks are made the same way every time,
    not drawn at random: only missing parameters are refused."""
    from safetensors.torch import load_file, save_file

    from varcmp.encoders.frozen import ClapEncoder

    out = tmp_path / "clap"
    shutil.copytree(tiny_clap, out)
    weights = load_file(out / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "relative_position_index" not in k}
    assert len(kept) < len(weights)
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    ref = ClapEncoder(str(tiny_clap), torch.device("cpu")).model.state_dict()
    loaded = ClapEncoder(str(out), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(ref[k], loaded[k]) for k in ref)
