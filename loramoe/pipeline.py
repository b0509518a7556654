"""The experiment pipeline's steps as plain functions; flows/full_pipeline.py calls one each.

Data and trained files travel between steps as Metaflow artifacts (so branches can run on
other machines); MLflow gets runs, metrics, plots and the adapters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.data import MixtureConfig, build_mixture, write_mixture
from loramoe.data.records import read_records, write_records
from loramoe.fields import check_fields, matches
from loramoe.model import ModelNotAvailableError, check_local_path
from loramoe.train import TrainConfig


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (deep_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


class PipelineConfigError(ValueError):
    """The pipeline config is invalid; the message names the field."""


@dataclass
class PipelineConfig:
    name: str
    mixture: MixtureConfig
    train: dict[str, Any]  # TrainConfig fields shared by every method
    methods: dict[str, dict[str, Any]]  # method name -> TrainConfig overrides
    mlflow_experiment: str = "loramoe"
    registered_model: str = "loramoe"
    retention_threshold: float = 0.9  # champion rule: best downstream among runs keeping this
    eval_batch_size: int = 16
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 2, "memory": 8000,
                                                               "gpu": 0})
    retry_times: int = 0
    timeout_minutes: int = 120
    local_parallel_branches: int = 1  # CPU slots for concurrent local training/evaluation

    def __post_init__(self) -> None:
        if isinstance(self.mixture, dict):
            try:
                self.mixture = MixtureConfig.from_dict(self.mixture)
            except ValueError as err:
                raise PipelineConfigError(f"config.mixture: {err}") from None
        check_fields(self, [
            ("methods", bool, "at least one method"),
            ("retention_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("eval_batch_size", lambda v: v >= 1, ">= 1"),
            ("retry_times", lambda v: v >= 0, ">= 0"),
            ("timeout_minutes", lambda v: v >= 1, ">= 1"),
            ("local_parallel_branches", lambda v: v >= 1, ">= 1"),
            ("resources", _resources_ok, "a table with cpu > 0, memory (MB) >= 1 and gpu >= 0, "
             "each a number (gpu an integer)"),
        ], PipelineConfigError, prefix="config")
        for name, overrides in self.methods.items():
            try:
                train = TrainConfig.from_dict(deep_merge(self.train, overrides))
            except ValueError as err:
                raise PipelineConfigError(f"config.methods.{name}: {err}") from None
            if train.method == "loramoe":
                _check_task_types(name, train, self.mixture.task_types)
            try:
                check_local_path(train.model)
            except ModelNotAvailableError as err:
                raise PipelineConfigError(f"config.methods.{name}.model: {err}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".") -> PipelineConfig:
        data = json.loads(json.dumps(dict(data)))  # plain, mutable copy (Metaflow ConfigValue)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineConfigError(f"config: unknown field(s) {unknown}; known: "
                                      f"{sorted(known)}")
        for task in data.get("mixture", {}).get("tasks", []):
            if task.get("path") and not Path(task["path"]).is_absolute():
                task["path"] = str(Path(base_dir) / task["path"])
        try:
            return cls(**data)
        except TypeError as err:
            raise PipelineConfigError(f"config: {err}") from None

    def with_overrides(self, scales: str = "", methods: str = "", max_steps: int = 0
                       ) -> PipelineConfig:
        """Apply the flow's Parameters (comma lists; empty/0 = keep the config's)."""
        data = self.to_dict()
        if scales:
            data["mixture"]["scales"] = [int(s) for s in scales.split(",")]
        if methods:
            wanted = [m.strip() for m in methods.split(",")]
            unknown = [m for m in wanted if m not in self.methods]
            if unknown:
                raise PipelineConfigError(f"--methods: {unknown} not in config.methods "
                                          f"{sorted(self.methods)}")
            data["methods"] = {m: self.methods[m] for m in wanted}
        if max_steps:
            data["train"]["max_steps"] = max_steps
        return PipelineConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mixture"]["tasks"] = [asdict(t) for t in self.mixture.tasks]
        return data

    def branches(self) -> list[dict[str, Any]]:
        return [{"method": name, "scale": scale} for scale in self.mixture.scales
                for name in self.methods]

    def train_config(self, method: str, train_file: Path, output_dir: Path) -> TrainConfig:
        return TrainConfig.from_dict(deep_merge(self.train, {
            **self.methods[method], "train_file": str(train_file),
            "output_dir": str(output_dir)}))


def _resources_ok(resources: dict[str, Any]) -> bool:
    wanted = {"cpu": float, "memory": int, "gpu": int}
    return set(resources) <= set(wanted) and all(
        matches(value, wanted[key]) and value >= (0 if key == "gpu" else 1e-9)
        for key, value in resources.items())


def _check_task_types(method: str, train: TrainConfig, task_types: list[str]) -> None:
    """Every mixture task type must be an expert type, or be declared untyped on purpose:
    otherwise its samples would silently train with the LBC off."""
    experts = train.loramoe.type_names
    unknown = [t for t in task_types if t not in experts and t not in train.untyped_task_types]
    if unknown:
        raise PipelineConfigError(
            f"config.mixture.task_types {task_types} has {unknown}, which "
            f"config.methods.{method}.loramoe.expert_types {experts} does not name: their "
            f"samples would get no LBC term. Rename the types to match, add them to "
            f"loramoe.expert_types, or list them in train.untyped_task_types on purpose")


# ---- CPU slots: parallel local branches must not oversubscribe the cores ----------------


@contextlib.contextmanager
def cpu_slot(lock_dir: str | Path, slots: int):
    """Hold one of `slots` machine-wide slots (file locks); torch gets cores // slots threads.

    Metaflow starts every foreach branch at once locally; without this, 6 branches × 2
    threads would fight over 2 cores. On cluster workers each branch has its own machine
    and its own lock folder, so the slot is always free.
    """
    import torch

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    handles = [open(lock_dir / f"slot{i}.lock", "w") for i in range(slots)]  # noqa: SIM115
    held = None
    try:
        while held is None:
            for handle in handles:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = handle
                    break
                except BlockingIOError:
                    continue
            if held is None:  # all busy: block on the first one
                fcntl.flock(handles[0], fcntl.LOCK_EX)
                held = handles[0]
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // slots))
        yield
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
        for handle in handles:
            handle.close()


def branch_slot(config: PipelineConfig):
    """The machine-wide CPU slot a branch's training or evaluation runs in."""
    return cpu_slot(Path(tempfile.gettempdir()) / "loramoe-cpu-slots",
                    config.local_parallel_branches)


