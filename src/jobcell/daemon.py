"""Start, stop and describe a cell's worker process (the embedded daemon)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import psutil

from jobcell.errors import WorkerError
from jobcell.home import CellHome
from jobcell.leadership import lock_is_stale
from jobcell.store import LockInfo, Store

START_TIMEOUT_S = 20.0


def worker_status(store: Store, ttl: float, now: float | None = None) -> dict[str, Any]:
    """Who serves the cell: ``alive``, ``pid``, ``hostname``, ``heartbeat_age_s``."""
    now = time.time() if now is None else now
    info = store.lock_info()
    if info is None:
        return {"alive": False, "pid": None, "hostname": None, "heartbeat_age_s": None,
                "started_at": None}
    return {"alive": not lock_is_stale(info, now, ttl), "pid": info.pid,
            "hostname": info.hostname, "heartbeat_age_s": round(now - info.heartbeat_at, 3),
            "started_at": info.started_at}


def _live_holder(store: Store, ttl: float) -> LockInfo | None:
    info = store.lock_info()
    if info is not None and not lock_is_stale(info, time.time(), ttl):
        return info
    return None


def start_worker(home: CellHome, store: Store, ttl: float,
                 timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
    """Start the daemon unless a live worker exists; wait until it holds the lock.

    A file lock serialises concurrent starters, so racing submits spawn one daemon.
    """
    with (home.locks / "worker-start.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _live_holder(store, ttl) is None:
            process = _spawn(home)
            _wait_for_lock(store, ttl, process, timeout_s, home)
    return worker_status(store, ttl)


# Workers this process started: kept so that they are reaped when they exit (a dropped
# Popen of a running child only gets a ResourceWarning and a later reap).
_SPAWNED: list[subprocess.Popen[bytes]] = []


def _spawn(home: CellHome) -> subprocess.Popen[bytes]:
    _SPAWNED[:] = [p for p in _SPAWNED if p.poll() is None]
    env = dict(os.environ)
    env["JOBCELL_HOME"] = str(home.root)
    with home.worker_log.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobcell.worker", "--home", str(home.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=home.root)
    _SPAWNED.append(process)
    return process


def _wait_for_lock(store: Store, ttl: float, process: subprocess.Popen[bytes],
                   timeout_s: float, home: CellHome) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        holder = _live_holder(store, ttl)
        if holder is not None:
            return  # the daemon recorded its real PID with its first heartbeat
        if process.poll() is not None:
            if _live_holder(store, ttl) is not None:
                return  # another worker won the race
            raise WorkerError(f"the worker exited with code {process.returncode} before it "
                              f"started; see {home.worker_log}")
        time.sleep(0.02)
    raise WorkerError(f"the worker did not start within {timeout_s:g} s; see {home.worker_log}")


def stop_worker(store: Store, ttl: float, timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop the live worker with SIGTERM (SIGKILL after ``timeout_s``) and clear its lock."""
    info = store.lock_info()
    if info is None:
        return {"stopped": False, "reason": "no worker is running"}
    if info.hostname != socket.gethostname():
        raise WorkerError(f"the worker runs on host {info.hostname}; stop it there")
    if info.pid == os.getpid():
        raise WorkerError("the worker runs inside this process; stop it with "
                          "Worker.request_stop() instead of a signal")
    if lock_is_stale(info, time.time(), ttl):
        store.release_lock(info.token)
        return {"stopped": False, "reason": "the worker was not alive; its stale lock was cleared",
                "pid": info.pid}
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    if not _wait_gone(info.pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        _wait_gone(info.pid, 5.0)
    store.release_lock(info.token)
    return {"stopped": True, "pid": info.pid}


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether the process ended within ``timeout_s``; a zombie awaiting its reaper counts."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.02)
