"""A task over a user's local file (jsonl/csv/parquet): its rows split train/test by a stable
hash of the prompt; a knowledge file's test rows are also probed (other rows' answers as the
multiple-choice distractors)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramoe.data.records import (
    EvalRecord,
    TrainRecord,
    is_text,
    line_number,
    normalize_answers,
    read_records,
)
from loramoe.data.registry import Task

if TYPE_CHECKING:
    from loramoe.data.mixture import TaskSpec


def _bad_row(spec: TaskSpec, index: int, column: str, value: Any, rule: str) -> None:
    from loramoe.data.mixture import MixtureError

    raise MixtureError(f"tasks[{spec.name!r}]: {spec.path} line {line_number(index, spec.path)}:"
                       f" column '{column}' must hold {rule}, got {value!r}")


def local_task(spec: TaskSpec) -> Task:
    """A task over a local file; rows split train/test by a stable hash of the prompt."""
    columns = {"prompt": "prompt", "response": "response", "answers": "answers", **spec.columns}

    def rows() -> dict[str, list[tuple[str, list[str]]]]:
        """The file's (prompt, answers) rows by split, read once per call."""
        frame = read_records(Path(spec.path))
        missing = [c for c in (columns["prompt"], columns["answers"]) if c not in frame.columns]
        if missing and not (columns["answers"] in missing and columns["response"] in frame):
            from loramoe.data.mixture import MixtureError

            raise MixtureError(f"tasks[{spec.name!r}]: {spec.path} lacks column(s) {missing}; "
                               f"found {list(frame.columns)}")
        out: dict[str, list[tuple[str, list[str]]]] = {"train": [], "test": []}
        answer_column = columns["answers"] if columns["answers"] in frame else columns["response"]
        for index, (prompt, raw) in enumerate(zip(frame[columns["prompt"]], frame[answer_column],
                                                  strict=True)):
            # Whatever the column's name and the file's format, a list stays a list.
            answers = normalize_answers(raw)
            if not is_text(prompt):
                _bad_row(spec, index, columns["prompt"], prompt, "a non-empty string")
            if answers is None and isinstance(raw, str):
                answers = [raw]  # an empty answer: the validate step reports it by line and id
            elif answers is None:
                _bad_row(spec, index, answer_column, raw, "an answer or a list of answers")
            digest = hashlib.sha256(f"{spec.name}:{prompt}".encode()).digest()
            test = int.from_bytes(digest[:4], "big") % 100 < 20
            out["test" if test else "train"].append((prompt, answers))
        return out

    def build_train(n: int, seed: int) -> list[TrainRecord]:
        items = rows()["train"]
        random.Random(seed).shuffle(items)
        return [TrainRecord(f"{spec.name}-train-{i}", spec.name, spec.task_type, p, a[0])
                for i, (p, a) in enumerate(items[:n])]

    def build_eval(n: int, seed: int) -> list[EvalRecord]:
        from loramoe.data.knowledge import DISTRACTORS, pick_distractors

        split = rows()
        items = split["test"]
        rng = random.Random(seed)
        rng.shuffle(items)
        # knowledge files are probed too: other rows' answers (both splits) as distractors
        pool = sorted({a[0] for _, a in split["train"] + items if a and a[0].strip()})
        probe = spec.task_type == "knowledge" and len(pool) > DISTRACTORS
        return [EvalRecord(f"{spec.name}-test-{i}", spec.name, spec.task_type, p, a, spec.metric,
                           answer_prefix=spec.answer_prefix if probe else "",
                           choices=[a[0], *pick_distractors(a, pool, rng)] if probe else [])
                for i, (p, a) in enumerate(items[:n])]

    return Task(spec.name, spec.task_type, spec.metric, "local", build_train, build_eval)