# ---- files <-> artifacts ----------------------------------------------------------------


def pack_dir(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def unpack_dir(files: dict[str, bytes], path: Path) -> Path:
    for rel, data in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


# ---- steps ------------------------------------------------------------------------------


def ingest(config: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Build every scale's train set and the eval set; returns them as DataFrames too."""
    built = build_mixture(config.mixture)
    write_mixture(built, config.mixture, out_dir)
    return {"train": {int(s): f for s, f in built.train.items()}, "eval": built.eval,
            "dropped_overlap": built.dropped_overlap, "shortfall": built.shortfall}


class DataValidationError(RuntimeError):
    """great-expectations rejected the data; the message lists the failed expectations."""


def validate_data(data_dir: Path, docs_dir: Path) -> list[dict[str, Any]]:
    from validation import validate_mixture

    reports = validate_mixture(data_dir, docs_dir=docs_dir)
    failed = [r for r in reports if not r.success]
    if failed:
        details = "\n".join(r.summary() for r in failed)
        raise DataValidationError(f"data validation failed (report: {docs_dir / 'index.html'}):"
                                  f"\n{details}")
    return [r.to_dict() for r in reports]


def run_branch_training(config: PipelineConfig, branch: dict[str, Any], train_frame: pd.DataFrame,
                        workdir: Path, mlflow_run_id: str | None) -> dict[str, Any]:
    """Train one (method, scale) branch; metrics stream to its MLflow child run."""
    from loramoe.tracking import MlflowSink, log_params, system_metrics
    from loramoe.train import train

    name = f"{branch['method']}-{branch['scale']}"
    train_file = write_records(train_frame, workdir / "train.jsonl")
    train_config = config.train_config(branch["method"], train_file, workdir / "run")
    if mlflow_run_id:
        log_params(mlflow_run_id, {"branch": name, **train_config.to_dict()})
    with branch_slot(config), system_metrics(mlflow_run_id):
        result = train(train_config, sink=MlflowSink(mlflow_run_id) if mlflow_run_id else None,
                       progress=True)
    run_dir = Path(result.output_dir)
    keep = pack_dir(run_dir / ("model" if train_config.method == "sft" else "adapter"))
    return {"name": name, "files": keep, "train_config": train_config.to_dict(),
            "steps": result.steps, "final": result.final_metrics,
            "metrics_log": (run_dir / "metrics.jsonl").read_text()}


def restore_run_dir(trained: dict[str, Any], path: Path) -> Path:
    """Recreate a run folder (train_config.json + adapter/model) from the train artifact."""
    part = "model" if trained["train_config"]["method"] == "sft" else "adapter"
    unpack_dir(trained["files"], path / part)
    (path / "train_config.json").write_text(json.dumps(trained["train_config"]))
    (path / "metrics.jsonl").write_text(trained["metrics_log"])
    return path


def evaluate_base_model(config: PipelineConfig, eval_frame: pd.DataFrame, workdir: Path
                        ) -> dict[str, Any]:
    from loramoe.evaluate import evaluate

    eval_file = write_records(eval_frame, workdir / "eval.jsonl")
    with branch_slot(config):
        metrics = evaluate(eval_file, workdir / "base", model=config.train["model"],
                           batch_size=config.eval_batch_size)
    return {"metrics": metrics, "predictions": read_records(workdir / "base" / "predictions.jsonl")}


def evaluate_branch(config: PipelineConfig, trained: dict[str, Any], eval_frame: pd.DataFrame,
                    base_predictions: pd.DataFrame, workdir: Path, mlflow_run_id: str | None
                    ) -> dict[str, Any]:
    """Metrics, retention vs the base, router analysis; logged to the branch's MLflow run."""
    from loramoe.evaluate import evaluate
    from loramoe.tracking import log_metrics

    run_dir = restore_run_dir(trained, workdir / "run")
    eval_file = write_records(eval_frame, workdir / "eval.jsonl")
    base_dir = workdir / "base"
    write_records(base_predictions, base_dir / "predictions.jsonl")
    out = workdir / "eval"
    with branch_slot(config):
        metrics = evaluate(eval_file, out, run=run_dir, base_dir=base_dir,
                           batch_size=config.eval_batch_size)
    if mlflow_run_id:
        import mlflow

        summary = {"knowledge_score": metrics.get("knowledge_score"),
                   "downstream_score": metrics.get("downstream_score"),
                   "retention": metrics.get("retention", {}).get("overall"),
                   **{f"task/{t}": v["score"] for t, v in metrics["per_task"].items()}}
        log_metrics(mlflow_run_id, {k: v for k, v in summary.items() if v is not None})
        client = mlflow.MlflowClient()
        for path in [out / "metrics.json", out / "predictions.jsonl", out / "router.json",
                     out / "router.png", run_dir / "train_config.json"]:
            if path.exists():
                client.log_artifact(mlflow_run_id, str(path), artifact_path="eval")
        part = run_dir / ("model" if trained["train_config"]["method"] == "sft" else "adapter")
        if part.name == "adapter":
            client.log_artifacts(mlflow_run_id, str(part), artifact_path="adapter")
    return {"name": trained["name"], "method": trained["train_config"]["method"],
            "metrics": metrics, "router_cv": _router_cv_series(trained["metrics_log"])}


def _router_cv_series(metrics_log: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_log.splitlines() if line.strip()]
    return [(r["step"], r["router_cv"]) for r in rows if "router_cv" in r]


# ---- compare and register ---------------------------------------------------------------


def results_table(branches: list[dict[str, Any]], base_metrics: dict[str, Any]) -> pd.DataFrame:
    rows = [{"branch": "base", "method": "base", "scale": 0, "status": "ok",
             "knowledge_score": base_metrics.get("knowledge_score"), "retention": 1.0,
             "downstream_score": base_metrics.get("downstream_score")}]
    for b in branches:
        if b.get("error"):
            rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                         "status": f"failed: {b['error']}"})
            continue
        m = b["metrics"]
        rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                     "status": "ok", "knowledge_score": m.get("knowledge_score"),
                     "retention": m.get("retention", {}).get("overall"),
                     "downstream_score": m.get("downstream_score")})
    return pd.DataFrame(rows)


