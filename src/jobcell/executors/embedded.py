"""Embedded executor: each attempt is a local wrapper process in its own session.

Liveness is an ``flock`` on ``<attempt>/.lock``: the worker takes the lock,
hands the locked descriptor to the wrapper (and so to the runner), and closes
its own copy. The lock is held exactly as long as some process of the attempt
lives, so a later worker can tell "still running" from "interrupted" without
trusting PIDs, and there is no window in which a started attempt looks dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from jobcell.executors.base import BackendCapabilities, Launch, Phase, Status
from jobcell.executors.wrapper import wrapper_script

LOCK_FILE = ".lock"


@dataclass
class _Tracked:
    attempt_dir: Path
    pid: int | None
    process: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    interrupted: bool = False


def read_exit_code(attempt_dir: Path) -> int | None:
    """The exit code the wrapper recorded, or None when there is none (yet)."""
    try:
        text = (attempt_dir / "exit_code").read_text().strip()
    except OSError:  # missing, or the attempt directory itself is gone or not a directory
        return None
    try:
        return int(text)
    except ValueError:
        return None


def lock_held(attempt_dir: Path) -> bool:
    """Whether some process of the attempt still holds its lock."""
    try:
        fd = os.open(attempt_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def process_group_of(attempt_dir: Path) -> int | None:
    """The process group (the wrapper's PID) of a live attempt whose PID was not recorded.

    Found from ``child.pid``; accepted only when the runner or the wrapper still works in the
    attempt directory, so a recycled PID never leads to signalling someone else's processes.
    """
    try:
        runner = int((attempt_dir / "child.pid").read_text().strip())
        group = os.getpgid(runner)
    except (OSError, ValueError):
        return None
    for pid in (group, runner):
        try:
            if Path(psutil.Process(pid).cwd()) == attempt_dir.resolve():
                return group
        except (psutil.Error, OSError):
            continue
    return None


def kill_strays(attempt_dir: Path) -> int:
    """SIGKILL every process that carries this attempt's ``JOBCELL_STEP_DIR``.

    The marker is in the environment each attempt's processes inherit, so it finds them
    whatever they did with their descriptors, session or process group. Returns how many.
    """
    target = str(attempt_dir)
    killed = 0
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and \
                    process.environ().get("JOBCELL_STEP_DIR") == target:
                process.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def install_wrapper(path: Path) -> None:
    """Write the wrapper script to ``path`` unless it is already there and current."""
    text = wrapper_script()
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def run_inline(wrapper_path: Path, launch: Launch, timeout_s: float, grace_s: float,
               shell: str = "/bin/bash") -> tuple[int | None, bool]:
    """Run one attempt through the wrapper and wait for it (the session plane).

    Past ``timeout_s`` the attempt's process group gets TERM, then KILL after ``grace_s``.
    Answers the recorded exit code (None when none was written) and whether it timed out.
    """
    timed_out = False
    process = subprocess.Popen(
        [shell, str(wrapper_path), str(launch.attempt_dir), *launch.argv],
        cwd=launch.attempt_dir, env=launch.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # nothing of the attempt may outlive the call
    return read_exit_code(launch.attempt_dir), timed_out


class EmbeddedExecutor:
    """Runs attempts as local child processes through the wrapper script."""

    name = "embedded"
    delegated = False
    enforces_timeout = False

    def __init__(self, wrapper_path: Path, shell: str = "/bin/bash") -> None:
        self.wrapper_path = wrapper_path
        self.shell = shell
        self._tracked: dict[str, _Tracked] = {}
        self._orphans: list[subprocess.Popen[bytes]] = []

    def backend_path(self, attempt_dir: Path) -> str:
        return str(attempt_dir)

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(self.name, gpu_source="the cell's own GPU detection")

    def usable(self) -> str | None:
        return None

    def submit(self, launches: list[Launch]) -> dict[str, str]:
        return {launch.key: str(self._start(launch)) for launch in launches}

    def _start(self, launch: Launch) -> int:
        lock_fd = os.open(launch.attempt_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with open(launch.attempt_dir / "wrapper.log", "ab") as log:
                process = subprocess.Popen(
                    [self.shell, str(self.wrapper_path), str(launch.attempt_dir),
                     *launch.argv],
                    cwd=launch.attempt_dir, env=launch.env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    pass_fds=(lock_fd,))
        finally:
            os.close(lock_fd)
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(process.pid)
        self._tracked[launch.key] = _Tracked(launch.attempt_dir, process.pid, process, pidfd)
        return process.pid

    def adopt(self, key: str, attempt_dir: Path, backend_id: str | None) -> None:
        pid = int(backend_id) if backend_id is not None and backend_id.isdigit() else None
        self._tracked[key] = _Tracked(attempt_dir, pid)

    def tracked(self) -> set[str]:
        """Keys of the attempts this executor is watching."""
        return set(self._tracked)

    def poll(self) -> dict[str, Status]:
        return {key: self._status(item) for key, item in self._tracked.items()}

    @staticmethod
    def _status(item: _Tracked) -> Status:
        if item.process is not None and item.process.poll() is None:
            return Status(Phase.RUNNING)
        # The exit_code file is the authority: once it is there the attempt has ended, even
        # when a background process the runner started still holds the lock.
        code = read_exit_code(item.attempt_dir)
        if code is not None:
            return Status(Phase.EXITED, code)
        if lock_held(item.attempt_dir):
            # No exit_code yet and some process of the attempt lives: an adopted wrapper still
            # running, or a runner whose wrapper was killed.
            return Status(Phase.RUNNING)
        code = read_exit_code(item.attempt_dir)  # written between the first read and the lock
        if code is not None:
            return Status(Phase.EXITED, code)
        item.interrupted = True
        return Status(Phase.INTERRUPTED)

    def terminate(self, key: str, force: bool = False) -> None:
        item = self._tracked.get(key)
        if item is None:
            return
        if item.process is None and not lock_held(item.attempt_dir):
            return  # nothing of this attempt is alive; the PID may belong to someone else now
        self._signal_group(item, signal.SIGKILL if force else signal.SIGTERM)

    @staticmethod
    def _signal_group(item: _Tracked, signal_number: int) -> None:
        if item.pid is None:
            item.pid = process_group_of(item.attempt_dir)
        if item.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(item.pid, signal_number)

    def forget(self, key: str) -> None:
        item = self._tracked.pop(key, None)
        if item is None:
            return
        if lock_held(item.attempt_dir):
            # The attempt has ended (its end was recorded) but processes it started linger
            # in its process group; they would go on outside any lease, so they are killed.
            self._signal_group(item, signal.SIGKILL)
        if item.interrupted:
            # Its wrapper died without an exit_code and nothing holds the lock, but a runner
            # that closed the inherited descriptor may still run; it must not run beside
            # the next attempt.
            kill_strays(item.attempt_dir)
        if item.pidfd is not None:
            os.close(item.pidfd)
        if item.process is not None and item.process.poll() is None:
            # Still alive (e.g. being killed): reap later without blocking.
            self._orphans.append(item.process)

    def close(self) -> None:
        """Release the descriptors this executor holds; the attempts themselves go on."""
        for item in self._tracked.values():
            if item.pidfd is not None:
                os.close(item.pidfd)
                item.pidfd = None

    def wait(self, timeout: float, wake_fds: Sequence[int] = ()) -> None:
        self._orphans = [p for p in self._orphans if p.poll() is None]
        fds = [item.pidfd for item in self._tracked.values()
               if item.pidfd is not None and item.process is not None
               and item.process.returncode is None]
        fds.extend(wake_fds)
        if fds:
            select.select(fds, [], [], timeout)
        elif timeout > 0:
            select.select([], [], [], timeout)
