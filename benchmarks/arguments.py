"""Argument types the benchmarks share: a bad value stops with argparse's usage error naming
the option, before any model is built.

Without them `bench_precision.py --methods nope` timed the base trained in full under the
name "nope", `--repeats 0` ended in a StatisticsError after the models were built, `--batch
0` in a reshape error and an unknown dtype in a traceback. Imports only argparse: the GPU
machine runs these scripts with what it has.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]  # train.dtype's values (loramoe.precision)
# bench_length_pieces.trainer_model's methods ("frozen": the base alone, the floor)
TRAINER_METHODS = ["frozen", "sft", "lora", "loramoe"]
# bench_generation.with_adapters' methods ("base": no adapters)
ADAPTED_METHODS = ["base", "sft", "lora", "loramoe"]


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}"
                                             ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1) (a dropout rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {value}")
    return value


def listed(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """A comma-separated, non-empty list of names among `choices`."""
    known = list(choices)

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown} not among {known} (comma-separated)")
        return names
    return parse


def positive_ints(text: str) -> list[int]:
    """A comma-separated, non-empty list of integers >= 1."""
    return [at_least(1)(part.strip()) for part in text.split(",")]
