"""The record contract every later step uses, and its storage (jsonl / parquet)."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("exact_match", "f1", "contains", "accuracy", "rouge_l", "chrf")
TRAIN_COLUMNS = ("id", "task", "task_type", "prompt", "response")
EVAL_COLUMNS = ("id", "task", "task_type", "prompt", "answers", "metric")


@dataclass
class TrainRecord:
    id: str
    task: str
    task_type: str
    prompt: str
    response: str


@dataclass
class EvalRecord:
    id: str
    task: str
    task_type: str
    prompt: str
    answers: list[str] = field(default_factory=list)  # the gold answer and its aliases
    metric: str = "exact_match"
    # likelihood probe (knowledge facts): the answer is scored as the continuation of
    # answer_prefix in the assistant turn, against choices[1:] (choices[0] is the gold)
    answer_prefix: str = ""
    choices: list[str] = field(default_factory=list)


def normalize_text(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class RecordsError(ValueError):
    """A records file breaks the schema; the message names the column, lines and ids."""


def normalize_answers(value: Any) -> list[str] | None:
    """Gold answers as a list of strings, from any of the ways files store them.

    A plain string is *one* answer (CSV cells, jsonl written by hand), a JSON list inside a
    string is parsed, and list-likes (lists, tuples, the numpy arrays parquet gives back)
    become lists. Numbers become their text. Anything else (None, dicts, bools, nested
    lists, empty strings) returns None: the caller reports the row.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return normalize_answers(parsed)
        return [value] if text else None
    if _is_number(value):
        return [str(value)]
    if hasattr(value, "tolist") and not hasattr(value, "keys"):  # numpy arrays and scalars
        value = value.tolist()
        if not isinstance(value, list):
            return normalize_answers(value) if _is_number(value) else None
    if isinstance(value, (list, tuple)) and value:
        items = [a if isinstance(a, str) else str(a) if _is_number(a) else None for a in value]
        if all(a is not None and a.strip() for a in items):
            return items
    return None


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def is_text(value: Any) -> bool:
    """A non-empty string: what every text column of a record must hold."""
    return isinstance(value, str) and bool(value.strip())


def looks_like_serialized_list(text: Any) -> bool:
    """A string such as "['42' '42.0']" or '["a", "b"]': a list written out as its repr,
    which a list column read through the wrong path turns into."""
    return isinstance(text, str) and re.fullmatch(
        r"\s*\[\s*(['\"]).*\1\s*\]\s*", text, flags=re.S) is not None


def line_number(index: int, path: Path | str | None) -> int:
    """1-based line of a record in its file (CSV files have a header line)."""
    return index + (2 if path is not None and Path(path).suffix == ".csv" else 1)


def row_name(frame: pd.DataFrame, index: int, source: Path | str | None,
             with_id: bool = True) -> str:
    """A row's name in messages: "line 4 id='a'" for a record of a file; "id='a'" (or
    "row 3", 0-based) for one of a frame read from elsewhere, which has no lines."""
    ident = f"id={frame['id'].iloc[index]!r}" if with_id and "id" in frame else ""
    if source is None:
        return ident or f"row {index}"
    return f"line {line_number(index, source)} {ident}".rstrip()


CHOICES_RULE = "must be empty or at least two distinct non-empty strings (the gold first)"


def choices_ok(value: Any) -> bool:
    """A fact's multiple-choice options: none (not probed: null, "" or []), or a list of at
    least two distinct non-empty strings — one option would score every model right, a
    repeated one splits a tie. Text or a number is not a list of options."""
    if isinstance(value, str):
        return not value
    if not isinstance(value, (list, tuple, np.ndarray)):
        return value is None or bool(pd.isna(value))
    options = list(value)
    return not options or (len(options) >= 2 and all(is_text(o) for o in options)
                           and len(set(options)) == len(options))


