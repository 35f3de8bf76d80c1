"""What the machine offers to a cell: CPU slots, memory and GPUs, each with its source.

Every ``auto`` figure is measured, not assumed: the tightest of the cgroup limits (v2,
v1 or a hybrid of both, walking from the process's cgroup up to the mount root, since an
ancestor's limit applies too), the CPU affinity set, the host's counts and nvidia-smi.
A number given as an option overrides the measurement. All files are read below ``root``
so tests can point it at a fake tree; a missing or unreadable file is "no limit from that
source", never an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import psutil

from jobcell.scheduler.gpus import GpuDevice, apply_gpu_count, plural
from jobcell.scheduler.gpus import detect_gpus as probe_gpus

__all__ = ["Capacity", "CgroupHierarchy", "GpuDevice", "Limit", "cgroup_hierarchies",
           "cpu_limit", "detect_capacity", "gpu_capacity", "host_cpu_count", "host_memory_mb",
           "memory_limit"]

CGROUP_MOUNT = PurePosixPath("sys/fs/cgroup")
# cgroup v1 reports "no memory limit" as LONG_MAX rounded down to a page
# (9223372036854771712); anything this large is no limit on any real machine.
V1_NO_MEMORY_LIMIT = 2**60
MB = 1024 * 1024


@dataclass(frozen=True)
class Capacity:
    """Resources the cell may lease out, and where each figure came from."""

    cpu_slots: int
    memory_mb: int
    cpu_source: str = "override"
    memory_source: str = "override"
    gpus: tuple[GpuDevice, ...] = ()
    gpu_source: str = "none"

    @property
    def gpu_count(self) -> int:
        """How many GPUs the cell may lease."""
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: every figure with its source, and the GPUs."""
        return {"cpu_slots": self.cpu_slots, "cpu_source": self.cpu_source,
                "memory_mb": self.memory_mb, "memory_source": self.memory_source,
                "gpu_count": self.gpu_count, "gpu_source": self.gpu_source,
                "gpus": [gpu.to_dict() for gpu in self.gpus]}


@dataclass(frozen=True)
class Limit:
    """One candidate figure (CPU slots or MB) and a human-readable account of its origin."""

    value: int
    source: str


@dataclass(frozen=True)
class CgroupHierarchy:
    """Where one controller's limits live: the process's cgroup first, then its ancestors."""

    version: str
    root: Path
    directories: tuple[Path, ...]

    def shown(self, directory: Path) -> str:
        """``directory`` as the process sees it (relative to ``root``, absolute)."""
        return "/" + directory.relative_to(self.root).as_posix()


# --- reading the cgroup layout -----------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def proc_cgroup_entries(root: Path) -> list[tuple[str, list[str], str]]:
    """``(hierarchy id, controllers, path)`` from ``/proc/self/cgroup``; bad lines skipped."""
    entries = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        fields = line.strip().split(":", 2)
        if len(fields) == 3 and fields[2].startswith("/"):
            entries.append((fields[0], fields[1].split(",") if fields[1] else [], fields[2]))
    return entries


def walk_up(mount: Path, cgroup_path: str) -> tuple[Path, ...]:
    """The cgroup's directory and each ancestor up to ``mount``; just ``mount`` when the
    path is not there (a container's namespace hides the host's path)."""
    parts = [part for part in PurePosixPath(cgroup_path).parts if part not in ("/", ".", "..")]
    if not mount.joinpath(*parts).is_dir():
        return (mount,)
    return tuple(mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1))


def _v2_hierarchy(root: Path, entries: list[tuple[str, list[str], str]]
                  ) -> CgroupHierarchy | None:
    path = next((path for hid, controllers, path in entries
                 if hid == "0" and not controllers), None)
    if path is None:
        return None
    # Pure v2 mounts at sys/fs/cgroup; hybrid hosts mount it at sys/fs/cgroup/unified.
    for mount in (root / CGROUP_MOUNT, root / CGROUP_MOUNT / "unified"):
        if (mount / "cgroup.controllers").is_file():
            return CgroupHierarchy("v2", root, walk_up(mount, path))
    return None


