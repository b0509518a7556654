"""The cores a process may use: the CPU affinity capped by a cgroup CPU quota (docker --cpus,
a Kubernetes CPU limit), read from fake cgroup trees laid out as the kernel does; a branch's
share of them, and the CLIs' torch threads capped to them."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from loramoe import cores
from loramoe.cores import available_cores, cap_threads_to_cores, cgroup_cpu_quota
from loramoe.pipeline import threads
from loramoe.pipeline.config import PipelineConfig

SMOKE = Path(__file__).resolve().parents[1] / "flows" / "configs" / "smoke.toml"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_of_a_container(tmp_path):
    # docker --cpus=1.5 with a cgroup namespace: the container's cgroup is the root
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "fs" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(1.5)


def test_v2_unlimited_is_none(tmp_path):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") is None


def test_v2_the_tightest_ancestor_wins(tmp_path):
    # a pod limited to 3 CPUs, its container to 4: the kernel enforces both
    write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "fs" / "kubepods" / "pod1" / "cpu.max", "300000 100000\n")
    write(tmp_path / "fs" / "kubepods" / "pod1" / "ctr" / "cpu.max", "400000 100000\n")
    write(tmp_path / "fs" / "kubepods" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(3.0)


def test_v1_quota_and_unlimited(tmp_path):
    lines = "12:memory:/x\n4:cpu,cpuacct:/docker/abc\n"
    write(tmp_path / "proc", lines)
    cpu = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    write(cpu / "cpu.cfs_quota_us", "200000\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(2.0)
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") is None


def test_v1_container_sees_its_cgroup_as_the_mount(tmp_path):
    # no cgroup namespace: /proc says /docker/abc, but the mount's root is that cgroup
    write(tmp_path / "proc", "4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") == pytest.approx(0.5)


@pytest.mark.parametrize("proc, files", [
    (None, {}),  # no /proc/self/cgroup (not Linux)
    ("garbage\n", {}),
    ("0::/\n", {"cpu.max": "lots 100000"}),
    ("0::/\n", {"cpu.max": "100000 0"}),
])
def test_unreadable_quota_is_none(tmp_path, proc, files):
    if proc is not None:
        write(tmp_path / "proc", proc)
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "proc") is None


@pytest.fixture
def sixty_four_cores(monkeypatch):
    """A big host: the affinity shows 64 CPUs, whatever the quota allows."""
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(64)),
                        raising=False)


def test_cores_are_capped_by_the_quota_and_rounded_up(monkeypatch, sixty_four_cores):
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 2.5)
    assert available_cores() == 3
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 0.2)
    assert available_cores() == 1
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: None)
    assert available_cores() == 64


@pytest.fixture
def keep_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_branch_threads_share_the_quota(monkeypatch, keep_threads, sixty_four_cores):
    import torch

    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 4.0)
    data = tomllib.loads(SMOKE.read_text()) | {"local_parallel_branches": 2}
    assert threads.use_branch_threads(PipelineConfig.from_dict(data, SMOKE.parent)) == 2
    assert torch.get_num_threads() == 2


def test_cli_threads_are_capped_to_the_quota_unless_omp_chose(monkeypatch, keep_threads,
                                                              sixty_four_cores):
    import torch

    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 1.0)
    assert cap_threads_to_cores() == 1 == torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cap_threads_to_cores() == 2  # the user's (or torchrun's) explicit choice
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: None)
    assert cap_threads_to_cores() == 2  # never raised above torch's own count
