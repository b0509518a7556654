"""Mixtures of tasks at nested data scales, eval sets, and the external-eval overlap filter."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import tomllib
import yaml

from loramoe.data.records import (
    METRICS,
    EvalRecord,
    TrainRecord,
    normalize_text,
    to_frame,
    write_records,
)
from loramoe.data.registry import Task, get_task
from loramoe.fields import check_fields, from_mapping, problems_of


class MixtureError(ValueError):
    """A mixture config is invalid; the message names the field."""


@dataclass
class TaskSpec:
    """One task of the mixture: a registered name, or a local file (source="local")."""

    name: str
    weight: float = 1.0
    source: str = "registry"  # "registry" or "local"
    path: str | None = None  # local: jsonl/csv/parquet with the task's rows
    task_type: str | None = None  # local: required; registry: optional override
    metric: str = "contains"  # local
    columns: dict[str, str] = field(default_factory=dict)  # local: prompt/response/answers
    train: bool = True  # False: eval only (a relation the mixture never trains on)
    eval_size: int | None = None  # this task's eval items (default: mixture.eval_size)
    # local knowledge task: the likelihood probe scores the gold answer after this prefix in
    # the assistant turn, against other rows' answers as distractors
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        where = f"tasks[{self.name!r}]"
        check_fields(self, [("name", bool, "a task name"),
                            ("weight", lambda v: v > 0, "> 0"),
                            ("eval_size", lambda v: v is None or v >= 1, "None or >= 1"),
                            ("source", lambda v: v in ("registry", "local"),
                             "'registry' or 'local'")], MixtureError, prefix=where)
        if self.source == "local":
            if not self.path:
                raise MixtureError(f"{where}.path: a local task needs a file path")
            if not self.task_type:
                raise MixtureError(f"{where}.task_type: a local task must declare its type")
            if self.metric not in METRICS:
                raise MixtureError(f"{where}.metric: {self.metric!r} not in {METRICS}")
            unknown = set(self.columns) - {"prompt", "response", "answers"}
            if unknown:
                raise MixtureError(f"{where}.columns: unknown keys {sorted(unknown)}; map "
                                   f"prompt/response/answers to your file's column names")


def _task_spec(value: Any, index: int) -> TaskSpec:
    if isinstance(value, TaskSpec):
        return value
    return from_mapping(TaskSpec, value, MixtureError, prefix=f"mixture.tasks[{index}]")


@dataclass
class MixtureConfig:
    tasks: list[TaskSpec]
    scales: list[int]
    seed: int = 0
    eval_size: int = 50  # per task
    task_types: list[str] = field(default_factory=lambda: ["knowledge", "downstream"])
    # share of every scale given to the trained tasks of the first type ("knowledge"), split
    # by weight; the other types share the rest. None: every trained task by weight alone
    knowledge_share: float | None = None

    def __post_init__(self) -> None:
        found = {}  # every task's problems, reported with this level's
        if isinstance(self.tasks, list):
            specs, problems = [], []
            for i, task in enumerate(self.tasks):
                try:
                    specs.append(_task_spec(task, i))
                except MixtureError as err:
                    problems += problems_of(err)
            if problems:
                found["tasks"] = problems
            else:
                self.tasks = specs
        check_fields(self, [
            ("tasks", bool, "at least one task"),
            ("tasks", lambda v: len({t.name for t in v}) == len(v), "tasks with distinct names"),
            ("tasks", lambda v: any(t.train for t in v), "at least one task with train = true"),
            ("scales", lambda v: v and all(s >= 1 for s in v), "a list of positive integers"),
            ("eval_size", lambda v: v >= 1, ">= 1"),
            ("task_types", lambda v: v and all(v) and len(set(v)) == len(v),
             "a list of distinct, non-empty type names"),
            ("knowledge_share", lambda v: v is None or 0 < v < 1, "None or in (0, 1)"),
        ], MixtureError, prefix="mixture", found=found)
        self.scales = sorted(set(self.scales))
        for spec in self.tasks:
            task_type = self.type_of(spec)
            if task_type not in self.task_types:
                raise MixtureError(f"tasks[{spec.name!r}].task_type: {task_type!r} is not one "
                                   f"of task_types {self.task_types}")
        if self.knowledge_share is not None:
            kinds = {self.type_of(t) == self.task_types[0] for t in self.tasks if t.train}
            if kinds != {True, False}:
                raise MixtureError(f"mixture.knowledge_share: needs trained tasks of type "
                                   f"{self.task_types[0]!r} and of another type")

    def type_of(self, spec: TaskSpec) -> str | None:
        return spec.task_type or (get_task(spec.name).task_type
                                  if spec.source == "registry" else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureConfig:
        return from_mapping(cls, data, MixtureError, prefix="mixture")

    @classmethod
    def from_file(cls, path: str | Path) -> MixtureConfig:
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise MixtureError(f"{path}: use .toml, .yaml or .json")
        data = data.get("mixture", data)
        for spec in data.get("tasks", []):  # local paths are relative to the config file
            if spec.get("path") and not Path(spec["path"]).is_absolute():
                spec["path"] = str(path.parent / spec["path"])
        return cls.from_dict(data)


def resolve_task(spec: TaskSpec) -> Task:
    if spec.source == "local":
        from loramoe.data.local import local_task

        return local_task(spec)
    task = get_task(spec.name)
    if spec.task_type and spec.task_type != task.task_type:
        return Task(task.name, spec.task_type, task.metric, task.source, task.build_train,
                    task.build_eval, task.description)
    return task


def quotas(config: MixtureConfig, scale: int) -> dict[str, int]:
    """Records per trained task at a scale, proportional to weights (largest-remainder
    rounding); with knowledge_share, the first type's tasks get that share of the scale and
    the others the rest; eval-only tasks get none."""
    trained = [t for t in config.tasks if t.train]
    share = {t.name: 1.0 for t in trained}
    if config.knowledge_share is not None:
        first = [config.type_of(t) == config.task_types[0] for t in trained]
        mass = {True: config.knowledge_share, False: 1 - config.knowledge_share}
        weight_of = {kind: sum(t.weight for t, k in zip(trained, first, strict=True) if k == kind)
                     for kind in (True, False)}
        share = {t.name: mass[k] / weight_of[k] for t, k in zip(trained, first, strict=True)}
    total = sum(t.weight * share[t.name] for t in trained)
    exact = {t.name: scale * t.weight * share[t.name] / total for t in trained}
    counts = {name: int(value) for name, value in exact.items()}
    leftovers = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in leftovers[: scale - sum(counts.values())]:
        counts[name] += 1
    return counts


@dataclass
class BuiltMixture:
    train: dict[int, pd.DataFrame]  # scale -> records (each a subset of the next)
    eval: pd.DataFrame
    dropped_overlap: dict[str, int]  # eval items dropped per task for train overlap
    shortfall: dict[str, int]  # records a task could not supply at the largest scale


def build_mixture(config: MixtureConfig) -> BuiltMixture:
    """Train sets at every scale (nested, stratified by task) and the eval set."""
    largest = config.scales[-1]
    pools: dict[str, list[TrainRecord]] = {}
    evals: list[EvalRecord] = []
    shortfall: dict[str, int] = {}
    want = quotas(config, largest)
    for index, spec in enumerate(config.tasks):
        task = resolve_task(spec)
        seed = config.seed * 1000 + index
        if spec.train:
            pool = task.build_train(want[spec.name], seed)
            if len(pool) < want[spec.name]:
                shortfall[spec.name] = want[spec.name] - len(pool)
            pools[spec.name] = pool  # already shuffled deterministically by the builder
        evals.extend(task.build_eval(spec.eval_size or config.eval_size, seed + 500_000))

    train: dict[int, pd.DataFrame] = {}
    for scale in config.scales:
        counts = quotas(config, scale)
        rows = [r for name, pool in pools.items() for r in pool[: counts[name]]]
        random.Random(config.seed).shuffle(rows)
        train[scale] = to_frame(rows)
    eval_frame, dropped = drop_overlap(to_frame(evals), train[largest])
    return BuiltMixture(train, eval_frame, dropped, shortfall)


def drop_overlap(eval_frame: pd.DataFrame, train_frame: pd.DataFrame
                 ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop eval items whose normalised question appears in training; count per task."""
    seen = set(train_frame["prompt"].map(normalize_text)) if len(train_frame) else set()
    overlap = eval_frame["prompt"].map(normalize_text).isin(seen)
    dropped = eval_frame[overlap].groupby("task").size().to_dict()
    return eval_frame[~overlap].reset_index(drop=True), {k: int(v) for k, v in dropped.items()}


