"""Layer forward+backward: fused LoRAMoE vs a per-expert loop vs frozen base vs one LoRA.

    python benchmarks/bench_layer.py [--tokens 2048] [--repeats 30] [--dropout 0.05]
                                     [--adapter-gemm onednn|mm] [--cpu-kernels on|off]

All variants run side by side in one process, interleaved, on the same input (which requires
grad, as inside a network), in training mode with the paper's dropout 0.05. Prints median
milliseconds and the ratios the targets are stated in. The frozen base's GEMMs are torch's
stock ones in every variant. To show what each part buys: --cpu-kernels off computes the
adapter's products with x with torch ops instead of the compiled kernels
(loramoe/cpu_kernels.py), and --adapter-gemm mm sends its other thin GEMMs (and, with the
kernels off, those too) to torch's mm instead of oneDNN (loramoe/thin_gemm.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

try:  # minor page faults per step: allocator effects show up here, not in the FLOP count
    from resource import RUSAGE_SELF, getrusage
except ImportError:  # pragma: no cover - Windows
    getrusage = None

import torch
from loramoe.cpu_kernels import build, set_cpu_kernels
from loramoe.thin_gemm import onednn_enabled, set_onednn
from torch import nn

from loramoe import LoRAMoEConfig
from loramoe.layer import LoRAMoELinear


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
        result = self.base(x)
        weights = torch.softmax(self.router(x), dim=-1, dtype=torch.float32).to(x.dtype)
        for i, (a, b) in enumerate(zip(self.A, self.B, strict=True)):
            result = result + weights[..., i : i + 1] * b(a(self.dropout(x))) * self.scaling
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
        return self.base(x) + self.B(self.A(self.dropout(x))) * self.scaling


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
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dropout", type=float, default=0.05, help="paper: 0.05")
    parser.add_argument("--adapter-gemm", choices=["onednn", "mm"], default="onednn",
                        help="route of the adapter's thin GEMMs (oneDNN falls back to mm "
                             "where torch lacks it)")
    parser.add_argument("--cpu-kernels", choices=["on", "off"], default="on",
                        help="the compiled kernels for the adapter's products with x")
    args = parser.parse_args()
    set_onednn(args.adapter_gemm == "onednn")
    set_cpu_kernels(args.cpu_kernels == "on")
    kernels = args.cpu_kernels == "on" and build()
    torch.manual_seed(0)
    config = LoRAMoEConfig(dropout=args.dropout)  # paper: N=6, r=4, alpha=32, dropout=0.05
    base = nn.Linear(args.d_in, args.d_out, bias=False)
    fused = LoRAMoELinear(base, config)
    with torch.no_grad():
        fused.lora_B.normal_(std=0.02)
    variants = {
        "frozen base": base,
        "single LoRA r=4": SingleLoRA(base, config.rank, config.alpha, config.dropout),
        "LoRAMoE fused": fused,
        "LoRAMoE loop": LoopLoRAMoE(base, config),
    }
    for module in variants.values():
        module.train()
    x = torch.randn(args.tokens, args.d_in, requires_grad=True)
    grad = torch.randn(args.tokens, args.d_out)
    ms, faults = measure(variants, x, grad, args.repeats)

    print(f"Layer fwd+bwd, N={config.num_experts}, r={config.rank}, {args.d_in}->{args.d_out}, "
          f"{args.tokens} tokens, dropout {args.dropout}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, adapter GEMMs: {'oneDNN' if onednn_enabled() else 'mm'}, "
          f"products with x: {'compiled kernels' if kernels else 'torch ops'}")
    for name, value in ms.items():
        print(f"  {name:<18} {value:8.2f} ms   {faults[name]:8.0f} page faults/step")
    loop_ratio = ms["LoRAMoE loop"] / ms["LoRAMoE fused"]
    base_ratio = ms["LoRAMoE fused"] / ms["frozen base"]
    lora_ratio = ms["LoRAMoE fused"] / ms["single LoRA r=4"]
    print(f"  speed-up vs loop        {loop_ratio:5.2f}x  (target >= 2.2x)")
    print(f"  fused / frozen base     {base_ratio:5.3f}x  (target <= 1.15x)")
    print(f"  fused / single LoRA     {lora_ratio:5.2f}x")


if __name__ == "__main__":
    main()
