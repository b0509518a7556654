"""The pipeline's config: one typed tree (mixture, shared train fields, methods), validated
once when it is built."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loramoe.data import MixtureConfig
from loramoe.fields import (
    check_fields,
    fail,
    from_mapping,
    matches,
    problems_error,
    problems_of,
)
from loramoe.model_paths import ModelNotAvailableError, check_local_path
from loramoe.train.config import TrainConfig


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (deep_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


class PipelineConfigError(ValueError):
    """The pipeline config is invalid; the message names the field."""


STRATEGIES = ("ddp", "fsdp", "deepspeed_zero3")  # infra/accelerate/<strategy>.yaml


@dataclass
class LaunchConfig:
    """How a train branch runs: in the step's own process, or as `processes` data-parallel
    processes (torchrun/accelerate launch, see pipeline/launch.py). processes = 0 means one
    per GPU the branch asks for (resources.gpu), one on a CPU-only branch. batch_size stays
    per process: the global batch is batch_size × processes × grad_accum. Adapter methods
    replicate the model (`strategy`, DDP by default); full SFT uses `full_model_strategy`
    (FSDP by default: a 7B model's fp32 master weights + AdamW, ~112 GB, fit no one GPU)."""

    processes: int = 0
    strategy: str = "ddp"
    full_model_strategy: str = "fsdp"

    def strategy_for(self, method: str) -> str:
        return self.full_model_strategy if method == "sft" else self.strategy

    def __post_init__(self) -> None:
        check_fields(self, [
            ("processes", lambda v: v >= 0, ">= 0 (0: one per GPU in resources.gpu)"),
            ("strategy", lambda v: v in STRATEGIES, f"one of {list(STRATEGIES)}"),
            ("full_model_strategy", lambda v: v in STRATEGIES, f"one of {list(STRATEGIES)}"),
        ], PipelineConfigError, prefix="config.launch")


@dataclass
class PipelineConfig:
    """The experiment. In the TOML, `[train]` holds the fields every method shares and
    `[methods.NAME]` each method's own; `from_dict` merges them into one validated
    TrainConfig per method, so the object holds no raw tables."""

    name: str
    mixture: MixtureConfig
    methods: dict[str, TrainConfig]  # branch method name -> its full TrainConfig
    mlflow_experiment: str = "loramoe"
    registered_model: str = "loramoe"
    retention_threshold: float = 0.9  # champion: probe retention (lower bound) must reach it
    # "significant": beats the base on downstream (paired bootstrap, p Holm-adjusted over the
    # LoRAMoE candidates) and the retention's lower 95% bound >= threshold; "best": point
    # retention only (for random-model smoke runs)
    champion_rule: str = "significant"
    eval_batch_size: int = 16
    # knowledge items generated per task (0: all); the likelihood probe scores every fact
    eval_generate_per_task: int = 0
    # reuse the base model's evaluation across runs (evaluate/cache.py: keyed by content hash)
    base_eval_cache: bool = True
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 2, "memory": 8000,
                                                               "gpu": 0})
    retry_times: int = 0
    timeout_minutes: int = 120
    local_parallel_branches: int = 1  # branches Metaflow runs at once on a local machine
    # training seeds, each (method, scale) trained once per seed (train.seed overridden):
    # replicates whose spread measures training noise, which item intervals do not cover.
    # Empty: one replicate at each method's own train.seed, branches named without a seed.
    seeds: list[int] = field(default_factory=list)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        found = {}  # nested tables' problems, reported with this level's
        if isinstance(self.launch, dict):
            try:
                self.launch = from_mapping(LaunchConfig, self.launch, PipelineConfigError,
                                           prefix="config.launch")
            except PipelineConfigError as err:
                found["launch"] = problems_of(err)
        if isinstance(self.mixture, dict):
            try:
                self.mixture = MixtureConfig.from_dict(self.mixture)
            except ValueError as err:
                found["mixture"] = [f"config.mixture: {p}" for p in problems_of(err)]
        check_fields(self, [
            ("name", lambda v: bool(v.strip()), "a non-empty name"),
            ("mlflow_experiment", lambda v: bool(v.strip()), "a non-empty experiment name"),
            # MLflow refused it only in the register step, after every branch had trained
            ("registered_model", _model_name_ok, "a name MLflow's model registry accepts (not "
             "empty, no '/' or ':', not '.' or starting with '..')"),
            ("methods", bool, "at least one method"),
            ("retention_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("champion_rule", lambda v: v in ("significant", "best"), "'significant' or 'best'"),
            ("eval_batch_size", lambda v: v >= 1, ">= 1"),
            ("eval_generate_per_task", lambda v: v >= 0, ">= 0 (0: every item)"),
            ("retry_times", lambda v: v >= 0, ">= 0"),
            ("timeout_minutes", lambda v: v >= 1, ">= 1"),
            ("local_parallel_branches", lambda v: v >= 1, ">= 1"),
            ("seeds", lambda v: all(matches(s, int) and s >= 0 for s in v)
             and len(set(v)) == len(v), "distinct integers >= 0 (empty: each train.seed)"),
            ("resources", _resources_ok, "a table with cpu > 0, memory (MB) >= 1, gpu >= 0 and "
             "optionally eval_gpu >= 0, each a number (gpu and eval_gpu integers)"),
        ], PipelineConfigError, prefix="config", found=found)
        problems = []  # the methods against the mixture and each other, all at once
        for name, train in self.methods.items():
            if train.method == "loramoe":
                problems += _task_type_problems(name, train, self.mixture.task_types)
            try:
                check_local_path(train.model)
            except ModelNotAvailableError as err:
                problems.append(f"config.methods.{name}.model: {err}")
        for key in ("model", "dtype"):  # retention compares every branch with one base eval
            values = sorted({getattr(train, key) for train in self.methods.values()})
            if len(values) > 1:
                problems.append(f"config.methods: every method must share train.{key} (one "
                                f"base evaluation), got {values}")
        fail(PipelineConfigError, problems)

    @property
    def train_processes(self) -> int:
        """Data-parallel processes per train branch (config.launch.processes, else one per
        GPU the branch asks for, else 1)."""
        return self.launch.processes or max(1, int(self.resources.get("gpu", 0)))

    @property
    def eval_gpus(self) -> int:
        """GPUs an evaluation step asks for (`eval_gpus` of resources)."""
        return eval_gpus(self.resources)

    @property
    def base_model(self) -> str:
        """The model every method starts from, evaluated once as the retention baseline."""
        return next(iter(self.methods.values())).model

    @property
    def dtype(self) -> str:
        """The dtype every method (and the base evaluation) stores frozen weights in."""
        return next(iter(self.methods.values())).dtype

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".") -> PipelineConfig:
        data = json.loads(json.dumps(dict(data)))  # plain, mutable copy (Metaflow ConfigValue)
        for task in data.get("mixture", {}).get("tasks", []):
            if task.get("path") and not Path(task["path"]).is_absolute():
                task["path"] = str(Path(base_dir) / task["path"])
        shared = data.pop("train", {})
        methods = data.get("methods")
        if not isinstance(shared, dict):
            raise PipelineConfigError(f"config.train: must be a table of fields, got {shared!r}")
        if isinstance(methods, dict):
            built, problems = {}, []
            for name, overrides in methods.items():  # every method's problems at once
                try:
                    built[name] = _method_config(name, shared, overrides)
                except PipelineConfigError as err:
                    problems += problems_of(err)
            data["methods"] = built
            if problems and built:  # and the rest's, checked with the methods that built
                try:
                    from_mapping(cls, data, PipelineConfigError, prefix="config")
                except PipelineConfigError as err:
                    problems += problems_of(err)
            fail(PipelineConfigError, problems)
        return from_mapping(cls, data, PipelineConfigError, prefix="config")

    def with_overrides(self, scales: str = "", methods: str = "", max_steps: int = 0,
                       seeds: str = "") -> PipelineConfig:
        """Apply the flow's Parameters (comma lists; empty/0 = keep the config's)."""
        data = self.to_dict()
        if scales:
            data["mixture"]["scales"] = _int_list("--scales", scales)
        if seeds:
            data["seeds"] = _int_list("--seeds", seeds)
        if methods:
            wanted = [m.strip() for m in methods.split(",")]
            unknown = [m for m in wanted if m not in self.methods]
            if unknown:
                raise PipelineConfigError(f"--methods: {unknown} not in config.methods "
                                          f"{sorted(self.methods)}")
            data["methods"] = {m: data["methods"][m] for m in wanted}
        if max_steps:
            for method in data["methods"].values():
                method["max_steps"] = max_steps
        return PipelineConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data: every method's full TrainConfig."""
        data = asdict(self)
        data["mixture"]["tasks"] = [asdict(t) for t in self.mixture.tasks]
        return data

    @property
    def untrained_tasks(self) -> set[str]:
        """Eval-only tasks: relations the mixture never trains on."""
        return {t.name for t in self.mixture.tasks if not t.train}

    def branches(self) -> list[dict[str, Any]]:
        """The foreach's branches, largest scale first: Metaflow's local runtime starts
        tasks in this order, so the longest trainings start first and the short ones and the
        evaluations fill the slots behind them (small scales first left one core idle for
        the whole last evaluation). Reports sort by scale themselves."""
        return [{"method": name, "scale": scale, "seed": seed}
                for scale in sorted(self.mixture.scales, reverse=True)
                for seed in (self.seeds or [None]) for name in self.methods]

    def train_config(self, branch: dict[str, Any], train_file: Path, output_dir: Path
                     ) -> TrainConfig:
        """The branch's TrainConfig: its method's (validated once, at construction) with the
        branch's seed, if it has one."""
        seed = branch.get("seed")
        method = self.methods[branch["method"]]
        return replace(method, train_file=str(train_file), output_dir=str(output_dir),
                       seed=method.seed if seed is None else seed)


