"""Does positions dropout pay its way in the LoRA baseline? Whole train steps, one run.

    python benchmarks/bench_lora_dropout.py [--dtypes bf16,fp32] [--repeats 8]
        [--trainer-rounds 4] [--batches 4] [--threads 1]

PEFT LoRA (r = 4, α = 32, dropout 0.05 on the FFN linears) with its `lora_dropout` as PEFT
builds it (nn.Dropout: a random number per element of every adapted layer's input) and as
the trainer now builds it (loramoe/backends/dropout.py's PositionsDropout: the same law from
a twentieth of the draws). The two are swapped on one model between steps, interleaved round
after round. Two settings:

1. `train_step.py`'s step on one random batch (16 × 64), the model built as
   bench_precision.py builds it, 2 threads;
2. the trainer's own step (length pieces) on the default mixture's first batches, the
   model built by the trainer's builders, `--threads` (1: as a pipeline branch).

The rule (docs/benchmarks.md): it stays only if it saves at least 5 % of a whole step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_length_pieces  # sibling scripts: benchmarks/ is on sys.path
import torch
from arguments import at_least, listed
from bench_precision import build
from torch import nn
from train_step import make_step

from loramoe.backends.dropout import PositionsDropout
from loramoe.train.objective import ResponseLM

VARIANTS = {"nn.Dropout": nn.Dropout, "positions": PositionsDropout}


def set_dropout(model: nn.Module, kind: type[nn.Dropout]) -> None:
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            for key, dropout in module.items():
                module[key] = kind(dropout.p)


def timed(steps: dict, rounds: int) -> dict:
    """{key: (model, run)}: seconds per call of run after switching model's dropout to the
    key's variant, interleaved over rounds after one warm-up call each."""
    def call(key):
        model, run = steps[key]
        set_dropout(model, VARIANTS[key[-1]])
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    for key in steps:
        call(key)
    seconds: dict = {key: [] for key in steps}
    for _ in range(rounds):
        for key in steps:
            seconds[key].append(call(key))
    return seconds


def random_batch_steps(args) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(100, 49_152, (args.batch, args.seq))
    steps = {}
    for dtype in args.dtypes:
        model, _ = build("PEFT LoRA", dtype)
        step = make_step(model, ids, False, lr=1e-5)
        for variant in VARIANTS:
            steps[(dtype, variant)] = (model, step)
    return timed(steps, args.repeats)


def trainer_steps(args) -> dict:
    torch.set_num_threads(args.threads)
    pipeline, frame = bench_length_pieces.default_train_frame()
    steps = {}
    for dtype_name in args.dtypes:
        model, tokenizer, config, autocast = bench_length_pieces.trainer_model(
            pipeline, "lora", dtype_name)
        batches = bench_length_pieces.first_batches(config, tokenizer, frame, args.batches)
        run = bench_length_pieces.steps_on(ResponseLM(model).train(), batches, config,
                                           autocast)
        for variant in VARIANTS:
            steps[(dtype_name, variant)] = (model, run)
    seconds = timed(steps, args.trainer_rounds)
    return {key: [s / args.batches for s in values] for key, values in seconds.items()}


def report(title: str, times: dict) -> None:
    print(title)
    print(f"  {'dtype':<5} {'nn.Dropout ms':>13} {'positions ms':>13} {'saved':>7}"
          f"  (per round: median, range)")
    for dtype in dict.fromkeys(key[0] for key in times):
        before, after = times[(dtype, "nn.Dropout")], times[(dtype, "positions")]
        saved = [1 - a / b for a, b in zip(after, before, strict=True)]
        print(f"  {dtype:<5} {1000 * statistics.median(before):13.1f} "
              f"{1000 * statistics.median(after):13.1f} "
              f"{1 - statistics.median(after) / statistics.median(before):7.1%}"
              f"  ({statistics.median(saved):.1%}, {min(saved):.1%} to {max(saved):.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--seq", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=8)
    parser.add_argument("--dtypes", type=listed(["bf16", "fp32"]), default="bf16,fp32")
    parser.add_argument("--trainer-rounds", type=at_least(0), default=4)
    parser.add_argument("--batches", type=at_least(1), default=4)
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    header = f"PEFT LoRA on SmolLM2-135M-Instruct, torch {torch.__version__}"
    if args.repeats:
        report(f"1. train_step.py, random batch {args.batch} x {args.seq}, 2 threads, "
               f"{args.repeats} rounds, {header}", random_batch_steps(args))
    if args.trainer_rounds:
        report(f"2. the trainer's step, default mixture, first {args.batches} batches, "
               f"{args.threads} thread(s), {args.trainer_rounds} rounds, ms per batch, "
               f"{header}", trainer_steps(args))


if __name__ == "__main__":
    main()
