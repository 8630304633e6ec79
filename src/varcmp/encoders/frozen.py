"""The frozen encoders: CLIP (frames, text) and CLAP (audio), loaded with
`from_pretrained(name_or_local_dir)` exactly as users load them."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import first_line

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_CLAP = "laion/clap-htsat-fused"

_VOLATILE = {"_name_or_path", "transformers_version", "_commit_hash", "architectures", "torch_dtype", "dtype"}


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers in our CLIs."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU; a named device is checked to exist here (ValueError,
    one line, otherwise). The one place every command picks its device."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (use --device auto or cpu)")
    if dev.type == "mps" and not mps:
        raise ValueError(f"--device {name}: MPS is not available here (use --device auto or cpu)")
    return dev


def config_hash(config) -> str:
    """A short hash of a model config that ignores where and with what it was saved."""

    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in sorted(d.items()) if k not in _VOLATILE}
        return d

    blob = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: tells checkpoints of the same architecture apart,
    whether they were loaded from the hub or from a local directory."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _load_error(name: str, what: str, e: Exception) -> RuntimeError:
    hint = "" if Path(name).expanduser().exists() else (
        " (a hub id needs the network or the local Hugging Face cache; otherwise pass a local directory)")
    return RuntimeError(f"cannot load {what} from {name!r}: {first_line(e)}{hint}")


def model_path_problem(flag: str, name: str | None) -> str | None:
    """The one line saying that a model option names a local folder that is not there (None when
    it is there, or is a hub id); checked before any work."""
    from ..media.plan import looks_local

    if name and looks_local(name) and not Path(name).expanduser().is_dir():
        return f"{flag} {name}: no such directory (give a local model directory or a hub id)"
    return None


def load_model(cls, name: str, what: str, model_type: str):
    """`cls.from_pretrained(name)`, refused (RuntimeError, one line) unless the checkpoint's config
    is of `model_type` and holds every weight: transformers would otherwise build the model from
    another model's config, or fill missing weights with random ones, and only log it."""
    from transformers import AutoConfig

    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        raise RuntimeError(f"cannot load {what} from {name!r}: no config.json in that folder (a {what} checkpoint "
                           "folder holds config.json and model.safetensors, as save_pretrained writes them)")
    try:
        found = AutoConfig.from_pretrained(name).model_type
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, what, e) from None
    if found != model_type:
        raise RuntimeError(f"cannot load {what} from {name!r}: not a {what} checkpoint (its config.json says "
                           f"model_type {found!r}, {what} is {model_type!r})")
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, what, e) from None
    # parameters only: a buffer the checkpoint lacks (position ids, an older file's) is made the same
    # way every time, not drawn at random
    params = dict(model.named_parameters())
    lost = sorted(k for k in info["missing_keys"] if k in params) + sorted(k for k, *_ in info["mismatched_keys"])
    if lost:
        raise RuntimeError(f"cannot load {what} from {name!r}: {len(lost)} weights are missing from the checkpoint "
                           f"or of another shape (e.g. {lost[0]}); they would be random")
    return model


