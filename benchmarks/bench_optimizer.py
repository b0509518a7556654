"""torch's default AdamW vs its fused one inside the whole train step, one run.

    python benchmarks/bench_optimizer.py [--batch 8] [--seq 96] [--repeats 6] [--threads 1]

Full SFT on the default model as the trainer runs it (fp32 master weights, bf16 autocast on a
CPU with native bf16, else fp32) and LoRAMoE (bf16 frozen base, fp32 adapters), each built
twice, once per optimizer; the steps run interleaved, round after round. Prints the median
ms/step and fused / default per method: the trainer uses fused AdamW on CPU
(loramoe/train/builders.py) because of this ratio. --threads 1 is how a pipeline branch trains.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from arguments import at_least
from train_step import interleaved, make_step

from loramoe import LoRAMoEConfig, apply_loramoe, load_base_model
from loramoe.precision import resolve_dtype


def build(method: str, fused: bool, ids: torch.Tensor):
    """One method's step closure with the default (fused=False) or fused AdamW."""
    bf16 = resolve_dtype("auto") == torch.bfloat16
    if method == "sft":
        model, _ = load_base_model(dtype=torch.float32)
        return make_step(model, ids, False, autocast=torch.bfloat16 if bf16 else None,
                         fused=fused)
    model, _ = load_base_model(dtype=torch.bfloat16 if bf16 else torch.float32)
    apply_loramoe(model, LoRAMoEConfig())
    return make_step(model, ids, True, fused=fused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--seq", type=at_least(1), default=96)
    parser.add_argument("--repeats", type=at_least(1), default=6)
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(100, 10_000, (args.batch, args.seq))  # (B, T)
    print(f"{torch.get_num_threads()} thread(s), batch {args.batch} x {args.seq} tokens, "
          f"frozen/compute dtype {resolve_dtype('auto')}")
    for method in ("sft", "loramoe"):
        steps = {name: build(method, name == "fused", ids) for name in ("default", "fused")}
        times = interleaved(steps, args.repeats)
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ratio = median["fused"] / median["default"]
        print(f"{method}: default AdamW {median['default']:.0f} ms/step, fused "
              f"{median['fused']:.0f} ms/step, fused / default {ratio:.3f}")


if __name__ == "__main__":
    main()
