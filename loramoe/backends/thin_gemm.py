"""Matrix products with one thin side (6–30 wide): the adapter's GEMMs, routed to oneDNN.

An adapter's GEMMs have one dimension of N·r = 24 or N + N·r = 30. torch's CPU `mm` hands
fp32 to MKL; on the AMD EPYC CI machine MKL runs these thin shapes at ≈ 110–155 GFLOP/s (and
square-ish ones at ≈ 210–220), while oneDNN's JIT kernels (already inside every CPU build of
torch, reachable through `torch.ops.mkldnn._linear_pointwise`) run the same thin shapes at
≈ 300–440 (docs/benchmarks.md). Both are plain
IEEE fp32 with fp32 accumulation; only the summation order differs.

Used for the adapter's own products only, never for the frozen base layer's, so the base
computes exactly what the stock layer computes. Falls back to `mm` for small products
(oneDNN's per-call overhead, ≈ 10 µs, loses below ≈ 1M multiply-adds: decoding one token),
for any dtype other than fp32, off the CPU, when torch lacks the op, or when disabled with
LORAMOE_ONEDNN=0 or `set_onednn(False)`.
"""

from __future__ import annotations

import os

import torch

# Below this many multiply-adds MKL's lower call overhead wins (measured: M=64 rows is even).
MIN_MACS = 1 << 20

_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_available = _linear is not None and torch.backends.mkldnn.is_available()
_enabled = _available and os.environ.get("LORAMOE_ONEDNN", "1") != "0"


def set_onednn(enabled: bool) -> bool:
    """Turn the oneDNN route on or off (e.g. to compare); returns the previous setting."""
    global _enabled
    previous = _enabled
    _enabled = _available and bool(enabled)
    return previous


def onednn_enabled() -> bool:
    return _enabled


def fp32_cpu_outside_autograd(a: torch.Tensor, b: torch.Tensor, macs: int,
                              min_macs: int) -> bool:
    """Whether a product of a and b (macs multiply-adds) may leave torch's stock ops: both
    fp32 on CPU, at least min_macs, and no graph being recorded through them (neither
    oneDNN's op nor loramoe's compiled kernels have an autograd formula)."""
    return (
        a.dtype == b.dtype == torch.float32
        and a.device.type == "cpu"
        and macs >= min_macs
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )


def thin_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias (P,)) for 2-d a (M, K) and b (K, P), either may be a transposed view."""
    if _enabled and fp32_cpu_outside_autograd(a, b, a.shape[0] * a.shape[1] * b.shape[1],
                                              MIN_MACS):
        # _linear_pointwise(input, weight) computes input @ weightᵀ, weight (P, K).
        return _linear(a, b.t(), bias, "none", [], "")  # (M, P)
    return a.mm(b) if bias is None else torch.addmm(bias, a, b)