def load_image_processor(name: str):
    """The checkpoint's own image processor (resize, centre crop, normalise), on the PIL backend:
    PIL's bicubic resize is what CLIP was trained with, and the result does not depend on
    whether torchvision happens to be installed."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, "the CLIP image processor", e) from None


def load_audio_feature_extractor(name: str):
    from transformers import ClapFeatureExtractor

    try:
        return ClapFeatureExtractor.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, "the CLAP feature extractor", e) from None


def preprocess_images(processor, images: list[np.ndarray]) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def preprocess_audio(extractor, windows: list[np.ndarray], rate: int) -> torch.Tensor:
    """Log-mel inputs of windows of at most 10 s (CLAP's `fusion` layout)."""
    if not windows:
        return torch.zeros(0)
    return extractor(windows, sampling_rate=rate, return_tensors="pt")["input_features"]


def clean_caption(text: str) -> str:
    """A caption as CLIP's own tokenizer cleans it before BPE (OpenAI's `basic_clean`: ftfy's text
    fixes, HTML entities unescaped twice): curly quotes, `&amp;` and mojibake get the ids CLIP was
    trained with. Lower case and runs of white space are the Hugging Face tokenizer's own work."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def tokenize(tokenizer, texts: list[str], max_words: int | None = None):
    """CLIP token ids (start and end included) and attention mask of cleaned captions: all of
    each without `max_words`; with it, padded or cut to `max_words` tokens, the end token kept
    last in a cut caption. The one tokenisation of extraction, search and `check-models`."""
    clean = [clean_caption(t) for t in texts]
    if max_words is None:
        return tokenizer(clean)
    return tokenizer(clean, padding="max_length", truncation=True, max_length=max_words, return_tensors="pt")


class ClipEncoder:
    """CLIP image and text towers; outputs live in the projected joint space."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoTokenizer, CLIPModel

        self.name, self.device = name, device
        self.model = load_model(CLIPModel, name, "CLIP", "clip").to(device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001
            raise _load_error(name, "the CLIP tokenizer", e) from None
        self.processor = load_image_processor(name)
        self.config_hash = config_hash(self.model.config)
        self.dim = self.model.config.projection_dim
        vc = self.model.config.vision_config
        self.num_patches = (vc.image_size // vc.patch_size) ** 2
        self.eos_token_id = self.model.config.text_config.eos_token_id

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected [CLS] ([B, C], equal to `get_image_features`) and patch tokens ([B, P, C])."""
        out = self.model.vision_model(pixel_values=pixel_values.to(self.device))
        tokens = self.model.visual_projection(self.model.vision_model.post_layernorm(out.last_hidden_state))
        return tokens[:, 0].float().cpu(), tokens[:, 1:].float().cpu()

    @torch.inference_mode()
    def encode_text(self, texts: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Word features [Q, L, C], word mask [Q, L] (start and end tokens included) and the
        sentence feature [Q, C] (the end token's word feature, equal to `get_text_features`)."""
        tok = tokenize(self.tokenizer, texts, max_words)
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        hidden = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        words = self.model.text_projection(hidden)
        if self.eos_token_id == 2:  # legacy configs: the end token has the largest id
            eos = ids.argmax(-1)
        else:
            eos = (ids == self.eos_token_id).int().argmax(-1)
        sentence = words[torch.arange(len(ids), device=ids.device), eos]
        return words.float().cpu(), mask.bool().cpu(), sentence.float().cpu()

    def cut(self, texts: list[str], max_words: int) -> list[int]:
        """Indices of the texts longer than `max_words` tokens (start/end included): `encode_text`
        keeps only their first `max_words` tokens."""
        return [i for i, ids in enumerate(tokenize(self.tokenizer, texts)["input_ids"]) if len(ids) > max_words]

    def info(self) -> dict:
        return {"name": self.name, "config_hash": self.config_hash, "weights_hash": weights_hash(self.model)}


class ClapEncoder:
    """CLAP audio tower (projected embeddings)."""

    def __init__(self, name: str, device: torch.device):
        from transformers import ClapModel

        self.name, self.device = name, device
        self.model = load_model(ClapModel, name, "CLAP", "clap").to(device).eval()
        self.extractor = load_audio_feature_extractor(name)
        self.config_hash = config_hash(self.model.config)
        self.dim = self.model.config.projection_dim
        self.rate = self.extractor.sampling_rate

    @torch.inference_mode()
    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """[B, Ca] for windows of at most 10 s; `is_longer` is passed as all False, so a batch's
        features never depend on which other clips share it."""
        x = input_features.to(self.device)
        is_longer = torch.zeros(len(x), 1, dtype=torch.bool, device=self.device)
        out = self.model.get_audio_features(input_features=x, is_longer=is_longer)
        out = getattr(out, "pooler_output", out)
        return out.float().cpu()

    def encode_windows(self, input_features: torch.Tensor, batch: int) -> np.ndarray:
        """[n, Ca] float32 embeddings of n windows' log-mel inputs (`preprocess_audio`), `batch`
        windows a forward: the one loop that extraction (a video's windows) and search (a query
        clip's windows) batch CLAP with. The batch size bounds memory only (see `encode`)."""
        if len(input_features) == 0:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat([self.encode(input_features[s:s + batch])
                          for s in range(0, len(input_features), batch)]).numpy()

    def info(self) -> dict:
        return {"name": self.name, "config_hash": self.config_hash, "weights_hash": weights_hash(self.model)}
