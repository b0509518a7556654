"""The trainer's records: read, checked row by row before any model is loaded, encoded."""

from __future__ import annotations

from pathlib import Path

from loramoe.collate import encode_records
from loramoe.train_config import TrainConfig, TrainConfigError


def read_train_frame(config: TrainConfig):
    """The train file's records, checked before any model is loaded: text columns hold
    non-empty strings, and (LoRAMoE) every task type is an expert type or declared untyped."""
    from loramoe.data.records import is_text, line_number, read_records

    path = config.train_file
    frame = read_records(Path(path))
    missing = [c for c in ("prompt", "response", "task_type") if c not in frame.columns]
    if missing:
        raise TrainConfigError(f"TrainConfig.train_file: {path} lacks column(s) {missing}; "
                               f"validate it with: python -m validation {path}")

    def rows(bad: list[int]) -> str:
        ids = frame.get("id")
        return ", ".join(f"line {line_number(i, path)}"
                         + (f" (id {ids.iloc[i]!r})" if ids is not None else "")
                         for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")

    for column in ("prompt", "response", "task_type"):
        bad = [i for i, v in enumerate(frame[column]) if not is_text(v)]
        if bad:
            value = frame[column].iloc[bad[0]]
            raise TrainConfigError(
                f"TrainConfig.train_file: {path}: column '{column}' must hold non-empty "
                f"strings; {len(bad)} row(s) do not: {rows(bad)}, e.g. {value!r} "
                f"({type(value).__name__})")
    if config.method == "loramoe":
        known = set(config.loramoe.type_names) | set(config.untyped_task_types)
        bad = [i for i, v in enumerate(frame["task_type"]) if v not in known]
        if bad:
            found = sorted(set(frame["task_type"].iloc[bad]))
            raise TrainConfigError(
                f"TrainConfig.train_file: {path} has task type(s) {found} ({rows(bad)}) that "
                f"TrainConfig.loramoe.expert_types {config.loramoe.type_names} does not name, "
                f"so those samples would train with no LBC term. Fix the data, add the types "
                f"to loramoe.expert_types, or list them in untyped_task_types on purpose")
    return frame


def encode_frame(config: TrainConfig, frame, tokenizer):
    return encode_records(tokenizer, frame["prompt"].tolist(), frame["response"].tolist(),
                          frame["task_type"].tolist(), config.loramoe.type_names,
                          config.max_length)
