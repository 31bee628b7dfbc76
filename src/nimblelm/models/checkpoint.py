"""Checkpoints: a directory with config.json, model.safetensors and optionally tokenizer.json.

Weights are read with safetensors only (never unpickled). Weights stored in fp16/bf16 are
loaded as float32."""

from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig
from .lm import LanguageModel

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def save_model(model: LanguageModel, directory: str, weight_dtype: torch.dtype | None = None) -> None:
    """Write the checkpoint; files are written to temporaries and renamed, so an interrupted
    save never leaves a half-written checkpoint. ``weight_dtype`` (e.g. torch.bfloat16)
    stores floating weights compactly."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.lm_head is None:
            continue
        tensor = tensor.detach()
        if weight_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(weight_dtype)
        tensors[name] = tensor.contiguous().cpu()
    _atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config_text = json.dumps(model.config.to_dict(), indent=2) + "\n"
    _atomic_write(os.path.join(directory, CONFIG_FILE), lambda path: open(path, "w").write(config_text))
    if model.tokenizer is not None:
        _atomic_write(os.path.join(directory, TOKENIZER_FILE), model.tokenizer.save)


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def shipped_model_names() -> list[str]:
    """Names of the models that ship with nimblelm (``nl.load("nimble-code-attn")``)."""
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(n for n in os.listdir(SHIPPED_DIR) if os.path.isfile(os.path.join(SHIPPED_DIR, n, CONFIG_FILE)))


def resolve_model_path(name_or_path: str) -> str:
    """A checkpoint directory for a path (returned as is) or a shipped model's name."""
    if os.path.isdir(name_or_path) or os.sep in name_or_path or name_or_path.startswith("."):
        return name_or_path
    shipped = os.path.join(SHIPPED_DIR, name_or_path)
    if os.path.isdir(shipped):
        return shipped
    names = shipped_model_names()
    raise CheckpointError(f"{name_or_path!r} is neither a checkpoint directory nor a shipped model "
                          f"(shipped: {', '.join(names) if names else 'none in this checkout'})")


def load_model(directory: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LanguageModel:
    """Load a checkpoint directory written by :meth:`LanguageModel.save`, or a shipped model
    by name (see :func:`shipped_model_names`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_model_path(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist; pass a directory written by model.save()")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing; a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = ModelConfig.from_json(config_path)
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    try:
        tensors = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    model = LanguageModel(config)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{weights_path} does not fit {config_path}: {str(exc).splitlines()[-1].strip()}") from None
    missing = [m for m in missing if not (m == "lm_head.weight" and model.lm_head is None)]
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not fit {config_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device=device, dtype=dtype)
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(tokenizer_path)
    return model.eval()
