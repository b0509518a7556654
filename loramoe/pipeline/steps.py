"""The pipeline's steps as plain functions; flows/full_pipeline.py calls one per step.

Trained weights live in one store, the branch's MLflow run (artifact path `trained/`); the
steps pass each other a reference to it (run id + path), never the weights themselves, so a
cloud run does not copy an adapter or a full SFT model through the Metaflow datastore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.cores import available_cores
from loramoe.data import build_mixture, write_mixture
from loramoe.data.records import read_records, write_records
from loramoe.pipeline.config import PipelineConfig, branch_name
from loramoe.pipeline.preflight import check_method_targets, check_rows
from loramoe.pipeline.threads import check_gpus, use_branch_threads
from loramoe.train.config import RUN_CONFIG, run_part
from loramoe.train.resume import DATA_RECORD


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


TRAINED = "trained"  # artifact path of a branch's trained folder in its MLflow run


def run_branch_training(config: PipelineConfig, branch: dict[str, Any], train_frame: pd.DataFrame,
                        workdir: Path, mlflow_run_id: str | None) -> dict[str, Any]:
    """Train one (method, scale) branch; metrics stream to its MLflow child run, and the
    trained folder goes to that run under `trained/`. Returns a small reference to it."""
    from loramoe.tracking import log_metrics, log_params, set_tag, store_folder, system_metrics

    check_gpus(config)
    name = branch_name(branch)
    train_file = write_records(train_frame, workdir / "train.jsonl")
    train_config = config.train_config(branch, train_file, workdir / "run")
    processes = config.train_processes
    threads = use_branch_threads(config, processes)
    if mlflow_run_id:
        params = branch_params(branch, train_config, threads, processes)
        log_params(mlflow_run_id, params)
        for key in ("method", "scale", "lbc_form"):  # also tags: filterable in the runs list
            set_tag(mlflow_run_id, key, str(params[key]))
    with system_metrics(mlflow_run_id):
        final = train_branch(config, train_config, processes, threads, mlflow_run_id)
    device = final.pop("device")  # where it trained: "cuda" on a GPU worker
    # which GPU or CPU (flags, ISA caps): bf16 training rounds per kind (docs/benchmarks.md §3)
    hardware = final.pop("hardware")
    run_dir = Path(train_config.output_dir)
    part = run_part(train_config.method)
    if mlflow_run_id:
        set_tag(mlflow_run_id, "train_device", device)
        set_tag(mlflow_run_id, "train_hardware", hardware)
        # what it trained on: the scale's rows, less those max_length cut away, how many of
        # them it cut short, and how many hold a control token's text
        log_metrics(mlflow_run_id, {f"train/{k}": final[k] for k in (
            "examples", "examples_dropped", "examples_truncated", "examples_with_control_text")
            if k in final})
        files = [run_dir / RUN_CONFIG, run_dir / DATA_RECORD, run_dir / "metrics.jsonl",
                 run_dir / part]  # DATA_RECORD: the sha256 of the data it trained on
        store = {"mlflow_run_id": mlflow_run_id,
                 "artifact_path": store_folder(mlflow_run_id, files, TRAINED)}
    else:  # no tracking: the folder stays where it is (same machine only)
        store = {"local_dir": str(run_dir)}
    return {"name": name, "store": store, "hardware": hardware,
            "train_config": train_config.to_dict(),
            "steps": final.pop("steps"), "processes": final.pop("processes", 1), "final": final,
            "router_cv": _router_cv_series((run_dir / "metrics.jsonl").read_text())}


def branch_params(branch: dict[str, Any], train_config, threads: int, processes: int
                  ) -> dict[str, Any]:
    """The child run's params: `method`, `scale`, `lbc_form` first (what the MLflow compare
    view charts against), then the TrainConfig without its temporary paths."""
    fields = {k: v for k, v in train_config.to_dict().items()
              if k not in ("train_file", "output_dir", "method")}
    lbc_form = train_config.loramoe.lbc_form if train_config.method == "loramoe" else "none"
    if train_config.method == "loramoe" and train_config.loramoe.lbc_beta == 0:
        lbc_form = "off"
    return {"method": branch["method"], "scale": int(branch["scale"]), "lbc_form": lbc_form,
            "algorithm": train_config.method, "branch": branch_name(branch),
            "torch_threads": threads, "train_processes": processes, **fields}


def train_branch(config: PipelineConfig, train_config, processes: int, threads: int,
                 mlflow_run_id: str | None) -> dict[str, Any]:
    """Train in this process, or launch `processes` data-parallel ones; the final metrics."""
    from loramoe.tracking import MlflowSink, current_store
    from loramoe.train import train

    if processes > 1:
        from loramoe.pipeline.launch import train_in_processes

        return train_in_processes(config, train_config, processes, threads, mlflow_run_id,
                                  current_store() if mlflow_run_id else None)
    train(train_config, sink=MlflowSink(mlflow_run_id) if mlflow_run_id else None,
          progress=True)
    return json.loads((Path(train_config.output_dir) / "final_metrics.json").read_text())


def restore_run_dir(trained: dict[str, Any], path: Path) -> Path:
    """The branch's run folder (train_config.json, metrics.jsonl, adapter/ or model/), fetched
    from the store its reference names."""
    from loramoe.tracking import fetch_folder

    store = trained["store"]
    if "local_dir" in store:
        return Path(store["local_dir"])
    return fetch_folder(store["mlflow_run_id"], store["artifact_path"], path)


def evaluate_base_model(config: PipelineConfig, eval_frame: pd.DataFrame, workdir: Path,
                        mlflow_run_id: str | None = None,
                        train_sets: dict[int, pd.DataFrame] | None = None) -> dict[str, Any]:
    """The base model's generation metrics and probe on the eval set; reused from the cache
    when this model, eval set, dtype, settings and evaluation code were evaluated before.
    mlflow_run_id (the parent run): tagged `base_eval_settings`, where and how it was scored.
    train_sets (scale -> rows): checked against every method's max_length first."""
    from loramoe.evaluate import evaluate
    from loramoe.evaluate.cache import cached_base_evaluation, eval_settings
    from loramoe.precision import default_device, resolve_dtype

    check_gpus(config, evaluation=True)  # else scored on that worker's CPU
    check_method_targets(config)
    check_rows(config, train_sets)  # max_length and control-token text in the train sets
    eval_file = write_records(eval_frame, workdir / "eval.jsonl")
    # a branch's thread count, as the branches and the champion are evaluated: in bf16
    # another count rounds differently and its scores are not like for like (cache.rounding);
    # the base is evaluated alone, so on a CPU worker processes take the other branches'
    # cores, each at that count (evaluate/shards.py: the same outputs as one process)
    threads = use_branch_threads(config)
    device = default_device()
    workers = available_cores() // threads if device.type == "cpu" else 1
    settings = eval_settings(resolve_dtype(config.dtype, field="train.dtype"), device,
                             config.eval_batch_size, config.eval_generate_per_task)

    def compute(out: Path) -> dict[str, Any]:
        return evaluate(eval_file, out, model=config.base_model,
                        batch_size=config.eval_batch_size, dtype=config.dtype,
                        generate_per_task=config.eval_generate_per_task, workers=workers)

    base_dir = workdir / "base"
    metrics = (cached_base_evaluation(config.base_model, eval_file, base_dir, settings, compute)
               if config.base_eval_cache else compute(base_dir))
    if mlflow_run_id:
        from loramoe.tracking import set_tag

        set_tag(mlflow_run_id, "base_eval_settings", metrics["scored_by"]["settings"])
    return {"metrics": metrics, "predictions": read_records(base_dir / "predictions.jsonl"),
            "probe": read_records(base_dir / "probe.jsonl")}


