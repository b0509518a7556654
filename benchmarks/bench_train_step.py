"""Train step on the default model: LoRAMoE vs PEFT LoRA vs the frozen base alone.

    python benchmarks/bench_train_step.py [--batch 16] [--seq 64] [--repeats 12]

Every variant is a copy of SmolLM2-135M-Instruct on FFN targets (gate/up/down_proj), one
forward + backward + AdamW step on the same batch, interleaved in one process. "frozen base"
has no adapters and only the input embeddings' output requires grad, so the backward still
crosses every layer as any adapter method must: the physical floor. The LoRAMoE step includes
the localized balancing loss over every layer's router, as in training.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from arguments import at_least
from peft import LoraConfig, get_peft_model
from train_step import frozen_floor, interleaved, make_step

from loramoe import (
    LoRAMoEConfig,
    apply_loramoe,
    load_base_model,
)

FFN = ["gate_proj", "up_proj", "down_proj"]


def make_variants(base) -> dict[str, torch.nn.Module]:
    frozen = frozen_floor(copy.deepcopy(base))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=32, lora_dropout=0.05, target_modules=FFN, task_type="CAUSAL_LM"))
    loramoe = apply_loramoe(copy.deepcopy(base), LoRAMoEConfig())
    return {"frozen base": frozen, "PEFT LoRA r=4": lora, "LoRAMoE N=6 r=4": loramoe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--seq", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = load_base_model()
    ids = torch.randint(100, base.config.vocab_size, (args.batch, args.seq))
    steps = {name: make_step(m, ids, with_lbc=name.startswith("LoRAMoE"))
             for name, m in make_variants(base).items()}
    times = interleaved(steps, args.repeats)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq
    print(f"Train step, SmolLM2-135M-Instruct, FFN targets, batch {args.batch} x {args.seq} "
          f"tokens, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, value in ms.items():
        print(f"  {name:<18} {value:8.1f} ms   {tokens / value * 1000:7.0f} tokens/s")
    print("  ratio of medians; in brackets the same ratio within each round (steps run seconds")
    print("  apart, so slow machine drift cancels): median and range over the rounds")
    moe, lora, floor = "LoRAMoE N=6 r=4", "PEFT LoRA r=4", "frozen base"
    for label, num, den, target in [("LoRAMoE / PEFT LoRA", moe, lora, 1.10),
                                    ("LoRAMoE / frozen base", moe, floor, 1.15),
                                    ("PEFT LoRA / frozen base", lora, floor, None)]:
        paired = [x / y for x, y in zip(times[num], times[den], strict=True)]
        goal = f"  (target <= {target:.2f}x)" if target else ""
        print(f"  {label:<23} {ms[num] / ms[den]:6.3f}x  [{statistics.median(paired):.3f}, "
              f"{min(paired):.3f}-{max(paired):.3f}]{goal}")


if __name__ == "__main__":
    main()
