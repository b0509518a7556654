"""Threads for a branch: Metaflow's local runtime runs at most `local_parallel_branches`
tasks at once (flows/full_pipeline.py sets its max-workers from the config), and each task
takes its share of the cores, so parallel branches never oversubscribe the machine."""

from __future__ import annotations

import math
import os
from pathlib import Path

from loramoe.pipeline.config import PipelineConfig

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cores() -> int:
    """CPUs this process may keep busy: its CPU affinity, capped by a cgroup CPU quota
    (`docker run --cpus`, a Kubernetes CPU limit), which the affinity does not show — 2 CPUs
    of quota on a 64-core host would otherwise get 64 threads, time-sliced to a crawl."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota()
    return max(1, min(cores or 1, math.ceil(quota))) if quota else cores or 1


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
                     ) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its ancestors, cgroup
    v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or
    unreadable. Rounded up by the caller, as the JVM and Go runtimes do."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            mounts = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu"]
        else:
            continue
        for mount in mounts:
            quotas += [q for d in cgroup_dirs(mount, path) if (q := read_quota(d)) is not None]
    return min(quotas, default=None)


def cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory under `mount` and its ancestors up to `mount`; the mount
    alone when the path is not there (a container sees its own cgroup as the root)."""
    here = mount / path.lstrip("/")
    if not here.is_dir():
        return [mount] if mount.is_dir() else []
    return [here, *[p for p in here.parents if p.is_relative_to(mount)]]


def read_quota(directory: Path) -> float | None:
    """CPUs allowed by one cgroup directory's quota, None if unlimited or absent."""
    try:
        if (directory / "cpu.max").exists():  # v2: "max 100000" or "200000 100000"
            quota, period = (directory / "cpu.max").read_text().split()[:2]
        else:  # v1: quota -1 = unlimited
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        cpus = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


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
