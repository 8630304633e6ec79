"""The paper's encoders at production size (CLIP ViT-B/32 with OpenAI's BPE tokenizer, CLAP
HTSAT-fused with its feature extractor), random weights, built from their published configurations
(varcmp.encoders.published) and saved with save_pretrained: their config files are checked field
by field against the published `config.json` / `preprocessor_config.json` values written below,
then varcmp-extract (real mp4 files with audio), varcmp-train (1 epoch, text and audio),
varcmp-search and check-models run on them.

Marked `production` (about a minute and 2.5 GB of temporary files); CI runs it (.ci/run)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import noise_frames, tone
from helpers import cli

pytestmark = [pytest.mark.production, pytest.mark.usefixtures("one_thread")]

# openai/clip-vit-base-patch32, config.json and preprocessor_config.json as published
CLIP_CONFIG = {
    "projection_dim": 512, "logit_scale_init_value": 2.6592, "model_type": "clip",
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
                    "initializer_factor": 1.0, "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                      "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
                      "projection_dim": 512},
}
CLIP_PREPROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
                     "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                     "size": {"shortest_edge": 224}}
# laion/clap-htsat-fused, config.json and preprocessor_config.json as published
CLAP_CONFIG = {
    "projection_dim": 512, "projection_hidden_act": "relu", "hidden_size": 768,
    "logit_scale_init_value": 14.285714285714285, "model_type": "clap",
    "audio_config": {"window_size": 8, "num_mel_bins": 64, "spec_size": 256, "hidden_act": "gelu", "patch_size": 4,
                     "patch_stride": [4, 4], "num_classes": 527, "hidden_size": 768, "projection_dim": 512,
                     "depths": [2, 2, 6, 2], "num_attention_heads": [4, 8, 16, 32], "enable_fusion": True,
                     "hidden_dropout_prob": 0.1, "fusion_type": None, "patch_embed_input_channels": 1,
                     "flatten_patch_embeds": True, "patch_embeds_hidden_size": 96, "enable_patch_layer_norm": True,
                     "drop_path_rate": 0.0, "attention_probs_dropout_prob": 0.0, "qkv_bias": True, "mlp_ratio": 4.0,
                     "aff_block_r": 4, "num_hidden_layers": 4, "projection_hidden_act": "relu",
                     "layer_norm_eps": 1e-05, "initializer_factor": 1.0},
    "text_config": {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514,
                    "type_vocab_size": 1, "layer_norm_eps": 1e-12, "projection_dim": 512,
                    "projection_hidden_act": "relu"},
}
CLAP_PREPROCESSOR = {"feature_extractor_type": "ClapFeatureExtractor", "feature_size": 64, "sampling_rate": 48000,
                     "hop_length": 480, "fft_window_size": 1024, "frequency_min": 50, "frequency_max": 14000,
                     "max_length_s": 10, "nb_max_samples": 480000, "padding": "repeatpad", "truncation": "fusion"}

VIDEOS = {  # path: (frames at 10 fps, audio tone Hz, caption)
    "Abuse/Abuse001_x264.mp4": (40, 220, "A man in a black shirt hits a dog with a stick."),
    "Fighting/Fighting002_x264.mp4": (30, 330, "Two men fight in a parking lot at night, and a third man in a "
                                                "white jacket tries to separate them before two police officers "
                                                "arrive and push all three against a car."),
    "Normal_Videos_event/Normal_Videos_003_x264.mp4": (30, 440, "People walk through a quiet shop."),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from varcmp.encoders.published import make_clap_fused, make_clip_b32

    root = tmp_path_factory.mktemp("production")
    return make_clip_b32(root / "clip-vit-base-patch32"), make_clap_fused(root / "clap-htsat-fused")


def subset_mismatches(actual: dict, expected: dict, where: str = "") -> list[str]:
    out = []
    for k, v in expected.items():
        if isinstance(v, dict):
            out += subset_mismatches(actual.get(k) or {}, v, f"{where}{k}.")
        elif actual.get(k) != v:
            out.append(f"{where}{k}: {actual.get(k)!r} != published {v!r}")
    return out


def test_saved_configs_are_the_published_ones_field_by_field(models):
    clip, clap = models
    read = lambda p: json.loads(p.read_text())  # noqa: E731
    assert subset_mismatches(read(clip / "config.json"), CLIP_CONFIG) == []
    assert subset_mismatches(read(clip / "preprocessor_config.json"), CLIP_PREPROCESSOR) == []
    assert subset_mismatches(read(clap / "config.json"), CLAP_CONFIG) == []
    assert subset_mismatches(read(clap / "preprocessor_config.json"), CLAP_PREPROCESSOR) == []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(clip)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49408, 49406, 49407, 77)


def write_media(root: Path) -> Path:
    from varcmp.media.files import write_video

    for i, (rel, (n, hz, _)) in enumerate(VIDEOS.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, noise_frames(n, seed=i), fps=10, audio=tone(n / 10, hz))
    with open(root.parent / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video", "text"])
        w.writerows((rel, text) for rel, (_, _, text) in VIDEOS.items())
    return root.parent / "captions.csv"


def test_extract_train_search_on_the_production_architectures(models, tmp_path):
    from varcmp.cache.reader import open_cache
    from varcmp.cli.search import main as search
    from varcmp.encoders.frozen import ClipEncoder, weights_hash
    from varcmp.extract import main as extract

    clip, clap = models
    videos = tmp_path / "videos"
    captions = write_media(videos)
    cache = tmp_path / "cache.zarr"
    r = CliRunner().invoke(extract, [str(videos), "--out", str(cache), "--annotations", str(captions), "--audio",
                                     "video", "--clip-model", str(clip), "--clap-model", str(clap), "--frames", "4",
                                     "--audio-segments", "4", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "1 of 3 captions cut to 32 tokens" in r.output  # the long caption: 37 tokens with OpenAI's BPE
    enc = ClipEncoder(str(clip), torch.device("cpu"))
    with open_cache(cache) as c:
        v, t = c.split("train").load_videos(), c.split("train").load_text()
        assert c.encoders["clip"]["weights_hash"] == weights_hash(enc.model)
    assert v.frame_feat.shape == (3, 4, 512) and v.patch_feat.shape == (3, 4, 49, 512)
    assert v.audio_feat.shape == (3, 4, 512) and v.audio_mask.all()
    assert t.word_feat.shape == (3, 32, 512) and t.word_mask.sum(1).tolist() == [15, 32, 9]
    _, _, sentence = enc.encode_text([str(x) for x in t.text], 32)
    np.testing.assert_allclose(t.sentence.astype(np.float32), sentence.numpy(), rtol=2e-3, atol=2e-3)  # float16
    assert np.isfinite(v.frame_feat).all() and np.isfinite(v.audio_feat.astype(np.float32)).all()

    for query, extra in (("text", ["a man hits a dog"]), ("audio", ["--audio", str(videos / next(iter(VIDEOS)))])):
        run = tmp_path / f"run-{query}"
        cli(cache, "--out", run, "--query", query, "--epochs", 1, "--batch-size", 3, "--val-fraction", 0,
            "--device", "cpu")
        out = tmp_path / f"{query}.json"
        r = CliRunner().invoke(search, [str(cache), "--checkpoint", str(run), *extra, "--top", "3", "--json",
                                        str(out), "--device", "cpu", "--clip-model", str(clip), "--clap-model",
                                        str(clap)])
        assert r.exit_code == 0, r.output
        hits = json.loads(out.read_text())["queries"][0]["hits"]
        assert sorted(h["video"] for h in hits) == sorted(VIDEOS)


def trained_like(src: Path, out: Path, cls, scale: str, value: float) -> Path:
    """The same checkpoint with its logit scale moved off its initial value, as training moves it."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
    model = cls.from_pretrained(src)
    with torch.no_grad():
        getattr(model, scale).fill_(value)
    model.save_pretrained(out)
    return out


