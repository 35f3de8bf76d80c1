"""Admission: which queued steps may start now. Pure: no clock, no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jobcell.scheduler.capacity import Capacity


@dataclass(frozen=True)
class Request:
    """A queued step asking to start, in queue order."""

    key: str
    cpu_slots: int
    memory_mb: int
    group: str
    max_concurrent: int | None = None


@dataclass(frozen=True)
class Lease:
    """What a running step holds."""

    key: str
    cpu_slots: int
    memory_mb: int
    group: str


@dataclass(frozen=True)
class Decision:
    """Steps to start now, and steps that can never fit this cell."""

    admit: tuple[str, ...]
    never_fits: tuple[tuple[str, str], ...]


def never_fits_reason(capacity: Capacity, cpu_slots: int, memory_mb: int) -> str | None:
    """Why a request can never run on this capacity, or None when it can."""
    if cpu_slots > capacity.cpu_slots:
        return f"needs {cpu_slots} cpu slots but the cell has {capacity.cpu_slots}"
    if memory_mb > capacity.memory_mb:
        return f"needs {memory_mb} MB of memory but the cell has {capacity.memory_mb} MB"
    return None


def admit(capacity: Capacity, leases: Iterable[Lease], queue: Sequence[Request]) -> Decision:
    """Greedy admission in queue order; a step that does not fit now is skipped.

    Never over-commits: the sum of leases after admission stays within capacity,
    and a group never exceeds its ``max_concurrent``.
    """
    leases = list(leases)
    free_cpu = capacity.cpu_slots - sum(lease.cpu_slots for lease in leases)
    free_memory = capacity.memory_mb - sum(lease.memory_mb for lease in leases)
    running = Counter(lease.group for lease in leases)
    admitted: list[str] = []
    impossible: list[tuple[str, str]] = []
    for request in queue:
        reason = never_fits_reason(capacity, request.cpu_slots, request.memory_mb)
        if reason is not None:
            impossible.append((request.key, reason))
            continue
        if request.max_concurrent is not None and running[request.group] >= request.max_concurrent:
            continue
        if request.cpu_slots <= free_cpu and request.memory_mb <= free_memory:
            admitted.append(request.key)
            free_cpu -= request.cpu_slots
            free_memory -= request.memory_mb
            running[request.group] += 1
    return Decision(tuple(admitted), tuple(impossible))
