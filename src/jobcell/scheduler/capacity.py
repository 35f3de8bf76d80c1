"""What the machine offers to a cell: CPU slots and memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Capacity:
    """Resources the cell may lease out, and where each figure came from."""

    cpu_slots: int
    memory_mb: int
    cpu_source: str = "override"
    memory_source: str = "override"


def host_cpu_count() -> tuple[int, str]:
    """CPUs this process may use: its affinity set, else the host count."""
    try:
        return len(os.sched_getaffinity(0)), "cpu affinity"
    except (AttributeError, OSError):
        return os.cpu_count() or 1, "host cpu count"


def host_memory_mb() -> int:
    """Total physical memory in MB."""
    return int(psutil.virtual_memory().total // (1024 * 1024))


def detect_capacity(cpu_slots: int | str, node_memory_mb: int | str,
                    memory_reserve_mb: int) -> Capacity:
    """Capacity from the options: ``auto`` measures the host, a number overrides it."""
    if cpu_slots == "auto":
        cpus, cpu_source = host_cpu_count()
    else:
        cpus, cpu_source = int(cpu_slots), "option cpu_slots"
    if node_memory_mb == "auto":
        total, memory_source = host_memory_mb(), "host memory"
    else:
        total, memory_source = int(node_memory_mb), "option node_memory_mb"
    memory = max(total - memory_reserve_mb, 0)
    return Capacity(cpus, memory, cpu_source, f"{memory_source} minus reserve "
                    f"{memory_reserve_mb} MB")
