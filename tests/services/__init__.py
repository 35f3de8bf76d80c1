"""Real services (Slurm, sshd, podman) started on this host for the test suite.

See ``tests/conftest.py`` for the session fixtures that start them and
``/work/shared/notes/test-services.md`` for the facts they rely on.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


class ServiceError(RuntimeError):
    """A test service could not be started or stopped."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(host, port):
            return True
        time.sleep(0.05)
    return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until every process has exited; a zombie counts as gone (init on the test
    machines reaps orphans late, so psutil.wait_procs would wait for its timeout)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        alive = []
        for proc in pending:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        pending = alive
        if pending:
            time.sleep(0.05)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, headed by its name."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"--- {path}: unreadable ({exc})"
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)


# Runs in its own process: blocks until the test process's end of the pipe closes (the
# test process stopped the service, exited, or was killed), then SIGKILLs every process
# whose initial environment holds the marker entry, the given (pid, start time) processes
# that still run, all their descendants, and removes the given line of a file.
_REAPER = r"""
import fcntl, json, os, signal, sys
cfg = json.loads(sys.argv[1])
marker = cfg["marker"].encode() if cfg["marker"] else None
sys.stdin.buffer.read()
def started(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
def table():
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    parents[int(name)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents
def marked(pid):
    if marker is None:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read().split(b"\0")
    except OSError:
        return False
roots = {p for p, t in cfg["pids"] if started(p) == t}
for _ in range(3):
    parents = table()
    victims = {p for p in parents if marked(p)} | (roots & set(parents))
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in victims} - victims
        victims |= more
        grew = bool(more)
    victims.discard(os.getpid())
    if not victims:
        break
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    roots = set()
if cfg["unline"]:
    path, line = cfg["unline"]
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        sys.exit(0)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines = fh.read().splitlines()
        if line in lines:
            fh.seek(0)
            fh.write("".join(x + "\n" for x in lines if x != line))
            fh.truncate()
"""


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (identifies it across pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Reaper:
    """A guard process that cleans up after a service, even if the test process dies.

    Once the test process's end of a pipe closes (:meth:`close`, or the test process
    exited or was killed), it SIGKILLs every process carrying ``marker`` (``NAME=value``
    in its initial environment), every process given to :meth:`watch` that still runs
    (checked by start time, so a reused pid is safe) and all their descendants, and
    removes ``unline`` (a ``(file, line)`` pair) from its file."""

    def __init__(self, marker: str | None = None, unline: tuple[Path, str] | None = None) -> None:
        self._marker = marker
        self._unline = [str(unline[0]), unline[1]] if unline else None
        self._pids: list[tuple[int, int]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawn()

    def _spawn(self) -> None:
        cfg = {"marker": self._marker, "pids": self._pids, "unline": self._unline}
        old = self._proc
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if old is not None:  # replaced by the new guard: end the old one silently
            old.kill()
            old.wait()

    def watch(self, *pids: int) -> None:
        """Also kill these processes (and their descendants) at the end."""
        for pid in pids:
            start = process_start_time(pid)
            if start is not None:
                self._pids.append((pid, start))
        self._pids = [(p, t) for p, t in self._pids if process_start_time(p) == t]
        self._spawn()

    def close(self) -> None:
        """Do the cleanup now and end the guard."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
