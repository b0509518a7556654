"""A registry of named tasks: type, loader, prompt formatter and metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loramoe.data.records import METRICS, EvalRecord, TrainRecord

Split = Literal["train", "test"]
# build(split, n, seed) -> up to n records of that split, deterministic in seed
Builder = Callable[[Split, int, int], list[TrainRecord] | list[EvalRecord]]


@dataclass(frozen=True)
class Task:
    name: str
    task_type: str  # "knowledge" or "downstream" by default; any declared type name
    metric: str
    source: str  # "builtin", "hub" or "local"
    build_train: Callable[[int, int], list[TrainRecord]]
    build_eval: Callable[[int, int], list[EvalRecord]]
    description: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} not in {METRICS}")


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    _load_builtins()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(REGISTRY)}") from None


def list_tasks() -> list[Task]:
    _load_builtins()
    return [REGISTRY[name] for name in sorted(REGISTRY)]


def _load_builtins() -> None:
    # Importing the modules registers their tasks (once).
    from loramoe.data import downstream, hub, knowledge  # noqa: F401