def check_records(frame: pd.DataFrame, kind: str, source: Path | str | None = None,
                  columns: tuple[str, ...] | None = None) -> None:
    """Raise RecordsError naming columns, lines and ids when records break the schema.

    The light twin of the great-expectations suites (validation/): the same row rules
    (is_text, normalize_answers, METRICS), cheap enough to run before any model is loaded.
    `columns` narrows the required columns (the trainer needs no id or task).
    """
    columns = columns or (TRAIN_COLUMNS if kind == "train" else EVAL_COLUMNS)
    where = f"{source}: " if source is not None else ""
    if not len(frame):  # before the columns: an empty file has none to name
        raise RecordsError(f"{where}no records")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RecordsError(f"{where}missing column(s) {missing}; found {list(frame.columns)}")
    problems = []
    text_columns = [c for c in columns if c not in ("answers", "metric")]
    for column in text_columns:
        bad = [i for i, v in enumerate(frame[column]) if not is_text(v)]
        problems += _describe(frame, bad, column, "must be a non-empty string", source)
    if "answers" in columns:
        bad = [i for i, v in enumerate(frame["answers"]) if normalize_answers(v) is None]
        problems += _describe(frame, bad, "answers",
                              "must be a non-empty list of non-empty strings", source)
    if "metric" in columns:
        bad = [i for i, v in enumerate(frame["metric"]) if v not in METRICS]
        problems += _describe(frame, bad, "metric", f"must be one of {list(METRICS)}", source)
    if kind == "eval" and "id" in columns:  # items are paired with the base's by id
        bad = [i for i, repeated in enumerate(frame["id"].duplicated(keep=False)) if repeated]
        problems += _describe(frame, bad, "id", "must be unique", source)
    if kind == "eval" and "choices" in frame.columns:
        bad = [i for i, v in enumerate(frame["choices"]) if not choices_ok(v)]
        problems += _describe(frame, bad, "choices", CHOICES_RULE, source)
    if problems:
        raise RecordsError(f"{where}{len(problems)} schema problem(s):\n" + "\n".join(
            f"  - {p}" for p in problems))


def _describe(frame: pd.DataFrame, rows: list[int], column: str, rule: str,
              source: Path | str | None) -> list[str]:
    if not rows:
        return []
    return [f"column '{column}' {rule}: {len(rows)} row(s) fail, e.g. "
            f"{row_examples(frame, rows, column, source)}"]


def row_examples(frame: pd.DataFrame, rows: list[int], column: str,
                 source: Path | str | None, most: int = 3) -> str:
    """`line 2 id='b' value=42 (int); ...` for the first rows, for error messages."""
    examples = []
    for i in rows[:most]:
        value = frame[column].iloc[i]
        examples.append(f"{row_name(frame, i, source, column != 'id')} "
                        f"value={shown_value(value)} ({type(value).__name__})")
    return "; ".join(examples)


def shown_value(value: Any, most: int = 60) -> str:
    """A cell as a message shows it: its repr, cut to `most` characters with an ellipsis."""
    text = repr(value)
    return text[:most] + ("…" if len(text) > most else "")


def to_frame(records: Iterable[TrainRecord | EvalRecord]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in records])


def write_records(records: Iterable[TrainRecord | EvalRecord] | pd.DataFrame, path: Path) -> Path:
    """Write records as .jsonl or .parquet (by suffix)."""
    frame = records if isinstance(records, pd.DataFrame) else to_frame(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for row in frame.to_dict(orient="records"):
                handle.write(json.dumps(_plain(row), ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: records are stored as .jsonl or .parquet")
    return path


def _plain(row: dict) -> dict:
    return {k: (list(v) if hasattr(v, "tolist") and not isinstance(v, str) else v)
            for k, v in row.items()}


def read_records(path: Path) -> pd.DataFrame:
    """Records from .jsonl, .json (a list), .csv or .parquet, as a DataFrame. A file its
    format cannot read is a RecordsError naming it (and, for .jsonl, the first bad line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: " + ("a folder, not a records file" if path.is_dir()
                                               else "no such records file"))
    readers = {".parquet": pd.read_parquet,
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
               ".json": lambda p: pd.read_json(p, dtype=False),
               ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)}
    if path.suffix not in readers:
        raise RecordsError(f"{path}: unsupported format (use .jsonl, .json, .csv or .parquet)")
    try:
        frame = readers[path.suffix](path)
    except Exception as err:  # pandas, pyarrow and json each raise their own kind
        where = _first_bad_line(path) if path.suffix == ".jsonl" else None
        raise RecordsError(f"{path}: not a readable {path.suffix[1:]} records file ("
                           f"{where or f'{type(err).__name__}: {err}'})") from None
    if "answers" in frame.columns:
        # Invalid values stay as they were, for check_records / the suites to report.
        frame["answers"] = frame["answers"].map(
            lambda v: a if (a := normalize_answers(v)) is not None else v)
    return frame


def _first_bad_line(path: Path) -> str | None:
    """Where a JSON-lines file first breaks: 'line N: what', or None if every line parses."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} at column {err.colno}"
            if not isinstance(value, dict):
                return f"line {number}: one JSON object per line, got {type(value).__name__}"
    return None


def load_as_dataset(path: Path):
    """The same records as a `datasets.Dataset`."""
    import datasets

    return datasets.Dataset.from_pandas(read_records(path), preserve_index=False)
