"""bf16 training on a CPU: torch's bf16 SDPA vs the fp32 attention product the trainer uses.

    python benchmarks/bench_attention.py [--methods sft,lora,loramoe] [--batches 4]
        [--rounds 3] [--threads 1]

Takes the default config's largest train scale, shuffled as the trainer does, and times the
trainer's own step (forward_batch in length pieces + LBC + backward; full SFT under bf16
autocast with fp32 master weights) on its first batches, per method, in three variants
interleaved round by round (one run): fp32 weights; bf16 with transformers' "sdpa"; bf16
with loramoe/backends/attention.py's fp32 product (what `train` picks on a CPU in bf16).
Prints seconds a step and the ratios. Needs a CPU with native bf16 (avx512_bf16 / amx_bf16).
--threads 1 is how a pipeline branch trains.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_length_pieces  # a sibling script: benchmarks/ is on sys.path
import torch
from arguments import (
    TRAINER_METHODS,
    at_least,
    listed,
)

from loramoe.backends.attention import NAME as ATTENTION
from loramoe.train.objective import ResponseLM

VARIANTS = {"fp32": ("fp32", False), "bf16 sdpa": ("bf16", False),
            "bf16 fp32-attention": ("bf16", True)}


def make_step(model, config, autocast: torch.dtype | None):
    return lambda batch: bench_length_pieces.step(model, batch, config, split=True,
                                                  autocast=autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=listed(TRAINER_METHODS), default="sft,lora,loramoe")
    parser.add_argument("--batches", type=at_least(1), default=4)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline, frame = bench_length_pieces.default_train_frame()
    print(f"trainer step, default model, {args.threads} thread(s), {args.batches} batches, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"  {'method':8} {'fp32 s':>7} {'bf16 sdpa s':>11} {'bf16 fp32-attn s':>16} "
          f"{'fp32-attn/sdpa':>14} {'bf16 speed-up (sdpa, fp32-attn)':>32}")
    for method in args.methods:
        steps, batches = {}, None
        for name, (dtype_name, fp32_attention) in VARIANTS.items():
            model, tokenizer, config, autocast = bench_length_pieces.trainer_model(
                pipeline, method, dtype_name, fp32_attention)
            if fp32_attention:
                assert model.config._attn_implementation == ATTENTION
            steps[name] = make_step(ResponseLM(model).train(), config, autocast)
            batches = batches or bench_length_pieces.first_batches(config, tokenizer, frame,
                                                                   args.batches)
        for step in steps.values():
            step(batches[0])  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for batch in batches:
                    step(batch)
                seconds[name].append((time.perf_counter() - start) / len(batches))
        fp32, sdpa, ours = (statistics.median(seconds[name]) for name in VARIANTS)
        print(f"  {method:8} {fp32:7.2f} {sdpa:11.2f} {ours:16.2f} {ours / sdpa:13.2f}x "
              f"{fp32 / sdpa:20.2f}x, {fp32 / ours:.2f}x")


if __name__ == "__main__":
    main()
