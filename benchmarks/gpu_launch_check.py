"""Multi-process train branches, launched as the pipeline launches them, against one plain
process: does each strategy's accelerate config (infra/accelerate/*.yaml) train, save and
give the same weights?

    python benchmarks/gpu_launch_check.py [--processes 1] [--runs sft:fsdp,loramoe:fsdp,...]

Each run trains the tiny random Llama of flows/configs/smoke.toml for 3 steps on 32 rows,
once in this process (`loramoe.train.train`, what a one-GPU branch does) and once through
`loramoe.pipeline.launch.train_in_processes` (what a `gpu > 1` branch does: accelerate
launch with the strategy's config on a GPU machine, torchrun + gloo on a CPU-only one, where
only DDP runs), with the same global batch, and prints the largest relative difference of
the saved weights. On one GPU the launch has one process: that checks the config, FSDP's
wrapping, sharded-state gathering and saving, not the gradient averaging (tests/test_distributed.py
checks that on CPU with 2 processes). Imports only what the bare GPU machine has.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import tomllib
import torch
from arguments import PRECISIONS, at_least
from safetensors.torch import load_file

from loramoe.pipeline.config import PipelineConfig
from loramoe.pipeline.launch import train_in_processes
from loramoe.train import train

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path) -> Path:
    rows = [{"id": f"r{i}", "task": "add", "task_type": ["knowledge", "downstream"][i % 2],
             "prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pipeline_config(strategy: str, processes: int, dtype: str) -> PipelineConfig:
    data = tomllib.loads((ROOT / "flows" / "configs" / "smoke.toml").read_text())
    data["launch"] = {"processes": processes, "strategy": strategy,
                      "full_model_strategy": strategy}
    # dropout 0: processes draw their own masks, so only a deterministic step can match
    # (a bf16 base rounds a batch of 4 and one of 8 differently: ~3e-2 after 3 Adam steps
    # on 2 CPU processes, 1e-4 in fp32)
    data["train"].update(batch_size=8 // processes, max_steps=3, max_length=64, dtype=dtype)
    data["methods"] = {"sft": {"method": "sft"},
                       "lora": {"method": "lora", "lora_dropout": 0.0},
                       "loramoe": {"method": "loramoe", "loramoe": {"dropout": 0.0}}}
    return PipelineConfig.from_dict(data)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(run_dir.glob("*/*.safetensors"))
    return {f"{f.name}:{k}": v.float() for f in files for k, v in load_file(f).items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"saved tensors differ: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a if a[k].norm() > 0)


def check(method: str, strategy: str, processes: int, dtype: str, work: Path,
          train_file: Path) -> str:
    config = pipeline_config(strategy, processes, dtype)
    base = config.train_config({"method": method}, train_file, work / "plain")
    plain = replace(base, batch_size=8)  # one process, the same global batch
    started = time.perf_counter()
    train(plain, progress=False)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    final = train_in_processes(config, replace(base, output_dir=str(work / "launched")),
                               processes, threads=4, mlflow_run_id=None, tracking_uri=None)
    launched_s = time.perf_counter() - started
    diff = largest_difference(weights(work / "plain"), weights(work / "launched"))
    verdict = "same" if diff < 1e-2 else "DIFFERENT"
    return (f"  {method:<8} {strategy:<15} {final['processes']:>3} {final['steps']:>5} "
            f"{plain_s:8.1f} {launched_s:9.1f} {diff:12.2e}  {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--processes", type=at_least(1), default=max(1, torch.cuda.device_count()))
    gpu_runs = "sft:fsdp,loramoe:fsdp,lora:fsdp,loramoe:ddp"
    if importlib.util.find_spec("deepspeed"):  # its wheels: benchmarks/gpu_wheels.sh
        gpu_runs += ",sft:deepspeed_zero3"
    parser.add_argument("--runs", default=gpu_runs if on_gpu else "sft:ddp,loramoe:ddp")
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto",
                        help="train.dtype of every run")
    args = parser.parse_args()
    print(f"Launched training vs one plain process ({'GPU' if on_gpu else 'CPU'}, "
          f"{args.processes} process(es), dtype {args.dtype}, tiny random Llama, 3 steps, "
          f"global batch 8)")
    print(f"  {'method':<8} {'launch':<15} {'procs':>3} {'steps':>5} {'plain s':>8} "
          f"{'launched s':>9} {'max rel diff':>12}")
    failed = 0
    for run in args.runs.split(","):
        method, strategy = run.split(":")
        with tempfile.TemporaryDirectory(prefix="loramoe-launch-check-") as tmp:
            work = Path(tmp)
            try:
                print(check(method, strategy, args.processes, args.dtype, work,
                            write_rows(work / "train.jsonl")), flush=True)
            except Exception as err:  # noqa: BLE001 - report every strategy, then fail
                failed += 1
                # the first line names the root cause (LaunchError puts it there)
                print(f"  {method:<8} {strategy:<15} FAILED: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:600]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
