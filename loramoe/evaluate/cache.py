"""The base model's evaluation, computed once per (model, eval set) and reused across runs.

The key is a content hash: the bytes of every file of the model folder (weights, config,
tokenizer), the eval file's bytes, the resolved dtype and device type, the evaluation's
settings (the thread count and the CPU or GPU among them: `rounding`), the source of the
evaluation code and of the prompt formatting, and the torch and transformers versions (so a
change to scoring, the probe or the chat formatting recomputes instead of reusing stale
numbers). A hit copies predictions.jsonl, probe.jsonl and metrics.json into the output
folder without loading the model.

Hashing reads the model's files once per process (the default model's ~540 MB folder in
~1 s; a 7B model's ~13 GB in tens of seconds, still far less than evaluating it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramoe.digest import file_sha256

if TYPE_CHECKING:
    import torch

OUTPUTS = ("predictions.jsonl", "probe.jsonl", "metrics.json")


@cache
def folder_digest(folder: str) -> str:
    """sha256 over the relative names and contents of every file under `folder`."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_digest(model: str) -> str:
    """Content hash of a model: its resolved folder's files (a hub id resolves to its local
    snapshot; one not downloaded yet is keyed by its id and revision-free name)."""
    from loramoe.model import resolve_model_path

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return folder_digest(str(path.resolve()))
    return hashlib.sha256(f"hub:{model}".encode()).hexdigest()


def code_digest() -> str:
    """The evaluation code's source (and the prompt formatting it uses) and the torch and
    transformers versions: a change to how answers are produced or scored invalidates."""
    import torch
    import transformers

    here = Path(__file__).resolve().parent
    sources = [*sorted(here.glob("*.py")), here.parent / "data" / "collate.py",
               here.parent / "data" / "records.py"]
    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def eval_settings(dtype, device: str | torch.device, batch_size: int, generate_per_task: int
                  ) -> dict[str, Any]:
    """The settings that can move an evaluation's scores besides the model, the eval records
    and the code: the weights' dtype, the device type, the batch size, generate_per_task and
    the hardware's rounding (`rounding`). The base-evaluation cache keys on them, and a run's
    `scored_by` records them."""
    import torch

    device = torch.device(device)
    return {"dtype": dtype, "device": device.type, "batch_size": batch_size,
            "generate_per_task": generate_per_task, **rounding(device)}


def rounding(device: str | torch.device) -> dict[str, Any]:
    """What decides the order in which the hardware sums a product, hence its rounding: on a
    CPU torch's thread count and the CPU as torch picks its kernels (precision.cpu_kernels),
    on a GPU its name (of the model's GPU: a machine may mix kinds). In bf16 the default
    model scored 68 of the default mixture's 2,274 eval items differently at 1 thread than
    at 2 (34 each way, knowledge score 0.276 vs 0.286; each thread count repeats itself
    exactly; docs/benchmarks.md §3)."""
    import torch

    from loramoe.precision import hardware_name

    device = torch.device(device)
    if device.type == "cuda":
        return {"gpu": hardware_name(device)}
    if device.type != "cpu":
        return {}
    return {"threads": torch.get_num_threads(), "cpu": hardware_name(device)}


def scored_otherwise(theirs: dict[str, str] | None, ours: dict[str, str] | None) -> str:
    """What differs between two evaluations' `scored_by`, e.g. "threads 2 vs 1"; '' when
    nothing does or either does not say."""
    if not theirs or not ours:
        return ""
    unlike = [f"{what} differ" for key, what in (("records", "eval records"),
                                                  ("code", "evaluation code"))
              if theirs.get(key) != ours.get(key)]
    base, this = (json.loads(s.get("settings", "{}")) for s in (theirs, ours))
    unlike += [f"{key} {base.get(key)} vs {this.get(key)}" for key in sorted({*base, *this})
               if base.get(key) != this.get(key)]
    return ", ".join(unlike)


def base_eval_key(model: str, eval_file: Path, settings: dict[str, Any]) -> str:
    parts = {"model": model_digest(model), "eval": file_sha256(eval_file),
             "code": code_digest(), **{k: str(v) for k, v in sorted(settings.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    from loramoe.model_paths import cache_root

    return cache_root() / "base_eval"


def cached_base_evaluation(model: str, eval_file: str | Path, out_dir: str | Path,
                           settings: dict[str, Any], compute) -> dict[str, Any]:
    """metrics of the base model on eval_file, with its files in out_dir: from the cache
    when this (model, eval set, settings, code) was evaluated before, else compute(out_dir)
    and store its files. `settings` must hold everything else that changes the result."""
    out = Path(out_dir)
    entry = cache_dir() / base_eval_key(model, Path(eval_file), settings)
    if all((entry / name).is_file() for name in OUTPUTS):
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(entry / name, out / name)
        metrics = json.loads((out / "metrics.json").read_text())
        return {**metrics, "cache": {"hit": True, "key": entry.name}}
    metrics = compute(out)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    for name in OUTPUTS:
        if (out / name).is_file():
            shutil.copyfile(out / name, tmp / name)
    try:
        os.replace(tmp, entry)  # atomic: a concurrent run that got there first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**metrics, "cache": {"hit": False, "key": entry.name}}
