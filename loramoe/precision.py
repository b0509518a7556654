"""Which floating-point dtype to store frozen weights in, and on which device to compute.

    dtype = "auto" | "fp32" | "bf16" | "fp16"

"auto" picks bf16 where the hardware multiplies bf16 natively *and* faster — a CUDA GPU that
supports it, or an x86 CPU with AVX512-BF16 or AMX-BF16 (read from the CPU flags) on which a
measured bf16 matmul beats fp32 by BF16_MIN_SPEEDUP — and fp32 elsewhere. The flag alone is
not enough: on a 2-core Xeon VM that reports avx512_bf16 but hides AMX, a bf16 matmul ran at
134 vs 240 GFLOP/s for fp32 (0.56x), while a 2-core AMD EPYC with the same flag ran the
default pipeline 1.48x faster in bf16. The measurement (~0.2 s) is cached per CPU
(`cpu_kernels`: its model, flags and instruction-set caps), torch version and thread count
in the loramoe cache folder. fp16 is for GPUs only.
Asking for bf16/fp16 on hardware that lacks it is an error that says
what the machine does support, raised before any model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import cache
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Set, these pick other kernels on the same CPU, hence other speed and rounding: oneDNN's
# instruction-set cap (it runs bf16 matmuls; DNNL_ is its old name) and MKL's (fp32 matmuls)
KERNEL_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
BF16_MIN_SPEEDUP = 1.2  # margin: a noisy measurement near 1x should not flip the choice


class PrecisionError(ValueError):
    """The requested dtype or device cannot be used here; the message names the field."""


def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of Linux /proc/cpuinfo; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in text.splitlines()
                 if line.startswith(name)), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    return set((cpuinfo_field("flags") or "").split())


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def cpu_model_name() -> str:
    return cpuinfo_field("model name") or "unknown"


def cpu_kernels() -> str:
    """This CPU as torch picks its kernels: the model, its bf16 flags, the instruction set ATen
    dispatches to and any of KERNEL_CAPS set, e.g. "Intel(R) Xeon(R) Processor (amx_bf16
    avx512_bf16; ATen AVX512)". Where these differ, speed and rounding may differ: capped
    with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, an AMX Xeon multiplied bf16 at 0.54x fp32
    instead of 7.5x, and rounded otherwise (the default model in bf16 on one thread scored 95
    of the default mixture's 2,274 eval items differently); MKL_ENABLE_INSTRUCTIONS=AVX2
    changes fp32 products' last bits (docs/benchmarks.md §3)."""
    bf16 = " ".join(sorted(set(BF16_CPU_FLAGS) & cpu_flags())) or "no bf16 instructions"
    caps = [f"{name}={os.environ[name]}" for name in KERNEL_CAPS if os.environ.get(name)]
    kernels = "; ".join([bf16, f"ATen {torch.backends.cpu.get_cpu_capability()}", *caps])
    return f"{cpu_model_name()} ({kernels})"


def hardware_name(device: str | torch.device) -> str:
    """What computed on `device`, as far as speed and rounding go: the GPU's name (of that
    index: a machine may mix kinds), or the CPU as `cpu_kernels` names it."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_kernels()


def measure_bf16_speedup(rows: int = 1024, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a (rows×576)·(576×1536) matmul, the default model's FFN
    shape, best of `repeats` each after a warm-up."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(rows, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


@cache
def cpu_bf16_speedup() -> float:
    """The measured bf16 speed-up of this CPU, read from or written to the cache file."""
    from loramoe.model_paths import cache_root

    path = cache_root() / "cpu_bf16_speedup.json"
    key = f"{cpu_kernels()}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = round(measure_bf16_speedup(), 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)  # atomic: parallel branches may measure at once
    return float(known[key])


def cpu_prefers_bf16() -> bool:
    return cpu_has_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None, field: str = "device") -> torch.device:
    """`name` as a device this machine has (None: default_device), or PrecisionError naming
    `field`, before any model is loaded: torch's own errors for a CUDA device on a machine
    without one come only once a tensor moves (an AssertionError deep in a traceback)."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise PrecisionError(f"{field}: {name!r} is not a device (e.g. cpu, cuda, cuda:1)"
                             ) from None
    if device.type not in ("cpu", "cuda"):
        raise PrecisionError(f"{field}: {name!r}: loramoe computes on cpu or cuda")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= visible:
        raise PrecisionError(
            f"{field}: {name!r}, but torch {torch.__version__} sees {visible} CUDA GPU(s) here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use cpu{f' or cuda:0..{visible - 1}' if visible else ''}")
    return device


def supported(device: torch.device) -> list[str]:
    """The dtypes this device computes natively, fastest first."""
    if device.type == "cuda":
        return ["bf16", "fp16", "fp32"] if torch.cuda.is_bf16_supported() else ["fp16", "fp32"]
    return ["bf16", "fp32"] if cpu_has_native_bf16() else ["fp32"]


def native_or_auto(name: str, device: torch.device, what: str) -> str:
    """`name` where `device` computes it natively, else "auto", with a warning naming both:
    for serving, where answering in the precision this machine has beats not answering
    (evaluation keeps the run's dtype, so that its scores compare)."""
    if name == "auto" or name in supported(device):
        return name
    here = dtype_name(resolve_dtype("auto", device))
    print(f"warning: {what}: its train dtype {name!r} is not computed natively on this "
          f"{device.type} (it supports {supported(device)}); its frozen weights load as "
          f"'auto' = {here!r} here", file=sys.stderr)
    return "auto"


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype, DTYPES read backwards: torch.bfloat16 -> "bf16"."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def _where_not_native(device: torch.device, name: str) -> str:
    """The device, with why where it is a CPU: bf16 needs one of BF16_CPU_FLAGS, and the
    product has no fp16 path on CPUs (their fp16 instructions are another matter)."""
    if device.type == "cuda":
        return "this CUDA GPU"
    if name == "bf16":
        return f"this CPU (none of {'/'.join(BF16_CPU_FLAGS)})"
    return "a CPU (fp16 is for CUDA GPUs)"


def resolve_dtype(name: str, device: torch.device | None = None,
                  field: str = "TrainConfig.dtype") -> torch.dtype:
    """The torch dtype for `name` on `device` (default: the GPU if there is one)."""
    device = device or default_device()
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
        best = supported(device)[0]
        return DTYPES["fp32" if best == "fp16" else best]  # fp16 only when asked for
    if name not in DTYPES:
        raise PrecisionError(f"{field}: must be one of ['auto', 'fp32', 'bf16', 'fp16'], "
                             f"got {name!r}")
    if name not in supported(device):
        raise PrecisionError(f"{field}: {name!r} is not computed natively on "
                             f"{_where_not_native(device, name)}; it supports "
                             f"{supported(device)} (or 'auto')")
    return DTYPES[name]