def _v1_hierarchy(root: Path, entries: list[tuple[str, list[str], str]], controller: str,
                  mount_names: tuple[str, ...]) -> CgroupHierarchy | None:
    for hid, controllers, path in entries:
        if hid != "0" and controller in controllers:
            for name in (",".join(controllers), *mount_names):
                mount = root / CGROUP_MOUNT / name
                if mount.is_dir():
                    return CgroupHierarchy("v1", root, walk_up(mount, path))
    return None


def cgroup_hierarchies(root: Path, controller: str) -> list[CgroupHierarchy]:
    """The v2 and v1 hierarchies holding ``controller``'s ('cpu' or 'memory') limits."""
    entries = proc_cgroup_entries(root)
    names = ("cpu,cpuacct", "cpuacct,cpu", "cpu") if controller == "cpu" else (controller,)
    found = [_v2_hierarchy(root, entries), _v1_hierarchy(root, entries, controller, names)]
    return [hierarchy for hierarchy in found if hierarchy is not None]


def tightest(hierarchy: CgroupHierarchy, read: Callable[[Path], float | None]
             ) -> tuple[float, Path] | None:
    """The smallest limit ``read`` finds along the hierarchy, and where; None if none."""
    found = [(value, directory) for directory in hierarchy.directories
             if (value := read(directory)) is not None]
    return min(found, key=lambda item: item[0]) if found else None


# --- parsing limit files -----------------------------------------------------------------

