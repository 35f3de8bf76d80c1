"""Admission: which queued steps may start now. Pure: no clock, no I/O.

The inputs are the cell's capacity, the leases of running steps, the limits on
concurrency groups (``max_concurrent``, OOM cooldowns and throttles, see
:mod:`jobcell.scheduler.oom`) and the queue in the order it should be served
(see :mod:`jobcell.scheduler.fairness`). The output is the steps to start, the
GPU devices each one gets, and the steps that can never run on this cell.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from jobcell.scheduler.capacity import Capacity


@dataclass(frozen=True)
class Request:
    """A queued step asking to start, in the order it should be served."""

    key: str
    cpu_slots: int
    memory_mb: int
    group: str
    max_concurrent: int | None = None
    gpus: int = 0             # devices it cannot run without
    optional_gpus: int = 0    # devices it takes when they are free


@dataclass(frozen=True)
class Lease:
    """What a running step holds."""

    key: str
    cpu_slots: int
    memory_mb: int
    group: str
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupLimit:
    """A limit on one concurrency group beyond its runners' ``max_concurrent``."""

    blocked: bool = False             # in cooldown: nothing of the group starts
    max_concurrent: int | None = None  # throttled: at most this many run at once
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    """Steps to start now (with their GPU devices), and steps that can never fit."""

    admit: tuple[str, ...]
    never_fits: tuple[tuple[str, str], ...]
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def never_fits_reason(capacity: Capacity, cpu_slots: int, memory_mb: int,
                      gpus: int = 0) -> str | None:
    """Why a request can never run on this capacity, or None when it can."""
    if cpu_slots > capacity.cpu_slots:
        return f"needs {cpu_slots} cpu slots but the cell has {capacity.cpu_slots}"
    if memory_mb > capacity.memory_mb:
        return f"needs {memory_mb} MB of memory but the cell has {capacity.memory_mb} MB"
    if gpus > len(capacity.gpus):
        return f"needs {gpus} GPU(s) but the cell has {len(capacity.gpus)}"
    return None


def group_cap(request: Request, limit: GroupLimit | None) -> int | None:
    """How many steps of the request's group may run at once (None: no cap)."""
    caps = [c for c in (request.max_concurrent, limit.max_concurrent if limit else None)
            if c is not None]
    return min(caps) if caps else None


def _short(need: int, free: int, reserved: int) -> bool:
    """Whether ``need`` of a resource is not available beside the reservation (needing
    none never is)."""
    return need > 0 and need > free - reserved


def admit(capacity: Capacity, leases: Iterable[Lease], queue: Sequence[Request],
          limits: Mapping[str, GroupLimit] | None = None) -> Decision:
    """Admission in queue order, with one reservation.

    The first request that is allowed to start but does not fit what is free now
    *reserves* what it needs: later requests start only in what is left beyond that
    reservation. So a large step at the head of the fair order is not starved by a
    stream of small ones behind it (they can no longer take every slot it waits
    for), while requests that fit beside it still start.

    A request that needs more CPU slots or memory than the cell has can never fit
    (``never_fits``); one that needs more GPUs than this capacity shows waits.

    Never over-commits: after admission the sum of leased CPU slots and memory stays
    within capacity, no GPU device is leased twice, a group never exceeds its
    ``max_concurrent`` or throttle, and nothing of a group in cooldown starts.
    """
    limits = limits or {}
    leases = list(leases)
    free_cpu = capacity.cpu_slots - sum(lease.cpu_slots for lease in leases)
    free_memory = capacity.memory_mb - sum(lease.memory_mb for lease in leases)
    held = {device for lease in leases for device in lease.gpus}
    free_gpus = [gpu.index for gpu in capacity.gpus if gpu.index not in held]
    running = Counter(lease.group for lease in leases)
    reserved: Request | None = None
    admitted: list[str] = []
    devices: dict[str, tuple[str, ...]] = {}
    impossible: list[tuple[str, str]] = []
    for request in queue:
        reason = never_fits_reason(capacity, request.cpu_slots, request.memory_mb)
        if reason is not None:
            impossible.append((request.key, reason))
            continue
        if request.gpus > len(capacity.gpus):
            # Submit refused steps that need more GPUs than the cell has; a worker that
            # sees fewer (a narrowed CUDA_VISIBLE_DEVICES, a failed nvidia-smi) leaves
            # them waiting for one that sees them, and reserves nothing for them.
            continue
        limit = limits.get(request.group)
        if limit is not None and limit.blocked:
            continue
        cap = group_cap(request, limit)
        if cap is not None and running[request.group] >= cap:
            continue
        held_cpu, held_memory, held_gpus = ((reserved.cpu_slots, reserved.memory_mb,
                                             reserved.gpus) if reserved else (0, 0, 0))
        if (_short(request.cpu_slots, free_cpu, held_cpu)
                or _short(request.memory_mb, free_memory, held_memory)
                or _short(request.gpus, len(free_gpus), held_gpus)):
            reserved = reserved or request
            continue
        take = request.gpus + max(0, min(request.optional_gpus,
                                         len(free_gpus) - held_gpus - request.gpus))
        if take:
            devices[request.key] = tuple(free_gpus[:take])
            del free_gpus[:take]
        admitted.append(request.key)
        free_cpu -= request.cpu_slots
        free_memory -= request.memory_mb
        running[request.group] += 1
    return Decision(tuple(admitted), tuple(impossible), devices)
