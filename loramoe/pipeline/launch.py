"""A train branch on several data-parallel processes, launched from the step.

One branch = one worker with `resources.gpu` GPUs; the step starts one training process
per GPU with accelerate's launcher (the strategy's infra/accelerate/<strategy>.yaml: DDP,
FSDP or ZeRO-3), or on a CPU-only machine with torchrun (gloo), which is how the equality
with one process is tested. Each process runs loramoe.pipeline.worker. Multi-*node*
branches would use Metaflow's @parallel with metaflow-torchrun's @torchrun instead
(docs: infra/README.md says why this one-node launch was chosen).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from loramoe.pipeline.config import PipelineConfig, PipelineConfigError
from loramoe.train import TrainConfig

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "infra" / "accelerate"


class LaunchError(RuntimeError):
    """The training processes failed; the message keeps the end of their output."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(config: PipelineConfig, method: str, processes: int, on_gpu: bool
             ) -> tuple[list[str], dict]:
    """(command prefix up to the worker module, extra environment)."""
    port, strategy = str(free_port()), config.launch.strategy_for(method)
    field = "full_model_strategy" if method == "sft" else "strategy"
    if on_gpu:
        file = ACCELERATE_CONFIGS / f"{strategy}.yaml"
        if not file.is_file():
            raise PipelineConfigError(f"config.launch.{field}: {file} is missing (the "
                                      f"worker image needs the repository's infra/ folder)")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(file),
                "--num_processes", str(processes), "--num_machines", "1",
                "--main_process_port", port], {}
    if strategy != "ddp":
        raise PipelineConfigError(f"config.launch.{field} = {strategy!r} needs GPUs; on CPU "
                                  f"only 'ddp' (gloo) runs: set it to 'ddp'")
    # accelerate picks gloo data parallelism on CPU only when told to use the CPU
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", port], {"ACCELERATE_USE_CPU": "true"}


# what the other ranks raise when one rank dies mid-collective (gloo; NCCL's watchdog)
PEER_ECHOES = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
               "NCCL communicator was aborted")


def root_cause(stderr: str) -> str:
    """The last exception a worker printed that is its own: torchrun's ChildFailedError
    summary says only that a rank failed, and the ranks left waiting in a collective when
    one died raise a connection error that hides the one that died."""
    errors = [line.split("]: ", 1)[-1].strip() for line in stderr.splitlines()
              if re.search(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b", line)
              and "ChildFailedError" not in line]
    own = [e for e in errors if not any(echo in e for echo in PEER_ECHOES)]
    return (own or errors)[-1] if errors else "no exception in the output (see below)"


def train_in_processes(config: PipelineConfig, train_config: TrainConfig, processes: int,
                       threads: int, mlflow_run_id: str | None,
                       tracking_uri: str | None) -> dict:
    """Run the trainer on `processes` processes; returns its final_metrics.json."""
    import torch

    prefix, env = launcher(config, train_config.method, processes, torch.cuda.is_available())
    with tempfile.TemporaryDirectory(prefix="loramoe-launch-") as folder:
        config_file = Path(folder) / "train_config.json"
        config_file.write_text(json.dumps(train_config.to_dict()))
        worker = ["-m", "loramoe.pipeline.worker", "--config", str(config_file),
                  "--threads", str(threads)]
        if mlflow_run_id:
            worker += ["--mlflow-run-id", mlflow_run_id, "--tracking-uri", tracking_uri or ""]
        done = subprocess.run(prefix + worker, env={**os.environ, **env, "OMP_NUM_THREADS":
                                                    str(threads)},
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"{processes}-process training failed (exit {done.returncode}): "
                          f"{root_cause(done.stderr)}\n{done.stderr[-4000:]}")
    return json.loads((Path(train_config.output_dir) / "final_metrics.json").read_text())
