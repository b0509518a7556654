"""Layer forward+backward: LoRAMoE (formula, fused backend) vs a per-expert loop vs the
frozen base vs one LoRA.

    python benchmarks/bench_layer.py [--tokens 2048] [--repeats 30] [--dropout 0.05]
        [--dtype fp32|bf16]

All variants run side by side in one process, interleaved, on the same input (which requires
grad, as inside a network), in training mode with the paper's dropout 0.05. Prints median
milliseconds and the ratios. The frozen base's GEMMs are torch's stock ones in every
variant. Whether a backend stays is decided on the whole train step, not here
(benchmarks/bench_backends.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

try:  # minor page faults per step: allocator effects show up here, not in the FLOP count
    from resource import RUSAGE_SELF, getrusage
except ImportError:  # pragma: no cover - Windows
    getrusage = None

import copy

import torch
from arguments import at_least, fraction
from torch import nn

from loramoe import LoRAMoEConfig
from loramoe.backends import select_backend
from loramoe.layer import LoRAMoELinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoopLoRAMoE(nn.Module):
    """The official implementation's shape: one Python iteration and two GEMMs per expert."""

    def __init__(self, base: nn.Linear, config: LoRAMoEConfig) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.router = nn.Linear(base.in_features, config.num_experts, bias=False)
        self.A = nn.ModuleList(nn.Linear(base.in_features, config.rank, bias=False)
                               for _ in range(config.num_experts))
        self.B = nn.ModuleList(nn.Linear(config.rank, base.out_features, bias=False)
                               for _ in range(config.num_experts))
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling

    def forward(self, x):
        result, x = self.base(x), x.to(self.router.weight.dtype)  # adapters in fp32
        weights = torch.softmax(self.router(x), dim=-1, dtype=torch.float32).to(x.dtype)
        for i, (a, b) in enumerate(zip(self.A, self.B, strict=True)):
            expert = weights[..., i : i + 1] * b(a(self.dropout(x))) * self.scaling
            result = result + expert.to(result.dtype)
        return result


class SingleLoRA(nn.Module):
    """Plain LoRA, the way PEFT computes it: base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.B.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        lora = self.B(self.A(self.dropout(x.to(self.A.weight.dtype)))) * self.scaling
        return self.base(x) + lora.to(x.dtype)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None
    module(x).backward(grad)


def minor_faults() -> int:
    return getrusage(RUSAGE_SELF).ru_minflt if getrusage is not None else 0


def measure(variants: dict[str, nn.Module], x, grad, repeats: int):
    """Median ms per variant, and mean minor page faults per step."""
    for module in variants.values():  # warm-up
        for _ in range(3):
            fwd_bwd(module, x, grad)
    times: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, int] = dict.fromkeys(variants, 0)
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for name, module in variants.items():
            faults_before = minor_faults()
            start = time.perf_counter()
            fwd_bwd(module, x, grad)
            times[name].append(time.perf_counter() - start)
            faults[name] += minor_faults() - faults_before
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    if getrusage is None:  # not measurable here: say so rather than print zeros
        return ms, dict.fromkeys(variants, float("nan"))
    return ms, {name: count / repeats for name, count in faults.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=at_least(1), default=2048)
    parser.add_argument("--d-in", type=at_least(1), default=576)
    parser.add_argument("--d-out", type=at_least(1), default=1536)
    parser.add_argument("--repeats", type=at_least(1), default=30)
    parser.add_argument("--dropout", type=fraction, default=0.05, help="paper: 0.05")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="the frozen weight's and the input's (adapters stay fp32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    config = LoRAMoEConfig(dropout=args.dropout)  # paper: N=6, r=4, alpha=32, dropout=0.05
    base = nn.Linear(args.d_in, args.d_out, bias=False).to(dtype)
    formula = LoRAMoELinear(base, config)
    with torch.no_grad():
        formula.lora_B.normal_(std=0.02)
    fused = copy.deepcopy(formula)
    fused.backend = select_backend("auto")
    variants = {
        "frozen base": base,
        "single LoRA r=4": SingleLoRA(base, config.rank, config.alpha, config.dropout),
        "LoRAMoE formula": formula,
        "LoRAMoE fused": fused,
        "LoRAMoE loop": LoopLoRAMoE(base, config),
    }
    for module in variants.values():
        module.train()
    x = torch.randn(args.tokens, args.d_in, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.d_out, dtype=dtype)
    ms, faults = measure(variants, x, grad, args.repeats)

    print(f"Layer fwd+bwd, N={config.num_experts}, r={config.rank}, {args.d_in}->{args.d_out}, "
          f"{args.tokens} tokens, dropout {args.dropout}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, value in ms.items():
        print(f"  {name:<18} {value:8.2f} ms   {faults[name]:8.0f} page faults/step")
    for name in ("LoRAMoE formula", "LoRAMoE fused"):
        print(f"  {name}: {ms['LoRAMoE loop'] / ms[name]:5.2f}x faster than the loop, "
              f"{ms[name] / ms['frozen base']:5.3f}x the frozen base, "
              f"{ms[name] / ms['single LoRA r=4']:5.2f}x single LoRA")


if __name__ == "__main__":
    main()
