"""Threads for a branch: Metaflow's local runtime runs at most `local_parallel_branches`
tasks at once (flows/full_pipeline.py sets its max-workers from the config), and each task
takes its share of the cores (loramoe/cores.py: the affinity capped by a cgroup CPU quota),
so parallel branches never oversubscribe the machine."""

from __future__ import annotations

import os

from loramoe.cores import available_cores
from loramoe.pipeline.config import PipelineConfig


def use_branch_threads(config: PipelineConfig, processes: int = 1) -> int:
    """Set torch's intra-op threads to this task's share of the cores (split again between
    its `processes` training processes); returns one process's share."""
    import torch

    threads = max(1, available_cores() // (config.local_parallel_branches * processes))
    torch.set_num_threads(threads)
    return threads


class GpuRequestError(RuntimeError):
    """The step was given fewer GPUs than config.resources.gpu (or eval_gpu) asks for."""


def check_gpus(config: PipelineConfig, evaluation: bool = False) -> None:
    """Fail fast, naming the field, when the step sees fewer GPUs than it asked for (a
    worker scheduled without them, CUDA_VISIBLE_DEVICES too narrow), instead of hanging
    or silently training or scoring on fewer (or on the CPU). evaluation: an evaluation
    step, which asks for resources.eval_gpu (config.eval_gpus)."""
    import torch

    field, wanted = (("eval_gpu", config.eval_gpus) if evaluation else
                     ("gpu", int(config.resources.get("gpu", 0))))
    visible = torch.cuda.device_count()
    if wanted > visible:
        implied = (f" (its default with gpu = {config.resources.get('gpu', 0)})"
                   if evaluation and "eval_gpu" not in config.resources else "")
        raise GpuRequestError(
            f"config.resources.{field} = {wanted}{implied}, but this step sees {visible} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            f"Run on workers that have them (--with kubernetes / --with batch), or set "
            f"resources.{field} = {visible} for this machine")
