"""Capacity detection: options override; ``auto`` measures cgroups, affinity and the host.

Each test builds a fake ``/`` under tmp_path (``proc/self/cgroup``, ``proc/meminfo``,
``sys/fs/cgroup/...``) and points ``detect_capacity(root=...)`` at it.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from jobcell.scheduler import capacity as capacity_module
from jobcell.scheduler.capacity import (
    Capacity,
    GpuDevice,
    detect_capacity,
    host_cpu_count,
    host_memory_mb,
)

from .fake_trees import GIB, V1_UNLIMITED, meminfo, write_files

REAL_CPUS = len(os.sched_getaffinity(0))
REAL_MEMORY_MB = psutil.virtual_memory().total // (1024 * 1024)
NO_GPUS = {"detect_gpus": False}


@pytest.fixture
def sixteen_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-CPU host, so cgroup quotas of a few CPUs are the tightest figure anywhere."""
    monkeypatch.setattr(capacity_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: 16)


def detect(root: Path, reserve: int = 0) -> Capacity:
    return detect_capacity("auto", "auto", reserve, root=root, **NO_GPUS)


def assert_unlimited(found: Capacity, memory_mb: int = 65536) -> None:
    """No cgroup limit applied: affinity and /proc/meminfo decide."""
    assert found.cpu_slots == REAL_CPUS
    assert found.cpu_source == f"cpu affinity ({REAL_CPUS} of {os.cpu_count()} CPUs)"
    assert found.memory_mb == memory_mb
    assert found.memory_source == f"/proc/meminfo MemTotal ({memory_mb} MB) minus reserve 0 MB"


def test_numbers_override_detection(tmp_path: Path) -> None:
    found = detect_capacity(3, 8192, 2048, root=tmp_path, **NO_GPUS)
    assert (found.cpu_slots, found.memory_mb) == (3, 6144)
    assert found.cpu_source == "option cpu_slots"
    assert found.memory_source == "option node_memory_mb minus reserve 2048 MB"


@pytest.mark.usefixtures("sixteen_cpus")
def test_cgroup_v2_takes_the_tightest_limit_on_the_way_up(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/user.slice/job.scope\n",
        "proc/meminfo": meminfo(65536),
        "sys/fs/cgroup/cgroup.controllers": "cpu memory pids\n",
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
        "sys/fs/cgroup/user.slice/memory.max": str(GIB),
        "sys/fs/cgroup/user.slice/job.scope/cpu.max": "150000 100000\n",
        "sys/fs/cgroup/user.slice/job.scope/memory.max": str(4 * GIB),
    })
    found = detect(root, reserve=100)
    assert found.cpu_slots == 1  # 1.5 CPUs round down
    assert found.cpu_source == "cgroup v2 cpu.max (1.5 CPUs) at /sys/fs/cgroup/user.slice/job.scope"
    assert found.memory_mb == 1024 - 100
    assert found.memory_source == ("cgroup v2 memory.max (1024 MB) at /sys/fs/cgroup/user.slice"
                                   " minus reserve 100 MB")


@pytest.mark.usefixtures("sixteen_cpus")
def test_a_parent_cpu_quota_applies_to_its_children(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/a/b\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu\n",
        "sys/fs/cgroup/a/cpu.max": "300000 100000\n",
        "sys/fs/cgroup/a/b/cpu.max": "800000 100000\n",
    })
    found = detect(root)
    assert found.cpu_slots == 3
    assert found.cpu_source == "cgroup v2 cpu.max (3 CPUs) at /sys/fs/cgroup/a"


def test_a_quota_below_one_cpu_still_gives_one_slot(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu\n",
        "sys/fs/cgroup/cpu.max": "50000 100000\n",
    })
    assert detect(root).cpu_slots == 1


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/job\n",
        "proc/meminfo": meminfo(65536),
        "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
        "sys/fs/cgroup/job/cpu.max": "max 100000\n",
        "sys/fs/cgroup/job/memory.max": "max\n",
    })
    assert_unlimited(detect(root))


@pytest.mark.usefixtures("sixteen_cpus")
def test_cgroup_v1_quota_and_memory_limit(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "7:memory:/job\n4:cpu,cpuacct:/job\n1:name=systemd:/job\n",
        "proc/meminfo": meminfo(65536),
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(3 * GIB),
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
    })
    found = detect(root, reserve=2048)
    assert found.cpu_slots == 2
    assert found.cpu_source == ("cgroup v1 cpu.cfs_quota_us (2 CPUs) at "
                                "/sys/fs/cgroup/cpu,cpuacct/job")
    assert found.memory_mb == 3072 - 2048
    assert found.memory_source == ("cgroup v1 memory.limit_in_bytes (3072 MB) at "
                                   "/sys/fs/cgroup/memory/job minus reserve 2048 MB")


def test_cgroup_v1_without_limits(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "7:memory:/job\n4:cpu,cpuacct:/job\n",
        "proc/meminfo": meminfo(65536),
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(2**63 - 1),
    })
    assert_unlimited(detect(root))


