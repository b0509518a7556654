"""Where an adapter method's train step spends its time beyond the frozen base's, per op.

    python benchmarks/profile_overhead.py [--method loramoe] [--dtype auto] [--rounds 3]
        [--batches 4] [--threads 1] [--shapes] [--top 30]

Builds the frozen base and `--method` as the trainer builds them (bench_length_pieces.
trainer_model), runs the trainer's step (length pieces, LBC, backward) on the default
mixture's first batches under torch.profiler, the two models interleaved round by round, and
prints each op's self CPU time a step for both and the difference, largest first (--shapes:
grouped by input shapes too). A diagnostic for choosing what to optimise, not a benchmark:
the profiler adds a few microseconds to every op, which inflates the method with more ops;
wall times from benchmarks/bench_precision.py --workload trainer are the measurement.
"""

from __future__ import annotations

import argparse
import collections
import time

import bench_length_pieces  # a sibling script: benchmarks/ is on sys.path
import torch
from arguments import PRECISIONS, at_least
from torch.profiler import ProfilerActivity, profile

from loramoe.train.objective import ResponseLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="loramoe", choices=["lora", "loramoe", "sft"])
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--batches", type=at_least(1), default=4)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--shapes", action="store_true")
    parser.add_argument("--top", type=at_least(1), default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline, frame = bench_length_pieces.default_train_frame()
    runs, batches = {}, None
    for method in ("frozen", args.method):
        model, tokenizer, config, autocast = bench_length_pieces.trainer_model(
            pipeline, method, args.dtype)
        batches = batches or bench_length_pieces.first_batches(config, tokenizer, frame,
                                                               args.batches)
        runs[method] = (ResponseLM(model).train(), config, autocast)
    self_ms = {method: collections.Counter() for method in runs}
    wall_ms = {method: [] for method in runs}
    for model, config, autocast in runs.values():  # warm-up
        bench_length_pieces.step(model, batches[0], config, True, autocast)
    for _ in range(args.rounds):
        for method, (model, config, autocast) in runs.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                start = time.perf_counter()
                for batch in batches:
                    bench_length_pieces.step(model, batch, config, True, autocast)
                wall_ms[method].append(1000 * (time.perf_counter() - start) / len(batches))
            for event in prof.key_averages(group_by_input_shape=args.shapes):
                key = event.key + (f" {event.input_shapes}" if args.shapes else "")
                self_ms[method][key] += (event.self_cpu_time_total / 1000
                                         / len(batches) / args.rounds)
    report(self_ms, wall_ms, "frozen", args.method, args.top)


def report(self_ms, wall_ms, floor: str, method: str, top: int) -> None:
    print("wall ms a step (under the profiler), per round: "
          + "; ".join(f"{m} {', '.join(f'{t:.0f}' for t in wall_ms[m])}" for m in wall_ms))
    print(f"self CPU ms a step: {floor} {sum(self_ms[floor].values()):.1f}, "
          f"{method} {sum(self_ms[method].values()):.1f}")
    keys = set(self_ms[floor]) | set(self_ms[method])
    diff = {key: self_ms[method][key] - self_ms[floor][key] for key in keys}
    print(f"  {'+ms':>7} {method:>9} {floor:>9}  op")
    for key in sorted(keys, key=lambda k: -abs(diff[k]))[:top]:
        print(f"  {diff[key]:7.1f} {self_ms[method][key]:9.1f} {self_ms[floor][key]:9.1f}  "
              f"{key[:160]}")


if __name__ == "__main__":
    main()
