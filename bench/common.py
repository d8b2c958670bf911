"""Helpers shared by the benchmarks: the default model, a fixed prompt set, results files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(), "torch": torch.__version__}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(min(times), 4)


def alternating(names: list[str], rounds: int) -> Iterator[str]:
    """`names` in order in even rounds and reversed in odd ones, so that neither variant always runs first."""
    for r in range(rounds):
        yield from (names if r % 2 == 0 else names[::-1])


def paired_speedup(baseline: list[float], candidate: list[float]) -> dict:
    """The median and quartiles of baseline / candidate time ratios taken pair by pair (a machine whose speed drifts
    between pairs still gives a paired figure)."""
    ratios = sorted(a / b for a, b in zip(baseline, candidate, strict=True))
    quarter = len(ratios) // 4
    return {"paired_speedup_median": round(statistics.median(ratios), 3),
            "paired_speedup_quartiles": [round(ratios[quarter], 3), round(ratios[-quarter - 1], 3)]}
