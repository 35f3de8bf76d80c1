"""Leadership of a cell: who holds the scheduler lock, and when a holder is gone."""

from __future__ import annotations

import socket

import psutil

from jobcell.errors import WorkerError
from jobcell.store import LockInfo


def lock_is_stale(info: LockInfo, now: float, ttl: float) -> bool:
    """Whether a scheduler lock's holder is gone (dead local PID, or no heartbeat for ttl)."""
    if now - info.heartbeat_at > ttl:
        return True
    if info.hostname != socket.gethostname():
        return False
    try:
        process = psutil.Process(info.pid)
        # A PID reused by a newer process does not hold the lock.
        return process.create_time() > info.started_at + 1.0 or process.status() == "zombie"
    except psutil.NoSuchProcess:
        return True


class WorkerAlreadyRunning(WorkerError):
    """Another live worker holds this cell's scheduler lock."""

    def __init__(self, info: LockInfo) -> None:
        self.info = info
        super().__init__(f"a worker is already running for this cell (pid {info.pid} on "
                         f"{info.hostname})")
