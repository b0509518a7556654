"""The columns the suites check that the records do not hold as such: each text column's
type and string, answers counted, choices checked, train/eval overlap, token lengths and
control-token text (given a tokenizer); and which user column each one stands for."""

from __future__ import annotations

from typing import Any

import pandas as pd

from loramoe.data.records import (
    choices_ok,
    is_text,
    looks_like_serialized_list,
    normalize_answers,
    normalize_text,
)


def _n_answers(value: Any) -> int:
    answers = normalize_answers(value)
    return len(answers) if answers is not None else 0


def with_derived(frame: pd.DataFrame, kind: str, tokenizer, train_prompts: set[str] | None
                 ) -> pd.DataFrame:
    """A copy of `frame` with the derived columns ('_'-prefixed) the expectations read."""
    frame = frame.reset_index(drop=True).copy()
    for col in ("id", "task", "task_type", "prompt", "response"):
        if col in frame:
            frame[f"_is_text_{col}"] = frame[col].map(is_text)
            # None for non-strings: the length rule skips them, the type rule reports them
            frame[f"_str_{col}"] = frame[col].map(lambda v: v if isinstance(v, str) else None)
    if kind == "train" and "response" in frame:
        frame["_serialized_list_response"] = frame["response"].map(looks_like_serialized_list)
    if kind == "eval" and "answers" in frame:
        frame["_n_answers"] = frame["answers"].map(_n_answers)
    if kind == "eval" and "choices" in frame:
        frame["_choices_ok"] = frame["choices"].map(choices_ok)
    if kind == "eval" and train_prompts is not None and "prompt" in frame:
        frame["_in_train"] = frame["prompt"].astype(str).map(normalize_text).isin(train_prompts)
    if tokenizer is not None:  # text the tokenizer reads as a control token, per column
        from loramoe.data.collate import cell_text, control_token_rows

        for col in ("prompt", "response", "answers", "choices"):
            if col in frame:
                held = control_token_rows(tokenizer, frame[col].map(cell_text).tolist())
                rows = {i for found in held.values() for i in found}
                frame[f"_control_text_{col}"] = [i in rows for i in range(len(frame))]
    if tokenizer is not None and "prompt" in frame:
        target = frame.get("response", "")
        texts = (frame["prompt"].astype(str) + " " + pd.Series(target).astype(str)).tolist()
        frame["_n_tokens"] = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return frame


def shown_column(column: str | None) -> str | None:
    """The user's column behind a derived one (`_is_text_response` -> `response`)."""
    if column is None or not column.startswith("_"):
        return column
    for prefix in ("_is_text_", "_str_", "_serialized_list_", "_control_text_"):
        if column.startswith(prefix):
            return column[len(prefix):]
    return {"_n_answers": "answers", "_in_train": "prompt", "_n_tokens": "prompt",
            "_choices_ok": "choices"}[column]
