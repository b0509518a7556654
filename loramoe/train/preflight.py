"""What a training needs, checked before any model is loaded: its length against its
snapshot steps, its adapters' target modules against the base model's architecture, and
its rows against max_length."""

from __future__ import annotations

import math
from typing import NamedTuple

from loramoe.train.config import TrainConfig, TrainConfigError


def run_length(config: TrainConfig, examples: int, processes: int) -> int:
    """The run's optimizer steps over `examples` samples on `processes` processes."""
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(examples / (config.batch_size * processes * config.grad_accum))
    return max(1, math.ceil(per_epoch * config.epochs))


def check_snapshots(config: TrainConfig, examples: int, processes: int, bound: str = "") -> None:
    """TrainConfigError for snapshot steps past the run's end; `bound` says the end is an
    upper bound (the rows read, before encoding drops any)."""
    steps = run_length(config, examples, processes)
    if late := [s for s in config.snapshot_steps if s > steps]:
        raise TrainConfigError(
            f"TrainConfig.snapshot_steps: {late} lie past the run's {bound}{steps} optimizer "
            f"steps ({examples} examples, epochs {config.epochs}, batch_size "
            f"{config.batch_size} x grad_accum {config.grad_accum} x {processes} process(es))")


def check_targets(config: TrainConfig) -> None:
    """TrainConfigError naming LoRAMoE / LoRA target modules the base model lacks, found on its
    architecture alone (the meta device, no weights read): a wrong name failed the training
    only once the model had loaded and, in a pipeline, every branch of that method after the
    base evaluation. ModelNotAvailableError when the model's config cannot be read."""
    if config.method == "sft":
        return
    from loramoe.config import ConfigError
    from loramoe.injection import find_target_modules
    from loramoe.model import architecture

    try:
        find_target_modules(architecture(config.model), config.loramoe)
    except ConfigError as err:
        raise TrainConfigError(f"TrainConfig.loramoe: {err} (model {config.model!r})") from None


LENGTH_CHECK_ROWS = 10_000  # rows encoded per train set: every row up to it, a sample beyond


class LengthCut(NamedTuple):
    away: int  # rows whose response lies wholly past max_length: training drops them
    short: int  # rows whose response it cuts short: they train without their end
    checked: int


def count_cut(tokenizer, frame, max_length: int, limit: int = LENGTH_CHECK_ROWS) -> LengthCut:
    """What max_length does to the first `limit` rows of `frame`, as training encodes them
    (encode_records)."""
    from loramoe.data.collate import encode_records

    head = frame.head(limit)
    kept = encode_records(tokenizer, head["prompt"].tolist(), head["response"].tolist(),
                          head["task_type"].tolist(), [], max_length)
    return LengthCut(kept.dropped, kept.truncated, len(head))
