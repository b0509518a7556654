"""Greedy generation speed on the default eval's generation subset, in questions per second.

    python benchmarks/bench_generation.py [--batches 16,64] [--dtype auto]
        [--methods base,lora,loramoe] [--threads 1]

Builds the default config's eval set (flows/configs/default.toml), takes its generation
subset (12 knowledge facts per relation + every downstream item) and generates with the
default model at each batch size (one run): short-answer knowledge questions alone, then the
whole subset. Short answers stop at their first newline (loramoe/evaluate/stopping.py).
With --methods, also with each method's adapters attached as the trainer attaches them (B
filled with small seeded random values, so the adapters' path computes something): the
speed of a tuned branch's evaluation. --threads 1 is how a pipeline branch evaluates.
"""

from __future__ import annotations

import argparse
import time

import torch
from arguments import (
    ADAPTED_METHODS,
    PRECISIONS,
    at_least,
    listed,
    positive_ints,
)
from default_config import default_pipeline  # a sibling script: benchmarks/ is on sys.path

from loramoe.data import build_mixture
from loramoe.evaluate.generation import generate_predictions
from loramoe.evaluate.run import generation_subset
from loramoe.model import load_base_model
from loramoe.precision import resolve_dtype
from loramoe.train.builders import add_adapters
from loramoe.train.config import TrainConfig


def with_adapters(model, base_model: str, method: str):
    """`model` with `method`'s adapters (none for "base"), their B seeded non-zero."""
    if method == "base":
        return model
    torch.manual_seed(0)
    model = add_adapters(model, TrainConfig(model=base_model, method=method))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=positive_ints, default="16,64")
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto")
    parser.add_argument("--methods", type=listed(ADAPTED_METHODS), default="base")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = default_pipeline()
    frame = generation_subset(build_mixture(config.mixture).eval, config.eval_generate_per_task)
    knowledge = frame[frame["task_type"] == "knowledge"].reset_index(drop=True)
    dtype = resolve_dtype(args.dtype)
    print(f"dtype {dtype}, {torch.get_num_threads()} thread(s); {len(knowledge)} knowledge "
          f"questions, {len(frame)} in all")
    for method in args.methods:
        model, tokenizer = load_base_model(config.base_model, dtype=dtype)
        model = with_adapters(model, config.base_model, method)
        generate_predictions(model, tokenizer, knowledge.head(8), batch_size=8)  # warm-up
        for batch in args.batches:
            for name, part in (("knowledge (short answers)", knowledge), ("whole subset", frame)):
                start = time.perf_counter()
                generate_predictions(model, tokenizer, part, batch_size=batch)
                seconds = time.perf_counter() - start
                print(f"{method}, batch {batch:>3}, {name}: {len(part)} in {seconds:.1f} s = "
                      f"{len(part) / seconds:.1f} questions/s")


if __name__ == "__main__":
    main()
