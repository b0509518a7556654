"""Does each LoRAMoE backend pay its way? Whole train step on the default model, one run.

    python benchmarks/bench_backends.py [--batch 16] [--seq 64] [--repeats 10]

One LoRAMoE copy of SmolLM2-135M-Instruct (paper config, FFN targets), forward + backward +
AdamW step with the localized balancing loss, on the same batch. The variants swap the
layers' backend on that one model (`attach_backend`) and run interleaved, round after round,
so slow machine drift hits them alike; "frozen base" (no adapters, input embeddings require
grad) is the floor. The rule (docs/benchmarks.md): a backend stays only if it saves at least
5 % of the whole step against the formula, the layer's plain torch ops.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from arguments import at_least
from train_step import frozen_floor, make_step

from loramoe import LoRAMoEConfig, apply_loramoe, load_base_model
from loramoe.backends import attach_backend

Setup = Callable[[torch.nn.Module], None]


def variants() -> dict[str, Setup]:
    """Name -> a function that puts the model's layers on that variant. The candidates that
    did not pay (oneDNN routing, C++ kernels, the node with a dense dropout mask) were
    measured by this script at commit 873b938 and deleted: docs/benchmarks.md."""
    return {
        "formula (plain torch ops)": lambda model: attach_backend(model, None),
        "fused node + positions dropout": lambda model: attach_backend(model, "auto"),
    }


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--seq", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = load_base_model()
    ids = torch.randint(100, base.config.vocab_size, (args.batch, args.seq))
    frozen = frozen_floor(copy.deepcopy(base))
    frozen_step = make_step(frozen, ids, with_lbc=False)
    model = apply_loramoe(base, LoRAMoEConfig())
    moe_step = make_step(model, ids, with_lbc=True)
    setups = variants()

    def run(name: str) -> float:
        start = time.perf_counter()
        if name == "frozen base":
            frozen_step()
        else:
            setups[name](model)
            moe_step()
        return time.perf_counter() - start

    names = [*setups, "frozen base"]
    for name in names:  # warm-up: first shapes, first kernel builds
        run(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(run(name))
    report(times, args, names)


def report(times: dict[str, list[float]], args, names: list[str]) -> None:
    tokens = args.batch * args.seq
    ref = next(iter(times))
    print(f"Whole train step, SmolLM2-135M-Instruct + LoRAMoE (N=6, r=4, FFN), batch "
          f"{args.batch} x {args.seq}, fp32, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {cpu_name()}, {args.repeats} interleaved rounds")
    print(f"  {'variant':<34} {'ms/step':>9} {'tokens/s':>9} {'vs formula':>11} "
          f"{'saved (per round: median, range)':>34}")
    for name in names:
        ms = 1000 * statistics.median(times[name])
        saved = [1 - t / r for t, r in zip(times[name], times[ref], strict=True)]
        print(f"  {name:<34} {ms:9.1f} {tokens / ms * 1000:9.0f} "
              f"{ms / (1000 * statistics.median(times[ref])):10.3f}x "
              f"{100 * statistics.median(saved):+14.1f} % [{100 * min(saved):+.1f}, "
              f"{100 * max(saved):+.1f}]")
    print("  a backend stays if it saves >= 5 % of the whole step against the formula")


if __name__ == "__main__":
    main()