@pytest.mark.usefixtures("sixteen_cpus")
def test_hybrid_v1_controllers_with_a_unified_mount(tmp_path: Path) -> None:
    # Like this project's own machine: single-controller v1 mounts, an empty unified
    # hierarchy, and a memory cgroup path the container's mount does not show.
    root = write_files(tmp_path, {
        "proc/self/cgroup": "4:memory:/process_api/f76b\n2:cpuacct:/\n1:cpu:/\n0::/\n",
        "proc/meminfo": meminfo(65536),
        "sys/fs/cgroup/unified/cgroup.controllers": "",
        "sys/fs/cgroup/unified/cpu.stat": "usage_usec 0\n",
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "400000\n",
        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 * GIB),
    })
    found = detect(root)
    assert (found.cpu_slots, found.memory_mb) == (4, 2048)
    assert found.cpu_source == "cgroup v1 cpu.cfs_quota_us (4 CPUs) at /sys/fs/cgroup/cpu"
    assert found.memory_source == ("cgroup v1 memory.limit_in_bytes (2048 MB) at "
                                   "/sys/fs/cgroup/memory minus reserve 0 MB")


@pytest.mark.usefixtures("sixteen_cpus")
def test_a_cgroup_path_hidden_by_a_namespace_falls_back_to_the_mount_root(
        tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/kubepods/pod1/abc\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
        "sys/fs/cgroup/cpu.max": "250000 100000\n",
        "sys/fs/cgroup/memory.max": str(GIB // 2),
    })
    found = detect(root)
    assert found.cpu_source == "cgroup v2 cpu.max (2.5 CPUs) at /sys/fs/cgroup"
    assert (found.cpu_slots, found.memory_mb) == (2, 512)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    root = write_files(tmp_path, {"proc/meminfo": meminfo(32000)})
    assert_unlimited(detect(root), memory_mb=32000)


def test_missing_meminfo_falls_back_to_psutil(tmp_path: Path) -> None:
    found = detect(tmp_path)
    assert found.memory_mb == REAL_MEMORY_MB
    assert found.memory_source == f"host memory ({REAL_MEMORY_MB} MB, psutil) minus reserve 0 MB"


def test_missing_meminfo_still_honours_a_cgroup_limit(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/memory.max": str(256 * 1024 * 1024),
    })
    assert detect(root).memory_mb == 256


def test_garbage_files_are_no_limit_not_a_crash(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "nonsense\n::\n0::/job\n3:memory\n",
        "proc/meminfo": "MemTotal: lots kB\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
        "sys/fs/cgroup/job/cpu.max": "a lot of cpus\n",
        "sys/fs/cgroup/job/memory.max": b"\xff\xfe\x00",
        "sys/fs/cgroup/cpu.max": "-5 100000\n",
        "sys/fs/cgroup/memory.max": "-1\n",
    })
    (root / "sys/fs/cgroup/job/memory.max").unlink()
    (root / "sys/fs/cgroup/job/memory.max").mkdir()  # unreadable: a directory
    found = detect(root)
    assert (found.cpu_slots, found.memory_mb) == (REAL_CPUS, REAL_MEMORY_MB)


def test_undecodable_limit_file_is_ignored(tmp_path: Path) -> None:
    root = write_files(tmp_path, {
        "proc/self/cgroup": "0::/\n",
        "proc/meminfo": meminfo(4000),
        "sys/fs/cgroup/cgroup.controllers": "memory\n",
        "sys/fs/cgroup/memory.max": b"\xff\xfe\x00",
    })
    assert detect(root).memory_mb == 4000


def test_the_real_machine_is_measured() -> None:
    found = detect_capacity("auto", "auto", 0, detect_gpus=False)
    assert 1 <= found.cpu_slots <= REAL_CPUS
    assert 0 < found.memory_mb <= REAL_MEMORY_MB
    assert found.gpu_source == "not detected"


def test_host_cpu_count_uses_affinity_then_the_host_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capacity_module.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: 8)
    assert host_cpu_count() == (3, "cpu affinity (3 of 8 CPUs)")

    def unavailable(pid: int) -> set[int]:
        raise OSError("no affinity here")

    monkeypatch.setattr(capacity_module.os, "sched_getaffinity", unavailable)
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: 6)
    assert host_cpu_count() == (6, "host cpu count (6 CPUs)")
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: None)
    assert host_cpu_count() == (1, "host cpu count (1 CPU)")


def test_host_memory_matches_psutil() -> None:
    assert host_memory_mb() == REAL_MEMORY_MB


def test_reserve_larger_than_memory_leaves_zero_not_negative() -> None:
    assert detect_capacity(1, 1000, 4096, detect_gpus=False).memory_mb == 0


def test_capacity_keeps_positional_construction_and_serialises() -> None:
    assert Capacity(2, 1000).gpu_count == 0
    capacity = Capacity(4, 2000, "cpu here", "memory there",
                        (GpuDevice("1", 40960, "A100"),), "nvidia-smi (1 GPU)")
    assert capacity.to_dict() == {
        "cpu_slots": 4, "cpu_source": "cpu here", "memory_mb": 2000,
        "memory_source": "memory there", "gpu_count": 1, "gpu_source": "nvidia-smi (1 GPU)",
        "gpus": [{"index": "1", "memory_mb": 40960, "name": "A100"}]}
