"""Evaluate a base model or a trained run: generation, metrics, retention, routing.

The base model is evaluated once and its predictions reused for every run's retention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from loramoe.digest import file_sha256
from loramoe.evaluate.cache import code_digest, eval_settings, scored_otherwise
from loramoe.evaluate.generation import generate_predictions
from loramoe.evaluate.outputs import staged
from loramoe.evaluate.probe import probe_facts, probe_retention, probe_summary
from loramoe.evaluate.routing import RouterRecorder, plot_router, router_analysis
from loramoe.evaluate.scoring import (
    compare_with_base,
    retention,
    score_predictions,
    style_breakdown,
    summarize,
)
from loramoe.evaluate.shards import WHOLE, Shard
from loramoe.precision import dtype_name, resolve_device, resolve_dtype
from loramoe.train.config import RUN_CONFIG, check_run_weights, read_run_config, run_part


def load_for_eval(model: str | None = None, run: str | Path | None = None,
                  dtype: str | None = None, device: str | torch.device | None = None):
    """(model, tokenizer, train config dict or None) for a base name or a trained run dir,
    on `device` (default: the GPU if there is one) with frozen weights in `dtype` (default:
    the run's train dtype, else "auto"; loramoe/precision.py)."""
    from loramoe.model import load_base_model

    device = resolve_device(device)
    config = read_run_config(run) if run else None
    name = dtype or (config or {}).get("dtype", "auto")
    field = "dtype" if dtype or not config else (
        f"the run's dtype ({Path(run) / RUN_CONFIG}; evaluate with another dtype, e.g. "
        "--dtype auto, to override it)")
    weights = resolve_dtype(name, device, field=field)
    part = Path(run) / run_part(config["method"]) if config else None  # model/ or adapter/
    if config:
        check_run_weights(run, config)  # a broken run fails before the base model loads
    if config is None:
        m, tok = load_base_model(model, dtype=weights)
    elif config["method"] == "sft":
        m, tok = load_base_model(str(part), dtype=weights)
    else:
        m, tok = load_base_model(config["model"], dtype=weights)
        if config["method"] == "loramoe":
            from loramoe.adapter import load_adapter

            load_adapter(m, part)
        else:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, part)
    return m.to(device).eval(), tok, config


def generation_subset(frame: pd.DataFrame, per_task: int) -> pd.DataFrame:
    """All non-knowledge items, and the first `per_task` items of each knowledge task
    (0: all items)."""
    if not per_task:
        return frame
    knowledge = frame["task_type"] == "knowledge"
    first = frame[knowledge].groupby("task", sort=False).head(per_task).index
    return frame[~knowledge | frame.index.isin(first)].reset_index(drop=True)


