"""The trainer's records: read, checked row by row before any model is loaded, encoded."""

from __future__ import annotations

import sys
from pathlib import Path

from loramoe.data.collate import control_token_rows, encode_records
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
    end-of-turn marker) and those holding a control token's text; TrainConfigError when none
    is left."""
    dataset = encode_records(tokenizer, frame["prompt"].tolist(), frame["response"].tolist(),
                             frame["task_type"].tolist(), config.loramoe.type_names,
                             config.max_length)
    if len(dataset) == 0:
        raise TrainConfigError(f"TrainConfig.train_file: {config.train_file} has no usable "
                               f"examples (empty, or every response truncated by max_length)")
    if dropped := len(frame) - len(dataset):
        print(f"warning: {dropped} of {len(frame)} examples dropped: their response lies past "
              f"max_length ({config.max_length}) tokens", file=sys.stderr)
    if dataset.truncated:
        print(f"warning: {dataset.truncated} of {len(dataset)} examples lose their response's "
              f"end to max_length ({config.max_length}) tokens: they train without their "
              f"end-of-turn marker", file=sys.stderr)
    warn_control_tokens(frame, tokenizer, config.train_file)
    return dataset


def warn_control_tokens(frame, tokenizer, path) -> None:
    """A warning per control token (e.g. '<|im_end|>') whose text rows' prompts or responses
    hold: the tokenizer reads it as the token, so such a row trains a turn that ends (or
    changes role) where the text merely mentions it."""
    from loramoe.data.records import line_number

    texts = [f"{p}\n{r}" for p, r in zip(frame["prompt"], frame["response"], strict=True)]
    for token, rows in control_token_rows(tokenizer, texts).items():
        named = ", ".join(f"line {line_number(i, path)}" + (
            f" id={frame['id'].iloc[i]!r}" if "id" in frame else "") for i in rows[:3])
        print(f"warning: {len(rows)} of {len(frame)} examples hold the text {token!r}, which "
              f"the tokenizer reads as its control token, not as text ({path}: {named})",
              file=sys.stderr)