def _integer(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None


def parse_cpu_max(text: str | None) -> float | None:
    """CPUs from a v2 ``cpu.max`` ("200000 100000" = 2.0); None for "max" or garbage."""
    fields = (text or "").split()
    if len(fields) not in (1, 2) or fields[0] == "max":
        return None
    quota, period = _integer(fields[0]), _integer(fields[1] if len(fields) == 2 else "100000")
    return _cpus(quota, period)


def _cpus(quota: int | None, period: int | None) -> float | None:
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _v1_cpus(directory: Path) -> float | None:
    # quota -1 means no limit.
    return _cpus(_integer(_read(directory / "cpu.cfs_quota_us")),
                 _integer(_read(directory / "cpu.cfs_period_us")))


def parse_memory_max(text: str | None) -> int | None:
    """Bytes from a v2 ``memory.max``; None for "max" or garbage."""
    value = _integer(text)
    return value if value is not None and value >= 0 else None


def parse_limit_in_bytes(text: str | None) -> int | None:
    """Bytes from a v1 ``memory.limit_in_bytes``; None for the "unlimited" huge values."""
    value = _integer(text)
    return value if value is not None and 0 <= value < V1_NO_MEMORY_LIMIT else None


def parse_meminfo_total_mb(text: str | None) -> int | None:
    """MemTotal in MB from ``/proc/meminfo`` text (which reports kB); None if absent."""
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "MemTotal:" and fields[1].isdigit():
            return int(fields[1]) // 1024
    return None


# --- CPU ---------------------------------------------------------------------------------

def cpu_slots_for(cpus: float) -> int:
    """Slots for a (possibly fractional) CPU limit: rounded down, but at least 1.

    A 1.5-CPU quota gives 1 slot: two single-CPU steps would be throttled to 75 % each.
    """
    return max(1, math.floor(cpus))


def _cgroup_cpu_limits(root: Path) -> list[Limit]:
    limits = []
    for hierarchy in cgroup_hierarchies(root, "cpu"):
        v2 = hierarchy.version == "v2"
        found = tightest(hierarchy, (lambda d: parse_cpu_max(_read(d / "cpu.max"))) if v2
                         else _v1_cpus)
        if found is not None:
            cpus, directory = found
            name = "cpu.max" if v2 else "cpu.cfs_quota_us"
            limits.append(Limit(cpu_slots_for(cpus), f"cgroup {hierarchy.version} {name} "
                                f"({plural(cpus, 'CPU')}) at {hierarchy.shown(directory)}"))
    return limits


def _affinity_limit() -> Limit | None:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return Limit(count, f"cpu affinity ({count} of {plural(os.cpu_count() or count, 'CPU')})")


def _host_cpu_limit() -> Limit:
    count = os.cpu_count() or 1
    return Limit(count, f"host cpu count ({plural(count, 'CPU')})")


def _smallest(limits: list[Limit]) -> Limit:
    # min() keeps the first of equal values, so list the most specific source first.
    return min(limits, key=lambda limit: limit.value)


def host_cpu_count() -> tuple[int, str]:
    """CPUs this process may use, ignoring cgroups: its affinity set, else the host count."""
    limit = _smallest([x for x in (_affinity_limit(), _host_cpu_limit()) if x is not None])
    return limit.value, limit.source


def cpu_limit(root: Path) -> Limit:
    """The tightest of cgroup quota, CPU affinity and host CPU count, in slots."""
    candidates = [*_cgroup_cpu_limits(root), _affinity_limit(), _host_cpu_limit()]
    return _smallest([limit for limit in candidates if limit is not None])


# --- memory ------------------------------------------------------------------------------

def _cgroup_memory_limits(root: Path) -> list[Limit]:
    limits = []
    for hierarchy in cgroup_hierarchies(root, "memory"):
        v2 = hierarchy.version == "v2"
        name = "memory.max" if v2 else "memory.limit_in_bytes"
        parse = parse_memory_max if v2 else parse_limit_in_bytes
        found = tightest(hierarchy, lambda d, name=name, parse=parse: parse(_read(d / name)))
        if found is not None:
            megabytes = int(found[0]) // MB
            limits.append(Limit(megabytes, f"cgroup {hierarchy.version} {name} "
                                f"({megabytes} MB) at {hierarchy.shown(found[1])}"))
    return limits


def _host_memory_limit(root: Path) -> Limit:
    total = parse_meminfo_total_mb(_read(root / "proc/meminfo"))
    if total is not None:
        return Limit(total, f"/proc/meminfo MemTotal ({total} MB)")
    # No /proc (not Linux, or a tree without it): ask the OS through psutil.
    total = int(psutil.virtual_memory().total // MB)
    return Limit(total, f"host memory ({total} MB, psutil)")


def host_memory_mb(root: Path | str = "/") -> int:
    """Total physical memory in MB: MemTotal from ``/proc/meminfo``, else psutil."""
    return _host_memory_limit(Path(root)).value


def memory_limit(root: Path) -> Limit:
    """The tightest of cgroup memory limits and the host's total memory, in MB."""
    return _smallest([*_cgroup_memory_limits(root), _host_memory_limit(root)])


# --- putting it together -----------------------------------------------------------------

def gpu_capacity(gpu_count: int | str, env: Mapping[str, str], detect: bool,
                 nvidia_smi: str) -> tuple[tuple[GpuDevice, ...], str]:
    """GPUs per the ``gpu_count`` option: 'auto' detects, a number caps or declares."""
    count = gpu_count if gpu_count == "auto" else int(gpu_count)
    if count == 0:
        return apply_gpu_count((), "", 0)
    if count == "auto" and not detect:
        return (), "not detected"
    devices, source = probe_gpus(env, nvidia_smi)
    return apply_gpu_count(devices, source, count)


def detect_capacity(cpu_slots: int | str, node_memory_mb: int | str, memory_reserve_mb: int,
                    gpu_count: int | str = "auto", *, root: Path | str = "/",
                    env: Mapping[str, str] | None = None, detect_gpus: bool = True,
                    nvidia_smi: str = "nvidia-smi") -> Capacity:
    """Capacity from the options: ``auto`` measures this machine, a number overrides it.

    Memory is the total less ``memory_reserve_mb`` (never below 0). ``detect_gpus=False``
    skips nvidia-smi unless ``gpu_count`` is a number.
    """
    root = Path(root)
    cpu = cpu_limit(root) if cpu_slots == "auto" else Limit(int(cpu_slots), "option cpu_slots")
    memory = (memory_limit(root) if node_memory_mb == "auto"
              else Limit(int(node_memory_mb), "option node_memory_mb"))
    gpus, gpu_source = gpu_capacity(gpu_count, os.environ if env is None else env,
                                    detect_gpus, nvidia_smi)
    return Capacity(cpu.value, max(memory.value - memory_reserve_mb, 0), cpu.source,
                    f"{memory.source} minus reserve {memory_reserve_mb} MB", gpus, gpu_source)
