"""The trainer's records: read, checked row by row before any model is loaded, encoded."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from loramoe.data.collate import encode_records, warn_control_text
from loramoe.train.config import TrainConfig, TrainConfigError


def read_train_frame(config: TrainConfig):
    """The train file's records, checked before any model is loaded: text columns hold
    non-empty strings (records.check_records), and (LoRAMoE) every task type is an expert
    type or declared untyped."""
    from loramoe.data.records import RecordsError, check_records, read_records, row_examples

    path = config.train_file
    frame = read_records(Path(path))
    try:
        check_records(frame, "train", path, columns=("prompt", "response", "task_type"))
    except RecordsError as err:
        raise TrainConfigError(f"TrainConfig.train_file: {err}\nvalidate it with: "
                               f"python -m validation {path}") from None
    if config.method == "loramoe":
        known = set(config.loramoe.type_names) | set(config.untyped_task_types)
        bad = [i for i, v in enumerate(frame["task_type"]) if v not in known]
        if bad:
            found = sorted(set(frame["task_type"].iloc[bad]))
            raise TrainConfigError(
                f"TrainConfig.train_file: {path} has task type(s) {found} in {len(bad)} row(s) "
                f"({row_examples(frame, bad, 'task_type', path)}) that "
                f"TrainConfig.loramoe.expert_types {config.loramoe.type_names} does not name, "
                f"so those samples would train with no LBC term. Fix the data, add the types "
                f"to loramoe.expert_types, or list them in untyped_task_types on purpose")
    return frame


def encode_frame(config: TrainConfig, frame, tokenizer):
    """The rows encoded; warnings counting those whose response lies past max_length (the run
    trains on fewer than its rows), those it cuts short (they train without their
    end-of-turn marker) and those holding a control token's text (counted in the dataset's
    `control_text`); TrainConfigError when none is left."""
    dataset = encode_records(tokenizer, frame["prompt"].tolist(), frame["response"].tolist(),
                             frame["task_type"].tolist(), config.loramoe.type_names,
                             config.max_length)
    if len(dataset) == 0:
        raise TrainConfigError(f"TrainConfig.train_file: {config.train_file} has no usable "
                               f"examples (empty, or every response truncated by max_length)")
    if dataset.dropped:
        print(f"warning: {dataset.dropped} of {len(frame)} examples dropped: their response "
              f"lies past max_length ({config.max_length}) tokens", file=sys.stderr)
    if dataset.truncated:
        print(f"warning: {dataset.truncated} of {len(dataset)} examples lose their response's "
              f"end to max_length ({config.max_length}) tokens: they train without their "
              f"end-of-turn marker", file=sys.stderr)
    rows = warn_control_text(tokenizer, frame, ("prompt", "response"), "examples",
                             config.train_file)
    return dataclasses.replace(dataset, control_text=len(rows))
