"""Which floating-point dtype to store frozen weights in, and on which device to compute.

    dtype = "auto" | "fp32" | "bf16" | "fp16"

"auto" picks bf16 where the hardware multiplies bf16 natively — a CUDA GPU that supports it,
or an x86 CPU with AVX512-BF16 or AMX-BF16 (read from the CPU flags) — and fp32 elsewhere.
fp16 is for GPUs only. Asking for bf16/fp16 on hardware that lacks it is an error that says
what the machine does support, raised before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """The requested dtype or device cannot be used here; the message names the field."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def supported(device: torch.device) -> list[str]:
    """The dtypes this device computes natively, fastest first."""
    if device.type == "cuda":
        return ["bf16", "fp16", "fp32"] if torch.cuda.is_bf16_supported() else ["fp16", "fp32"]
    return ["bf16", "fp32"] if cpu_has_native_bf16() else ["fp32"]


def resolve_dtype(name: str, device: torch.device | None = None,
                  field: str = "TrainConfig.dtype") -> torch.dtype:
    """The torch dtype for `name` on `device` (default: the GPU if there is one)."""
    device = device or default_device()
    if name == "auto":
        best = supported(device)[0]
        return DTYPES["fp32" if best == "fp16" else best]  # fp16 only when asked for
    if name not in DTYPES:
        raise PrecisionError(f"{field}: must be one of ['auto', 'fp32', 'bf16', 'fp16'], "
                             f"got {name!r}")
    if name not in supported(device):
        where = (f"this {device.type.upper()}" if device.type == "cuda" else
                 "this CPU (no avx512_bf16/amx_bf16 flag)")
        raise PrecisionError(f"{field}: {name!r} is not computed natively on {where}; it "
                             f"supports {supported(device)} (or 'auto')")
    return DTYPES[name]