def evaluate_branch(config: PipelineConfig, trained: dict[str, Any], eval_frame: pd.DataFrame,
                    base_predictions: pd.DataFrame, workdir: Path, mlflow_run_id: str | None,
                    base_probe: pd.DataFrame | None = None) -> dict[str, Any]:
    """Metrics, retention vs the base, router analysis; logged to the branch's MLflow run."""
    from loramoe.evaluate import evaluate
    from loramoe.tracking import log_metrics, store_folder

    check_gpus(config, evaluation=True)  # else on the CPU, unlike the base and the others
    run_dir = restore_run_dir(trained, workdir / "run")
    eval_file = write_records(eval_frame, workdir / "eval.jsonl")
    base_dir = workdir / "base"
    write_records(base_predictions, base_dir / "predictions.jsonl")
    if base_probe is not None:
        write_records(base_probe, base_dir / "probe.jsonl")
    out = workdir / "eval"
    use_branch_threads(config)
    metrics = evaluate(eval_file, out, run=run_dir, base_dir=base_dir,
                       batch_size=config.eval_batch_size,
                       generate_per_task=config.eval_generate_per_task,
                       untrained_tasks=config.untrained_tasks)
    if mlflow_run_id:
        from loramoe.pipeline.report import LOGGED, score_columns, task_columns

        columns = score_columns(metrics)  # scores with their 95% bounds as *_lo / *_hi
        summary = {**{k: columns[k] for k in LOGGED}, **task_columns(metrics["per_task"])}
        log_metrics(mlflow_run_id, {k: v for k, v in summary.items() if v is not None})
        store_folder(mlflow_run_id, [p for p in [out / "metrics.json", out / "predictions.jsonl",
                                                 out / "router.json", out / "router.png"]
                                     if p.exists()], "eval")
    return {"name": trained["name"], "method": trained["train_config"]["method"],
            "metrics": metrics, "router_cv": trained["router_cv"]}


def _router_cv_series(metrics_log: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_log.splitlines() if line.strip()]
    return [(r["step"], r["router_cv"]) for r in rows if "router_cv" in r]


def branch_outcome(branch) -> dict[str, Any]:
    """What the join keeps of one finished branch (a Metaflow input): names, scores, where
    its trained folder is, or its error; failed branches are reported, not dropped."""
    error = branch.train_error or branch.eval_error
    outcome = {"name": branch.branch_name, "method_name": branch.branch["method"],
               "scale": branch.branch["scale"], "seed": branch.branch.get("seed"),
               "mlflow_run_id": branch.mlflow_run_id,
               "error": str(error) if error else None}
    if not error:
        outcome.update({"method": branch.result["method"], "metrics": branch.result["metrics"],
                        "router_cv": branch.result["router_cv"], "trained": branch.trained})
    return outcome