def branch_name(branch: dict[str, Any]) -> str:
    """`method-scale`, and `-s<seed>` for a replicate of a run with `seeds`."""
    seed = branch.get("seed")
    return f"{branch['method']}-{branch['scale']}" + ("" if seed is None else f"-s{seed}")


def _int_list(name: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise PipelineConfigError(f"{name}: a comma list of integers, got {text!r}") from None


def _method_config(name: str, shared: dict[str, Any], overrides: Any) -> TrainConfig:
    if not isinstance(overrides, dict):
        raise PipelineConfigError(f"config.methods.{name}: must be a table of TrainConfig "
                                  f"fields, got {overrides!r}")
    try:
        return TrainConfig.from_dict(deep_merge(shared, overrides))
    except ValueError as err:
        raise problems_error(PipelineConfigError,
                             [f"config.methods.{name}: {p}" for p in problems_of(err)]) from None


def eval_gpus(resources: dict[str, Any]) -> int:
    """GPUs an evaluation step asks for (the base's, each branch's, register's):
    resources.eval_gpu, else one where the branches train on GPUs. Evaluation runs on one
    GPU; 8 held for it, as the paper config's branches hold, would idle 7. The flow's
    decorators call this on the raw config, the steps through PipelineConfig.eval_gpus."""
    return int(resources.get("eval_gpu", min(int(resources.get("gpu", 0)), 1)))


def _model_name_ok(name: str) -> bool:
    """mlflow.utils.validation._validate_model_name's rule, without importing MLflow."""
    return (bool(name.strip()) and "/" not in name and ":" not in name and name != "."
            and not name.startswith(".."))


def _resources_ok(resources: dict[str, Any]) -> bool:
    wanted = {"cpu": float, "memory": int, "gpu": int, "eval_gpu": int}
    return set(resources) <= set(wanted) and all(
        matches(value, wanted[key]) and value >= (0 if "gpu" in key else 1e-9)
        for key, value in resources.items())


def _task_type_problems(method: str, train: TrainConfig, task_types: list[str]) -> list[str]:
    """Every mixture task type must be an expert type, or be declared untyped on purpose:
    otherwise its samples would silently train with the LBC off."""
    experts = train.loramoe.type_names
    unknown = [t for t in task_types if t not in experts and t not in train.untyped_task_types]
    if not unknown:
        return []
    return [f"config.mixture.task_types {task_types} has {unknown}, which "
            f"config.methods.{method}.loramoe.expert_types {experts} does not name: their "
            f"samples would get no LBC term. Rename the types to match, add them to "
            f"loramoe.expert_types, or list them in train.untyped_task_types on purpose"]
