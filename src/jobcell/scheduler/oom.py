"""OOM policy: what counts as an out-of-memory exit, cooldowns, throttles, memory raises.

Pure: the worker passes the clock and the settings in.

After an OOM-like exit the runner's concurrency group is *blocked* for
``oom_cooldown_s`` (nothing of it starts), then *throttled* to
``oom_throttle_max_concurrent`` running steps for ``oom_throttle_hours``, so the
scheduler does not repeat the concurrency that ran the machine out of memory. A new
OOM-like exit during either phase starts both again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from jobcell.scheduler.admission import GroupLimit
from jobcell.store.base import CooldownRow

OOM_EXIT_CODES = frozenset({137, -9})
OOM_SCHEDULER_STATES = frozenset({"OUT_OF_MEMORY"})


def is_oom_like(exit_code: int | None, scheduler_state: str | None = None) -> bool:
    """Exit 137 (128 + SIGKILL), signal 9, or a batch scheduler's ``OUT_OF_MEMORY``."""
    return exit_code in OOM_EXIT_CODES or scheduler_state in OOM_SCHEDULER_STATES


def start_cooldown(group: str, now: float, *, cooldown_s: float, throttle_hours: float,
                   throttle_max: int, reason: str, job_id: str | None = None,
                   step_id: str | None = None) -> CooldownRow:
    """The cooldown (then throttle) a group enters after an OOM-like exit at ``now``."""
    until = now + cooldown_s
    return CooldownRow(group=group, reason=reason, started_at=now, cooldown_until=until,
                       throttle_until=until + throttle_hours * 3600.0,
                       throttle_max=throttle_max, job_id=job_id, step_id=step_id)


def phase(row: CooldownRow, now: float) -> str | None:
    """``cooldown``, ``throttled`` or None (over) at ``now``."""
    if now < row.cooldown_until:
        return "cooldown"
    if now < row.throttle_until:
        return "throttled"
    return None


def group_limits(rows: Iterable[CooldownRow], now: float) -> dict[str, GroupLimit]:
    """The admission limits that the cooldowns in force put on their groups."""
    limits: dict[str, GroupLimit] = {}
    for row in rows:
        current = phase(row, now)
        if current == "cooldown":
            limits[row.group] = GroupLimit(blocked=True, reason=row.reason)
        elif current == "throttled":
            limits[row.group] = GroupLimit(max_concurrent=row.throttle_max, reason=row.reason)
    return limits


def raised_memory(current_mb: int, factor: float, capacity_mb: int) -> int:
    """The memory request for a retry after an OOM-like exit: ``current * factor``
    rounded up, never above the cell's capacity and never below the current request."""
    if factor <= 1.0:
        return current_mb
    # round() first: 100 * 1.1 is 110.00000000000001 in floating point; ceil() alone gives 111.
    return max(current_mb, min(math.ceil(round(current_mb * factor, 6)), capacity_mb))
