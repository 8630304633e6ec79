"""The paper's two encoders at their production size with random weights, built from their published
configurations (openai/clip-vit-base-patch32, laion/clap-htsat-fused: each architecture and
preprocessing field of their `config.json` and `preprocessor_config.json` is set here) and saved
with `save_pretrained`: everything a user's download holds except the trained weights. Tests run
extraction, training and search on them (the paths the tiny models do not take: the real BPE
tokenizer, the full HTS-AT), and the GPU check times them. Their features mean nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from .bpe import write_clip_tokenizer

CLIP_B32 = dict(
    projection_dim=512, logit_scale_init_value=2.6592, initializer_factor=1.0,
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_range=0.02,
                     initializer_factor=1.0, projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                       attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
                       projection_dim=512),
)
CLIP_IMAGE_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)
CLAP_FUSED = dict(
    projection_dim=512, projection_hidden_act="relu", hidden_size=768, logit_scale_init_value=1 / 0.07,
    initializer_factor=1.0,
    audio_config=dict(window_size=8, num_mel_bins=64, spec_size=256, hidden_act="gelu", patch_size=4,
                      patch_stride=[4, 4], num_classes=527, hidden_size=768, projection_dim=512, depths=[2, 2, 6, 2],
                      num_attention_heads=[4, 8, 16, 32], enable_fusion=True, hidden_dropout_prob=0.1,
                      fusion_type=None, patch_embed_input_channels=1, flatten_patch_embeds=True,
                      patch_embeds_hidden_size=96, enable_patch_layer_norm=True, drop_path_rate=0.0,
                      attention_probs_dropout_prob=0.0, qkv_bias=True, mlp_ratio=4.0, aff_block_r=4,
                      num_hidden_layers=4, projection_hidden_act="relu", layer_norm_eps=1e-5, initializer_factor=1.0),
    text_config=dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=514, type_vocab_size=1,
                     initializer_factor=1.0, layer_norm_eps=1e-12, projection_dim=512, projection_hidden_act="relu",
                     pad_token_id=1, bos_token_id=0, eos_token_id=2),
)
CLAP_FEATURE_EXTRACTOR = dict(
    feature_size=64, sampling_rate=48000, hop_length=480, fft_window_size=1024, frequency_min=50,
    frequency_max=14000, max_length_s=10, padding_value=0.0, return_attention_mask=False,
    truncation="fusion", padding="repeatpad",
)


def make_clip_b32(out: str | Path, seed: int = 0, bpe: str | Path | None = None) -> Path:
    """CLIP ViT-B/32 (151 M parameters) with random weights, OpenAI's BPE tokenizer (see `bpe`;
    `bpe` defaults to the installed open_clip's file) and the published image processor, saved to `out`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = write_clip_tokenizer(out, bpe)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(**CLIP_B32)).eval().save_pretrained(out)
    CLIPImageProcessor(**CLIP_IMAGE_PROCESSOR).save_pretrained(out)
    return out


def make_clap_fused(out: str | Path, seed: int = 0) -> Path:
    """CLAP HTSAT-fused (HTS-AT audio tower with fusion, RoBERTa-base text tower) with random weights
    and the published feature extractor, saved to `out`."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ClapModel(ClapConfig(**CLAP_FUSED)).eval().save_pretrained(out)
    ClapFeatureExtractor(**CLAP_FEATURE_EXTRACTOR).save_pretrained(out)
    return out
