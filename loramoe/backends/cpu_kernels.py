"""The adapter's products with the layer input x: a compiled CPU kernel, or torch ops.

With W = [Wg; A] (P, d_in), the router's and the experts' input weights stacked:

    forward   h_t = W·xᵀ (P, M): the router's rows on x, the experts' rows on dropout(x)
    backward  grad_W = gh_t·x (same rule), and the adapter's share of grad_x, gh_tᵀ·W, in
              which a dropped position gets only the router's share

In torch ops dropout costs a dropped copy of x in both passes and two GEMMs on x in each.
loramoe/csrc/adapter_cpu.cpp does each pass in one sweep over x and takes the dropped terms
(one in twenty) out of the experts' sums; docs/benchmarks.md has the measurements. It is
compiled on first use with torch's own extension builder (a C++ compiler and ninja; about
8 s, then cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), links
the OpenMP runtime torch already loaded and runs on torch's thread pool. `scripts/install.sh`
builds it ahead (`cpu_kernels.report()`).

The kernel serves float32 CPU tensors above MIN_MACS multiply-adds. Everything else (fp64,
GPUs, tiny decode-time products, a failed build, LORAMOE_CPU_KERNELS=0 or
`set_cpu_kernels(False)`) takes the torch-op path, which computes the same quantities; the
tests check both against a float64 reference. Numerically the kernel subtracts the dropped
terms from sums over all of x, so its rounding is that of a d_in-term fp32 dot product, as in
any GEMM; a non-finite input element makes its row non-finite even where it was dropped (as
nn.Dropout's x * mask does, unlike the torch-op path's zeroed copy).
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

from loramoe.backends.dropout import dropped_copy, zero_dropped_
from loramoe.backends.thin_gemm import MIN_MACS, fp32_cpu_outside_autograd, thin_mm

SOURCE = Path(__file__).parent / "csrc" / "adapter_cpu.cpp"
BUILD_NAME = "loramoe_cpu"  # + the ISA level, so builds for different CPUs do not collide

_enabled = os.environ.get("LORAMOE_CPU_KERNELS", "1") != "0"
_loaded: bool | None = None  # None: not tried yet


def arch_flags() -> list[str]:
    """Vector ISA flags for this CPU, as torch itself detected it (also names the build)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def build() -> bool:
    """Compile (or load the cached build of) the kernels once; False, with a warning, if that
    fails, in which case the torch-op path is used."""
    global _loaded
    if _loaded is None:
        _loaded = False
        try:
            from torch.utils.cpp_extension import load

            capability = torch.backends.cpu.get_cpu_capability().lower()
            load(f"{BUILD_NAME}_{capability}", [str(SOURCE)], is_python_module=False,
                 extra_cflags=["-O3", "-fopenmp", *arch_flags()], extra_ldflags=["-fopenmp"])
            _loaded = True
        except Exception as error:  # no compiler, no ninja, a read-only cache, ...
            warnings.warn(
                f"loramoe: the compiled CPU kernels are unavailable ({type(error).__name__}: "
                f"{str(error).strip()[:500]}); using torch ops instead, which is slower on "
                "CPU. Set LORAMOE_CPU_KERNELS=0 to skip the build.",
                RuntimeWarning, stacklevel=2,
            )
    return _loaded


def set_cpu_kernels(enabled: bool) -> bool:
    """Turn the compiled kernels on or off (e.g. to compare); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def cpu_kernels_enabled() -> bool:
    return _enabled


def use_kernel(x2d: torch.Tensor, w: torch.Tensor, dropped: torch.Tensor | None) -> bool:
    # Inside the fused node grad mode is off, except under create_graph, where the torch-op
    # path keeps the graph.
    return (
        _enabled
        and fp32_cpu_outside_autograd(x2d, w, x2d.shape[0] * x2d.shape[1] * w.shape[0],
                                      MIN_MACS)
        and x2d.is_contiguous() and w.is_contiguous()
        and (dropped is None or dropped.dtype == torch.int64)
        and build()
    )


_NOTHING_DROPPED = torch.empty(0, dtype=torch.int64)


def _positions(dropped: torch.Tensor | None) -> torch.Tensor:
    return dropped if dropped is not None else _NOTHING_DROPPED


def input_forward(x2d: torch.Tensor, w: torch.Tensor, n_clean: int,
                  dropped: torch.Tensor | None) -> torch.Tensor:
    """h_t (P, M) = W·xᵀ, its rows from n_clean on computed on dropout(x)."""
    if use_kernel(x2d, w, dropped):
        return torch.ops.loramoe_cpu.adapter_in_forward(x2d, w, n_clean, _positions(dropped))
    if dropped is None:
        return thin_mm(w, x2d.t())  # (P, M)
    return torch.cat([thin_mm(w[:n_clean], x2d.t()),
                      thin_mm(w[n_clean:], dropped_copy(x2d, dropped).t())])  # (P, M)


def input_backward(x2d: torch.Tensor, w: torch.Tensor, n_clean: int,
                   dropped: torch.Tensor | None, gh_t: torch.Tensor, need_grad_x: bool,
                   need_grad_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Given gh_t (P, M), the gradient of h_t: the adapter's grad_x (M, d), a fresh tensor
    the caller may accumulate into, and grad_W (P, d); None for what is not needed."""
    if use_kernel(x2d, w, dropped):
        grad_x, grad_w = torch.ops.loramoe_cpu.adapter_in_backward(
            x2d, w, n_clean, _positions(dropped), gh_t.contiguous(), need_grad_x, need_grad_w)
        return (grad_x if need_grad_x else None), (grad_w if need_grad_w else None)
    grad_x = grad_w = None
    if dropped is None:
        if need_grad_x:
            grad_x = thin_mm(gh_t.t(), w)  # (M, d)
        if need_grad_w:
            grad_w = thin_mm(gh_t, x2d)  # (P, d)
        return grad_x, grad_w
    if need_grad_x:  # the experts' share passes back through the dropout mask
        grad_x = zero_dropped_(thin_mm(gh_t[n_clean:].t(), w[n_clean:]), dropped)  # (M, d)
        grad_x.addmm_(gh_t[:n_clean].t(), w[:n_clean])
    if need_grad_w:
        grad_w = torch.cat([thin_mm(gh_t[:n_clean], x2d),
                            thin_mm(gh_t[n_clean:], dropped_copy(x2d, dropped))])  # (P, d)
    return grad_x, grad_w


def report() -> None:
    """Build now (scripts/install.sh calls this) and say what the layer will use."""
    ok = build()
    print(f"loramoe CPU kernels: {'built' if ok else 'NOT available, torch ops are used'} "
          f"({torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(arch_flags()) or 'none'})")