def evaluate(eval_file: str | Path, out_dir: str | Path, model: str | None = None,
             run: str | Path | None = None, base_dir: str | Path | None = None,
             batch_size: int = 16, progress: bool = True, dtype: str | None = None,
             device: str | None = None, generate_per_task: int = 0,
             untrained_tasks: set[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """Evaluate and write predictions.jsonl, probe.jsonl, metrics.json (and router.json/.png).

    Every fact with choices is probed (probe.py); generation runs on every downstream item
    and, with generate_per_task, on that many knowledge items per task (a stratified subset:
    the builders shuffle each task's items). workers: processes that share the batches on a
    CPU, each at this process's thread count (shards.py; not for a LoRAMoE run, whose router
    is recorded in one process)."""
    from loramoe.data.collate import warn_control_text
    from loramoe.data.records import check_records, read_records, write_records

    full = read_records(Path(eval_file)).reset_index(drop=True)
    check_records(full, "eval", eval_file)  # before any model is loaded
    frame = generation_subset(full, generate_per_task)
    # the base's predictions and probe, read and checked before the model loads
    base, base_probe = read_base(Path(base_dir)) if base_dir is not None else (None, None)
    device = resolve_device(device)  # a device this machine has, before the model loads
    check_workers(workers, device, run)
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # a path that cannot be one fails here
    hf_model, tokenizer, config = load_for_eval(model, run, dtype, device)
    # such an item is prompted or probed with the token where its text says it
    warn_control_text(tokenizer, full, ("prompt", "answers", "choices"), "eval items", eval_file)
    recorder = None
    if config is not None and config["method"] == "loramoe":
        recorder = RouterRecorder().attach(hf_model)
    load = {"model": model, "run": run, "dtype": dtype_name(hf_model.dtype),
            "device": str(hf_model.device)}  # how a worker process loads it again
    predictions, probe = (
        answer_in_workers(hf_model, tokenizer, frame, full, batch_size, workers, load, progress)
        if workers > 1 else
        answer(hf_model, tokenizer, frame, full, batch_size, recorder, progress))
    scored = score_predictions(frame, predictions)
    with staged(out_dir) as out:  # out_dir's files replaced only once all are written
        write_records(scored, out / "predictions.jsonl")
        metrics = summarize(scored)
        if base is not None:
            metrics["retention"] = retention(base, scored)
            metrics["vs_base"] = compare_with_base(base, scored)
        if recorder is not None:
            metrics.update(router_metrics(recorder, scored, config, out, Path(run).name))
        metrics.update(probe_metrics(probe, full, out, base_probe, untrained_tasks))
        if base is not None:
            metrics["style"] = style_breakdown(base, scored, probe)
        metrics["generated_items"] = int(len(frame))
        metrics["workers"] = workers  # processes that shared the batches (same outputs)
        # per item, so the comparison step can pair two branches' downstream scores
        metrics["item_scores"] = {k: scored[k].tolist()
                                  for k in ("id", "task", "task_type", "score")}
        # so scores from another run are paired with these only when they are comparable
        metrics["scored_by"] = scored_by(Path(eval_file), hf_model, batch_size,
                                         generate_per_task)
        if base_dir is not None and (unlike := scored_otherwise(
                base_scored_by(Path(base_dir)), metrics["scored_by"])):
            metrics["base_scored_otherwise"] = unlike  # part of every retention, vs_base
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


BASE_COLUMNS = {"predictions.jsonl": ("id", "task", "task_type", "prediction", "score"),
                "probe.jsonl": ("id", "gold_logprob", "mc_correct")}


def read_base(base_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The base evaluation's predictions (for retention and vs_base) and probe (None when
    its eval file had no choices), each checked: predictions.jsonl present with the columns
    an evaluation writes, probe.jsonl's too when there is one. RecordsError naming the file
    and the columns it lacks."""
    from loramoe.data.records import RecordsError, read_records

    found = {}
    for name, columns in BASE_COLUMNS.items():
        path = base_dir / name
        if name == "probe.jsonl" and not path.is_file():
            continue  # an eval file without choices is not probed
        if not path.is_file():
            raise RecordsError(f"base evaluation folder {base_dir}: no {name} there (what "
                               "an evaluation of the base model writes)")
        found[name] = read_records(path)
        missing = [c for c in columns if c not in found[name].columns]
        if missing:
            raise RecordsError(f"{path}: lacks column(s) {missing}; not a base evaluation's "
                               f"{name}")
    return found["predictions.jsonl"], found.get("probe.jsonl")


def router_metrics(recorder: RouterRecorder, scored: pd.DataFrame, config: dict[str, Any],
                   out: Path, name: str) -> dict[str, Any]:
    """The router's weight per expert type per task (router.json, router.png) and its
    separation by task type."""
    from loramoe.config import LoRAMoEConfig

    moe = LoRAMoEConfig.from_dict(config["loramoe"])
    analysis = router_analysis(recorder, scored, moe.expert_type_ids(), moe.type_names)
    (out / "router.json").write_text(json.dumps(analysis, indent=2))
    plot_router(analysis, out / "router.png", title=f"Router weight per expert type ({name})")
    return {"router_type_weights": {t: v["type_weights"] for t, v in analysis["tasks"].items()},
            "router_separation": analysis["separation"]}


def base_scored_by(base_dir: Path) -> dict[str, str] | None:
    """The `scored_by` of the base evaluation in base_dir (its metrics.json), if it says."""
    path = base_dir / "metrics.json"
    return json.loads(path.read_text()).get("scored_by") if path.is_file() else None


def scored_by(eval_file: Path, model, batch_size: int, generate_per_task: int
              ) -> dict[str, str]:
    """What produced a run's scores, as the base-evaluation cache keys it: the eval records'
    sha256, the evaluation code's digest (cache.code_digest) and the settings that can move a
    score (cache.eval_settings: the weights' dtype, the device type, the batch size,
    generate_per_task, and the thread count and CPU or the GPU)."""
    settings = eval_settings(str(model.dtype).removeprefix("torch."), model.device,
                             batch_size, generate_per_task)
    return {"records": file_sha256(eval_file), "code": code_digest(),
            "settings": json.dumps(settings, sort_keys=True)}


def probe_metrics(probe: pd.DataFrame, full: pd.DataFrame, out: Path,
                  base_probe: pd.DataFrame | None, untrained_tasks: set[str] | None
                  ) -> dict[str, Any]:
    """Write probe.jsonl; the probe's summary and its retention vs the base's probe."""
    from loramoe.data.records import write_records

    write_records(probe, out / "probe.jsonl")
    if not len(probe):
        return {}
    found = {"probe": probe_summary(probe, full)}
    if base_probe is not None:
        found["probe_retention"] = probe_retention(base_probe, probe, full, untrained_tasks)
    return found


def answer(model, tokenizer, frame: pd.DataFrame, full: pd.DataFrame, batch_size: int,
           recorder: RouterRecorder | None = None, progress: bool = False, shard: Shard = WHOLE
           ) -> tuple[list[str | None], pd.DataFrame]:
    """Greedy predictions for `frame` and the probe of every fact of `full`, of `shard`'s
    batches."""
    predictions = generate_predictions(model, tokenizer, frame, batch_size, recorder=recorder,
                                       progress=progress, shard=shard)
    if recorder is not None:
        recorder.detach()  # the probe's forwards must not reach the recorder
    probe = probe_facts(model, tokenizer, full, batch_size=max(batch_size, 64), shard=shard)
    return predictions, probe


def check_workers(workers: int, device: torch.device, run) -> None:
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if workers == 1:
        return
    if device.type != "cpu":
        raise ValueError(f"workers = {workers}: worker processes share a CPU's cores; on "
                         f"{device} evaluate in one process")
    if run is not None and read_run_config(run)["method"] == "loramoe":
        raise ValueError(f"workers = {workers}: a LoRAMoE run's router is recorded in one "
                         "process; evaluate it with workers = 1")


def answer_in_workers(model, tokenizer, frame: pd.DataFrame, full: pd.DataFrame,
                      batch_size: int, workers: int, load: dict[str, Any], progress: bool
                      ) -> tuple[list[str], pd.DataFrame]:
    """`answer` with the batches shared by this process (shard 0, `model`) and workers - 1
    worker processes, each loading the model as `load` says at this process's thread count."""
    import tempfile

    from loramoe.evaluate.shards import start_worker

    with tempfile.TemporaryDirectory(prefix="loramoe-shards-") as folder:
        others = [start_worker(Path(folder), f"shard-{i}", {
            "load": load, "frame": frame, "full": full, "batch_size": batch_size,
            "shard": Shard(i, workers), "threads": torch.get_num_threads()})
            for i in range(1, workers)]
        try:
            parts = [answer(model, tokenizer, frame, full, batch_size, progress=progress,
                            shard=Shard(0, workers))]
            parts += [other.wait() for other in others]
        finally:
            for other in others:
                other.stop()
    predictions = [next(p for p in column if p is not None)
                   for column in zip(*(part[0] for part in parts), strict=True)]
    position = {fact: at for at, fact in enumerate(full["id"])}
    probes = [part[1] for part in parts if len(part[1])] or [parts[0][1]]
    probe = pd.concat(probes).sort_values("id", key=lambda ids: ids.map(position))
    return predictions, probe.reset_index(drop=True)
