"""What a resumed run must share with the run it continues: its settings and its data.

`--resume` continues the optimizer, the schedule and the data order of the last checkpoint.
Under another learning rate, method, LBC weight or other train data it would train on
silently (and rewrite train_config.json as if the whole run had used them), or fail in a
state-dict load after the model has loaded. So a run folder records the sha256 of its train
file (train_data.json) beside its config, and a resume is checked against both before the
model loads or anything in the folder changes; so is the number of data-parallel processes
(each counts the batches it read: on another count a resume would skip other data). The
data may be a moved copy; the run's length, its checkpoint and log cadence and how a step is
computed (activation checkpointing, length pieces) may change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loramoe.train.config import RUN_CONFIG, TrainConfig, TrainConfigError

DATA_RECORD = "train_data.json"
LENGTH = ("max_steps", "epochs")
# where and how often the run writes, its length, and how a step is computed (not what it
# computes: activation checkpointing, length pieces), e.g. to continue on a smaller GPU
MAY_CHANGE = {"output_dir", "train_file", "save_every", "keep_checkpoints", "snapshot_steps",
              "log_every", "gradient_checkpointing", "split_by_length", *LENGTH}


def data_record(config: TrainConfig) -> dict[str, str]:
    from loramoe.digest import file_sha256

    return {"train_file": config.train_file, "sha256": file_sha256(config.train_file)}


def write_data_record(output_dir: Path, record: dict[str, str]) -> None:
    (output_dir / DATA_RECORD).write_text(json.dumps(record, indent=2))


def resume_point(accelerator, config: TrainConfig, resume: bool, made: dict[str, Any]
                 ) -> tuple[Path | None, dict[str, str]]:
    """The checkpoint to continue from (None: the start), a resume checked against the run's
    settings, data and `made` (processes, dtype: check_resume), and the record of the
    train data (on the main process; {} on the others)."""
    from loramoe.train.checkpoints import read_progress, start_checkpoint

    output_dir = Path(config.output_dir)
    data = data_record(config) if accelerator.is_main_process else {}
    checkpoint = start_checkpoint(accelerator, output_dir, resume, lambda checkpoint: check_resume(
        output_dir, config, data, read_progress(checkpoint), made))
    return checkpoint, data


def check_resume(output_dir: Path, config: TrainConfig, record: dict[str, str],
                 progress: dict[str, Any], made: dict[str, Any]) -> None:
    """TrainConfigError naming every setting that differs from the run's, its other data or
    another number of data-parallel processes than wrote the checkpoint (`progress`; `made`:
    this run's processes and resolved dtype); a warning when the run's length changes (the
    schedule from the checkpoint's step on is the new one's) or its frozen weights' dtype
    does (`dtype = "auto"` on another machine). What a run folder written before these
    records were kept lacks is not checked."""
    processes = made["processes"]
    if progress.get("processes", processes) not in (0, processes):
        # each process counts the batches it read: another count would skip other data
        raise TrainConfigError(
            f"TrainConfig: --resume continues {output_dir} on {processes} process(es), but "
            f"its checkpoint was written by {progress['processes']} (the global batch and "
            f"which samples each process has read depend on it); resume with "
            f"{progress['processes']} process(es), or train into a new output_dir")
    step = progress["step"]
    if progress.get("dtype") and progress["dtype"] != made["dtype"]:
        print(f"warning: --resume: the checkpoint's frozen weights were {progress['dtype']}, "
              f"here they are {made['dtype']} (dtype {config.dtype!r} on this machine): the "
              f"steps from {step} on round otherwise", file=sys.stderr)
    saved = output_dir / RUN_CONFIG
    if saved.is_file():
        then = flat(json.loads(saved.read_text()))
        now = flat(json.loads(json.dumps(config.to_dict())))  # as it would be saved
        differ = [key for key in now if key in then and now[key] != then[key]]
        if changed := [f"{key} {now[key]!r} (was {then[key]!r})" for key in differ
                       if key not in MAY_CHANGE]:
            raise TrainConfigError(
                f"TrainConfig: --resume continues {output_dir} with other settings than it "
                f"was trained with: {', '.join(changed)}; resume with the run's settings "
                f"({saved}), or train into a new output_dir")
        length = [key for key in LENGTH if key in differ
                  and not (key == "epochs" and now["max_steps"] is not None)]
        for key in length:
            print(f"warning: --resume: {key} {then[key]} -> {now[key]}: the learning-rate "
                  f"schedule from step {step} on is the new length's (warm-up and decay); "
                  "the steps before followed the old one", file=sys.stderr)
    data = output_dir / DATA_RECORD
    if data.is_file() and (earlier := json.loads(data.read_text()))["sha256"] != record["sha256"]:
        raise TrainConfigError(
            f"TrainConfig.train_file: {config.train_file} is not the data {output_dir} was "
            f"trained on (sha256 {record['sha256'][:12]}… vs {earlier['sha256'][:12]}… of "
            f"{earlier['train_file']}); resume with that data, or train into a new output_dir")


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"loramoe": {"lbc_beta": 0.1}} -> {"loramoe.lbc_beta": 0.1}."""
    found = {}
    for key, value in config.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found
