"""The record contract every later step uses, and its storage (jsonl / parquet)."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def normalize_text(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


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
    """Records from .jsonl, .json (a list), .csv or .parquet, as a DataFrame."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such records file")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix == ".jsonl":
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON lines ({err})") from None
    elif path.suffix == ".json":
        frame = pd.read_json(path, dtype=False)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise ValueError(f"{path}: unsupported format (use .jsonl, .json, .csv or .parquet)")
    if "answers" in frame.columns:
        frame["answers"] = frame["answers"].map(
            lambda v: list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
    return frame


def load_as_dataset(path: Path):
    """The same records as a `datasets.Dataset`."""
    import datasets

    return datasets.Dataset.from_pandas(read_records(path), preserve_index=False)
