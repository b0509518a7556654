"""Data layer: task registry, built-in offline tasks, hub/local tasks, mixtures at scales."""

from loramoe.data.mixture import (
    BuiltMixture,
    MixtureConfig,
    MixtureError,
    TaskSpec,
    build_mixture,
    drop_overlap,
    summary_table,
    write_mixture,
)
from loramoe.data.records import (
    EVAL_COLUMNS,
    METRICS,
    TRAIN_COLUMNS,
    EvalRecord,
    TrainRecord,
    normalize_text,
    read_records,
    write_records,
)
from loramoe.data.registry import Task, get_task, list_tasks, register

__all__ = [
    "EVAL_COLUMNS", "METRICS", "TRAIN_COLUMNS", "BuiltMixture", "EvalRecord", "MixtureConfig",
    "MixtureError", "Task", "TaskSpec", "TrainRecord", "build_mixture", "drop_overlap",
    "get_task", "list_tasks", "normalize_text", "read_records", "register", "summary_table",
    "write_mixture", "write_records",
]