def test_check_models_on_the_production_architectures(models, tmp_path):
    from transformers import ClapModel, CLIPModel

    from varcmp.cli.main import main

    clip, clap = models
    r = CliRunner().invoke(main, ["check-models", "--clip-model", str(clip), "--clap-model", str(clap)])
    assert r.exit_code == 1, r.output
    assert "vision: hidden 768, 12 layers, 12 heads, patch 32, image 224 (49 patches); projection 512" in r.output
    assert "tokenizer CLIPTokenizer (49408 entries)" in r.output and "one caption (14 tokens) ->" in r.output
    assert "audio: HTS-AT hidden 768, depths [2, 2, 6, 2], heads [4, 8, 16, 32], fusion on; projection 512" in r.output
    assert r.output.strip().splitlines()[-1] == (
        "differs from the paper's setting: CLIP weights look untrained (logit scale 2.6592, its initial value); "
        "CLAP weights look untrained (logit scale 2.6593, its initial value)")
    clip2 = trained_like(clip, tmp_path / "clip", CLIPModel, "logit_scale", float(np.log(100)))
    clap2 = trained_like(clap, tmp_path / "clap", ClapModel, "logit_scale_a", float(np.log(30)))
    r = CliRunner().invoke(main, ["check-models", "--clip-model", str(clip2), "--clap-model", str(clap2)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == "the paper's setting: CLIP ViT-B/32, 512-d; fused CLAP, 512-d"