def summary_table(built: BuiltMixture) -> pd.DataFrame:
    """task × type × count × mean lengths, per scale and for eval."""
    parts = []
    for scale, frame in built.train.items():
        part = frame.assign(split=f"train@{scale}", response_chars=frame["response"].str.len())
        parts.append(part)
    parts.append(built.eval.assign(split="eval", response_chars=built.eval["answers"].map(
        lambda a: len(a[0]) if len(a) else 0)))
    frame = pd.concat(parts, ignore_index=True)
    frame["prompt_chars"] = frame["prompt"].str.len()
    return (frame.groupby(["split", "task", "task_type"], sort=False)
            .agg(count=("id", "size"), mean_prompt_chars=("prompt_chars", "mean"),
                 mean_response_chars=("response_chars", "mean"))
            .round(1).reset_index())


def mixture_files(outdir: Path) -> set[str]:
    """The files the mixture in outdir (its manifest.json) consists of; none if no manifest."""
    path = outdir / "manifest.json"
    if not path.is_file():
        return set()
    manifest = json.loads(path.read_text())
    return {*manifest.get("train_files", {}).values(), manifest.get("eval_file", "eval.jsonl"),
            "manifest.json", "summary.csv"}


def write_mixture(built: BuiltMixture, config: MixtureConfig, outdir: str | Path) -> Path:
    """Write the train file of every scale, the eval file, manifest.json and summary.csv. An
    earlier mixture in outdir is replaced as a set: its files this one does not write again
    (the train file of a scale no longer built) are removed; other files are left alone."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    earlier = mixture_files(outdir)
    for scale, frame in built.train.items():
        write_records(frame, outdir / f"train_{scale}.jsonl")
    write_records(built.eval, outdir / "eval.jsonl")
    manifest = {
        "config": {**asdict(config), "tasks": [asdict(t) for t in config.tasks]},
        "train_files": {str(s): f"train_{s}.jsonl" for s in built.train},
        "eval_file": "eval.jsonl",
        "dropped_overlap": built.dropped_overlap,
        "shortfall": built.shortfall,
    }
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    summary_table(built).to_csv(outdir / "summary.csv", index=False)
    for name in earlier - mixture_files(outdir):
        (outdir / name).unlink(missing_ok=True)
    return outdir
