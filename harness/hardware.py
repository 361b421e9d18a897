"""What the hardware computes natively: one answer for the trainer's `precision=auto` and QLoRA's compute dtype."""

from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX, from Linux's /proc/cpuinfo), not by emulation."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA Ampere or newer (compute capability >= 8), or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 autocast runs, but emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8 and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()
