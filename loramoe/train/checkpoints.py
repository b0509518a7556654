"""Training checkpoints that are complete and finite, or not there at all.

A checkpoint is written to a hidden `.step_N.partial` folder and renamed to `step_N` only
once every file (accelerate's state and our progress.json) is on disk, so a worker killed
mid-save never leaves a `step_N` that blocks `--resume`. A folder is a *good* checkpoint
only if it is complete and its weights are finite: the trainer checks the parameters
before writing, and `last_good_checkpoint` checks the files before naming one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

PROGRESS = "progress.json"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`step_N` folders with their progress file, oldest first (half-written ones skipped)."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob("step_*") if _step_of(p) is not None
             and (p / PROGRESS).is_file()] if folder.is_dir() else []
    return sorted(found, key=_step_of)


def weights_are_finite(checkpoint: Path) -> bool:
    """Every tensor in the checkpoint's safetensors files is finite."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint).rglob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return False
    return bool(files)


def last_good_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint whose weights are finite, or None."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        if weights_are_finite(checkpoint):
            return checkpoint
        print(f"warning: skipping checkpoint {checkpoint}: its weights are not finite",
              file=sys.stderr)
    return None


def save_checkpoint(accelerator, output_dir: Path, progress: dict[str, int]) -> Path:
    """Write accelerate's state + progress under `.step_N.partial`, then rename it."""
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"step_{progress['step']}"
    partial = folder / f".step_{progress['step']}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / PROGRESS).write_text(json.dumps(progress))
        if final.exists():  # an earlier attempt of this very run got this far
            shutil.rmtree(final)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def read_progress(checkpoint: Path) -> dict[str, int]:
    return json.loads((checkpoint / PROGRESS).read_text())


def keep_metrics_until(metrics_file: Path, step: int) -> None:
    """On resume from `step`: drop logged rows after it, which the resumed run logs again."""
    if not metrics_file.exists():
        return
    rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    metrics_file.write_text("".join(line + "\n" for line in kept))


def make_run_folder(output_dir: Path) -> None:
    """The run folder, made before the model loads (it was made only after the model had
    loaded and the data were encoded), or TrainConfigError naming the field."""
    from loramoe.folders import folder_problem
    from loramoe.train.config import TrainConfigError

    try:
        if not (problem := folder_problem(output_dir)):
            output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what access() cannot tell, e.g. /proc
        problem = f"{output_dir} cannot be made: {err.strerror or err}"
    if problem:
        raise TrainConfigError(f"TrainConfig.output_dir: {problem}")


def set_aside(path: Path) -> Path | None:
    """Rename an earlier file to `NAME.previous-K` (first free K) instead of deleting it."""
    if not path.exists():
        return None
    k = 1
    while (target := path.with_name(f"{path.name}.previous-{k}")).exists():
        k += 1
    os.replace(path, target)
    return target


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf; the last good checkpoint is
    kept."""


def diverged(what: str, step: int, output_dir: Path, learning_rate: float,
             detail: str = "") -> TrainingDiverged:
    kept = last_good_checkpoint(output_dir)
    detail = f" ({detail})" if detail else ""
    return TrainingDiverged(
        f"{what} at step {step}{detail}; stopped before the update. Last good checkpoint: "
        f"{kept or 'none yet'}. Lower the learning rate ({learning_rate}) or check the data.")


def save_if_finite(accelerator, params: list[torch.nn.Parameter], progress: dict[str, int],
                   config) -> None:
    """Save a checkpoint under config.output_dir only if every trainable weight is finite
    (never a 'good' NaN one); then keep the newest config.keep_checkpoints (0: all)."""
    output_dir, keep = Path(config.output_dir), config.keep_checkpoints
    if not bool(torch.isfinite(torch.nn.utils.get_total_norm(params))):
        raise diverged("non-finite weights", progress["step"], output_dir, config.learning_rate)
    save_checkpoint(accelerator, output_dir, progress)
    if keep and accelerator.is_main_process:
        for older in complete_checkpoints(output_dir)[:-keep]:  # oldest first
            shutil.rmtree(older)


def gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def start_checkpoint(accelerator, output_dir: Path, resume: bool,
                     check: Callable[[Path], None] = lambda checkpoint: None) -> Path | None:
    """The checkpoint every process resumes from (the main process chooses), or None.
    `check(checkpoint)` may refuse the resume before anything in output_dir changes."""
    checkpoint = (_choose_start(output_dir, resume, check) if accelerator.is_main_process
                  else None)
    if accelerator.num_processes == 1:
        return checkpoint
    from accelerate.utils import broadcast_object_list

    chosen = [str(checkpoint) if checkpoint is not None else None]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0]) if chosen[0] else None


def _choose_start(output_dir: Path, resume: bool, check: Callable[[Path], None]
                  ) -> Path | None:
    """After checking that a fresh run would not overwrite an earlier one; earlier metrics
    are kept, never deleted."""
    from loramoe.train.config import TrainConfigError

    make_run_folder(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if not resume:
        earlier = complete_checkpoints(output_dir)
        if earlier or (output_dir / "final_metrics.json").exists():
            raise TrainConfigError(
                f"TrainConfig.output_dir: {output_dir} holds an earlier run "
                f"({earlier[-1].name if earlier else 'final_metrics.json'}); continue it with "
                f"--resume, or choose another output_dir")
        set_aside(metrics)
        return None
    checkpoint = last_good_checkpoint(output_dir)
    if checkpoint is None:
        kept = set_aside(metrics)
        print(f"warning: --resume: no complete checkpoint under {output_dir / 'checkpoints'}; "
              f"starting from step 0" + (f" (earlier metrics kept in {kept})" if kept else ""),
              file=sys.stderr)
        return None
    check(checkpoint)
    keep_metrics_until(metrics, read_progress(checkpoint)["step"])
    return checkpoint
