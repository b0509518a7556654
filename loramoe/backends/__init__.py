"""Acceleration for LoRAMoELinear, behind one seam.

A backend is a callable ``backend(layer, x)`` that returns what ``layer.formula(x)`` returns,
(out, router probabilities), or None when it does not cover the input; the layer then runs
the formula. loramoe/layer.py imports nothing from here: `apply_loramoe` attaches the backend
`select_backend` names, and `attach_backend` swaps it on a model (benchmarks, tests).

A backend stays only if it pays at least 5 % of a whole train step on the default model, on
the hardware it targets, measured against the formula in one run
(benchmarks/bench_backends.py; the table and the decisions are in docs/benchmarks.md).
"""

from __future__ import annotations

from torch import nn

BACKENDS = ("auto", "formula", "fused")


def select_backend(name: str = "auto"):
    """The backend called `name`; None for "formula" (the layer's plain torch ops).

    "auto" is the fused node, which itself only takes CPU or CUDA inputs in the base's dtype
    (fp32, fp64, bf16) on a plain frozen base and leaves everything else (fp16, autocast,
    hooked bases) to the formula.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {list(BACKENDS)}")
    if name == "formula":
        return None
    from loramoe.backends.fused import FusedBackend

    return FusedBackend()


def attach_backend(model: nn.Module, backend) -> None:
    """Give every LoRAMoE layer of `model` this backend (a name or a callable; None: formula)."""
    from loramoe.layer import LoRAMoELinear

    if isinstance(backend, str):
        backend = select_backend(backend)
    for module in model.modules():
        if isinstance(module, LoRAMoELinear):
            module.backend = backend