def comparison_plots(table: pd.DataFrame, branches: list[dict[str, Any]], out: Path
                     ) -> list[Path]:
    """Retention and downstream score vs scale per method (Fig. 1/2), router type weights per
    task (Fig. 7), router CV over steps (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ok = table[(table["status"] == "ok") & (table["method"] != "base")]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, group in ok.groupby("method"):
        group = group.sort_values("scale")
        axes[0].plot(group["scale"], group["retention"], marker="o", label=method)
        axes[1].plot(group["scale"], group["downstream_score"], marker="o", label=method)
    base = table[table["method"] == "base"].iloc[0]
    axes[1].axhline(base["downstream_score"], color="grey", linestyle="--", label="base")
    axes[0].set(title="Knowledge retention vs data scale", xlabel="training examples",
                ylabel="share of base-known facts kept", ylim=(0, 1.05))
    axes[1].set(title="Downstream score vs data scale", xlabel="training examples",
                ylabel="macro score")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.set_xticks(sorted(set(ok["scale"])))  # linear: NaN retention must not break it
    fig.tight_layout()
    paths.append(out / "retention_downstream_vs_scale.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    moe = [b for b in branches if not b.get("error") and b["metrics"].get("router_type_weights")]
    if moe:
        largest = max(moe, key=lambda b: b["scale"])
        from loramoe.evaluate import plot_router

        analysis = {"type_names": list(next(iter(
            largest["metrics"]["router_type_weights"].values()))),
            "tasks": {t: {"type_weights": w, "task_type":
                          largest["metrics"]["per_task"][t]["task_type"]}
                      for t, w in largest["metrics"]["router_type_weights"].items()}}
        paths.append(plot_router(analysis, out / "router_type_weights.png",
                                 title=f"Router weight per expert type ({largest['name']})"))
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in moe:
            if b["router_cv"]:
                steps, cvs = zip(*b["router_cv"], strict=True)
                ax.plot(steps, cvs, label=b["name"])
        ax.set(title="Router coefficient of variation during training", xlabel="step",
               ylabel="CV of expert importance")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "router_cv.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _retention(branch: dict[str, Any]) -> float | None:
    return branch["metrics"].get("retention", {}).get("overall")


def choose_candidate(branches: list[dict[str, Any]], threshold: float) -> tuple[dict | None, str]:
    """Best LoRAMoE by downstream score among runs keeping >= threshold retention.

    Retention is undefined when the base model knew none of the eval facts; such a run only
    passes a threshold of 0.
    """
    candidates = [b for b in branches if not b.get("error") and b["method"] == "loramoe"]
    if not candidates:
        return None, "no successful LoRAMoE branch"
    keeping = [b for b in candidates if threshold == 0
               or (_retention(b) is not None and _retention(b) >= threshold)]
    if not keeping:
        best = max(candidates, key=lambda b: _retention(b) or 0)
        return None, (f"no LoRAMoE branch keeps retention >= {threshold} (best "
                      f"{best['name']}: {_fmt_opt(_retention(best))})")
    best = max(keeping, key=lambda b: b["metrics"]["downstream_score"])
    return best, (f"{best['name']}: downstream {best['metrics']['downstream_score']:.4f}, "
                  f"retention {_fmt_opt(_retention(best))} (threshold {threshold})")


def _fmt_opt(value: float | None) -> str:
    return "undefined (base knew none of the facts)" if value is None else f"{value:.3f}"


def register_champion(config: PipelineConfig, branches: list[dict[str, Any]],
                      parent_run_id: str, workdir: Path) -> dict[str, Any]:
    """Log every adapter as a pyfunc model; register the best LoRAMoE and give it the alias
    `champion` only if it beats the current champion's downstream score."""
    import mlflow

    from loramoe.serving import log_answer_model
    from loramoe.tracking import log_metrics

    client = mlflow.MlflowClient()
    logged = {}
    for b in branches:
        if b.get("error") or not b.get("mlflow_run_id"):
            continue
        run_dir = restore_run_dir(b["trained"], workdir / b["name"] / "run")
        info = log_answer_model(b["mlflow_run_id"], run_dir, workdir / b["name"] / "staged")
        logged[b["name"]] = info.model_uri
    best, reason = choose_candidate(branches, config.retention_threshold)
    decision: dict[str, Any] = {"candidate": best["name"] if best else None, "reason": reason,
                                "promoted": False, "logged_models": logged}
    if best is not None:
        score = best["metrics"]["downstream_score"]
        current = _current_champion_score(client, config.registered_model)
        version = mlflow.register_model(logged[best["name"]], config.registered_model)
        client.set_model_version_tag(config.registered_model, version.version,
                                     "downstream_score", str(score))
        decision["version"] = version.version
        if current is None or score > current:
            client.set_registered_model_alias(config.registered_model, "champion",
                                              version.version)
            decision["promoted"] = True
            decision["reason"] += (" — first champion" if current is None else
                                   f" — beats current champion ({current:.4f})")
        else:
            decision["reason"] += f" — does not beat current champion ({current:.4f})"
    client.set_tag(parent_run_id, "champion_decision", decision["reason"][:5000])
    log_metrics(parent_run_id, {"champion_promoted": float(decision["promoted"])})
    return decision


def _current_champion_score(client, name: str) -> float | None:
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except Exception:  # no registered model or no alias yet
        return None
    tag = version.tags.get("downstream_score")
    return float(tag) if tag is not None else None
