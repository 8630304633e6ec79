"""Checkpoints: weights in safetensors with every setting embedded as JSON metadata
(plus a readable JSON copy beside them), written atomically. Loading never
executes code: safetensors holds tensors only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_write
from ..cache.reader import Cache, same_encoders
from ..cache_schema import SCHEMA_VERSION
from ..errors import VarcmpError
from . import ModelConfig, VarCMP

META_KEY = "varcmp"


class CheckpointError(VarcmpError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def cache_fingerprint(cache: Cache) -> dict:
    """What a checkpoint must agree on with any cache it is used with."""
    return {"schema_version": SCHEMA_VERSION, "spec": cache.meta["spec"], "encoders": cache.encoders,
            "preprocessing": cache.preprocessing}


def save(path: str | Path, model: VarCMP, meta: dict) -> Path:
    """Write `path` (.safetensors) and `path` with .json: weights, model config and `meta`."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    path = Path(path)
    full = {"varcmp_version": __version__, "model_config": asdict(model.cfg), **meta}
    text = json.dumps(full, indent=2, default=str)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={META_KEY: text}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def resolve(path: str | Path) -> Path:
    """A run directory means its best checkpoint (else its last); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no best.safetensors or last.safetensors in this run directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    return path


def read_meta(path: str | Path) -> dict:
    from safetensors import safe_open

    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001 - anything that is not a safetensors file
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({type(e).__name__})") from None
    if meta is None:
        raise CheckpointError(f"{path}: a safetensors file without varcmp metadata")
    return checked_meta(path, meta)


def checked_meta(path: Path, text: str) -> dict:
    """The metadata of checkpoint `path` (JSON `text`), checked before anything is built from it:
    a JSON object whose parts that varcmp reads are objects and whose model settings make a
    valid ModelConfig (types and ranges); else a one-line CheckpointError naming the field."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise CheckpointError(f"{path}: its varcmp metadata is not valid JSON ({type(e).__name__}: "
                              f"{str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its varcmp metadata is a JSON {_json_type(meta)}, not an object")
    if "model_config" not in meta:
        raise CheckpointError(f"{path}: its varcmp metadata has no model_config")
    for name in ("model_config", "data", "cache.spec", "cache.encoders"):
        _part(path, meta, name)
    for name, enc in _part(path, meta, "cache.encoders").items():
        if enc is not None and not isinstance(enc, dict):
            raise CheckpointError(f"{path}: metadata field cache.encoders.{name} must be an object or null, "
                                  f"got a JSON {_json_type(enc)}")
    model_config(path, meta)
    return meta


def _part(path: Path, meta: dict, name: str) -> dict:
    """The metadata's part `name` ("cache.spec": nested), {} when absent; a CheckpointError when
    it (or a part holding it) is not a JSON object."""
    value = meta
    for key in name.split("."):
        value = value.get(key, {})
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: metadata field {name} must be an object, got a JSON {_json_type(value)}")
    return value


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# what a checkpoint saved before these settings existed was made with (its metadata does not name them)
BEFORE_THEY_EXISTED = {"selector_cos": 1.0, "mil_k": "vadclip", "temporal_input": "frames", "anomaly_input": "frames",
                       "fine_input": "frames"}


def model_config(path: Path, meta: dict) -> ModelConfig:
    """The ModelConfig that checked metadata describes; a one-line CheckpointError names the setting."""
    from dataclasses import fields

    settings = {**BEFORE_THEY_EXISTED, **meta["model_config"]}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise CheckpointError(f"{path}: metadata field model_config.{unknown[0]} is not a setting of this varcmp "
                              f"version")
    try:
        return ModelConfig(**settings)
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata field model_config: {e}") from None


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[VarCMP, dict]:
    """Model (eval mode) and metadata from a checkpoint file or run directory."""
    from safetensors.torch import load_file

    path = resolve(path)
    meta = read_meta(path)
    model = VarCMP(model_config(path, meta))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def check_compatible(meta: dict, cache: Cache, path: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint trained on a cache of other encoders, dims or preprocessing."""
    want = meta.get("cache") or {}
    have = cache_fingerprint(cache)
    if not same_encoders(want.get("encoders"), have["encoders"]):
        raise CheckpointError(f"{path}: trained on features of other encoders ({_names(want.get('encoders'))}) "
                              f"than {cache.path} ({_names(have['encoders'])})")
    spec_w, spec_h = want.get("spec") or {}, have["spec"]
    for key in ("num_frames", "num_patches", "dim", "max_words", "audio_dim"):
        if spec_w.get(key) != spec_h.get(key):
            raise CheckpointError(f"{path}: trained with {key}={spec_w.get(key)}, but {cache.path} has "
                                  f"{key}={spec_h.get(key)}")


def _names(enc: dict | None) -> str:
    return ", ".join(f"{k}={v.get('name')}" for k, v in (enc or {}).items() if v) or "none recorded"
