"""The CPUs this process may keep busy, and torch's thread count capped to them.

The CPU affinity does not show a cgroup CPU quota (`docker run --cpus 2`, a Kubernetes CPU
limit), and neither does torch's default thread count: on a 64-core host a container with 2
CPUs of quota would run 64 threads, time-sliced by the kernel's throttling to a crawl.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cores() -> int:
    """Its CPU affinity, capped by its cgroup CPU quota (rounded up)."""
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
        for mount in dict.fromkeys(mounts):  # v1 "cpu" names the same mount twice
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


def cap_threads_to_cores() -> int:
    """Lower torch's intra-op threads to `available_cores()` unless OMP_NUM_THREADS chose
    them (torchrun sets it too); returns the count in use. For the CLIs: the pipeline's
    tasks set their share explicitly (pipeline/threads.py)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), available_cores()))
    return torch.get_num_threads()
