"""Greedy generation speed on the default eval's generation subset, in questions per second.

    python benchmarks/bench_generation.py [--batches 16,64] [--dtype auto]

Builds the default config's eval set (flows/configs/default.toml), takes its generation
subset (12 knowledge facts per relation + every downstream item) and generates with the
default model at each batch size (one run): short-answer knowledge questions alone, then the
whole subset. Short answers stop at their first newline (loramoe/evaluate/stopping.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tomllib

from loramoe.data import build_mixture
from loramoe.evaluate.generation import generate_predictions
from loramoe.evaluate.run import generation_subset
from loramoe.model import load_base_model
from loramoe.pipeline import PipelineConfig
from loramoe.precision import resolve_dtype

CONFIGS = Path(__file__).resolve().parents[1] / "flows" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    config = PipelineConfig.from_dict(tomllib.loads((CONFIGS / "default.toml").read_text()),
                                      base_dir=CONFIGS)
    frame = generation_subset(build_mixture(config.mixture).eval, config.eval_generate_per_task)
    knowledge = frame[frame["task_type"] == "knowledge"].reset_index(drop=True)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer = load_base_model(config.base_model, dtype=dtype)
    generate_predictions(model, tokenizer, knowledge.head(8), batch_size=8)  # warm-up
    print(f"dtype {dtype}; {len(knowledge)} knowledge questions, {len(frame)} in all")
    for batch in (int(b) for b in args.batches.split(",")):
        for name, part in (("knowledge (short answers)", knowledge), ("whole subset", frame)):
            start = time.perf_counter()
            generate_predictions(model, tokenizer, part, batch_size=batch)
            seconds = time.perf_counter() - start
            print(f"batch {batch:>3}, {name}: {len(part)} in {seconds:.1f} s = "
                  f"{len(part) / seconds:.1f} questions/s")


if __name__ == "__main__":
    main()
