"""Helpers for the integration tests: settings, runner programs, waiting on processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from jobcell.executors.embedded import lock_held
from jobcell.service import Cell
from jobcell.worker import Worker

TEST_SETTINGS: dict[str, Any] = {
    "cpu_slots": 4,
    "node_memory_mb": 8192,
    "memory_reserve_mb": 0,
    "retry_backoff_s": 0.05,
    "kill_grace_s": 0.5,
    "poll_interval_s": 0.05,
    "worker_heartbeat_ttl_s": 15,
}

TOOLS = r'''
"""Runner programs for the integration tests: python3 tools.py MODE ARGS..."""
import json, os, pathlib, signal, subprocess, sys, time

def now():
    return time.time()

def append(path, text):
    with open(path, "a") as handle:
        handle.write(text + "\n")

def main(mode, *args):
    attempt = int(os.environ.get("JOBCELL_ATTEMPT", "0"))
    if mode == "stamp":            # OUT NAME SECONDS: record when it ran
        out, name, seconds = pathlib.Path(args[0]), args[1], float(args[2])
        start = now(); time.sleep(seconds)
        (out / f"{name}.json").write_text(json.dumps({"start": start, "end": now()}))
        (out / f"{name}.txt").write_text(f"data from {name}\n")
    elif mode == "join":           # IN OUT: list what was staged
        inp, out = pathlib.Path(args[0]), pathlib.Path(args[1])
        files = sorted(str(p.relative_to(inp)) for p in inp.rglob("*") if p.is_file())
        manifest = json.loads((inp.parent / "inputs.json").read_text())
        (out / "listing.json").write_text(json.dumps({"files": files, "manifest": manifest}))
    elif mode == "count":          # RUNS OUT SECONDS: count runs, then work
        append(args[0], f"{os.environ['JOBCELL_JOB_ID']} {os.environ['JOBCELL_STEP_ID']} "
                        f"attempt={attempt}")
        time.sleep(float(args[2]))
        (pathlib.Path(args[1]) / "result.txt").write_text(f"done {attempt}\n")
    elif mode == "slow-first":     # RUNS OUT SECONDS: attempt 1 is slow, later ones are fast
        append(args[0], f"{os.environ['JOBCELL_JOB_ID']} {os.environ['JOBCELL_STEP_ID']} "
                        f"attempt={attempt}")
        if attempt == 1:
            time.sleep(float(args[2]))
        (pathlib.Path(args[1]) / "result.txt").write_text(f"done {attempt}\n")
    elif mode == "fail-once":      # OUT: fail on attempt 1, succeed on later attempts
        if attempt == 1:
            print("attempt 1 fails on purpose", file=sys.stderr)
            sys.exit(3)
        (pathlib.Path(args[0]) / "result.txt").write_text(f"ok on attempt {attempt}\n")
    elif mode == "exit-after":     # FILE CODE: wait until FILE exists, then exit with CODE
        while not os.path.exists(args[0]):
            time.sleep(0.01)
        time.sleep(0.2)
        sys.exit(int(args[1]))
    elif mode == "exit":           # CODE
        print(f"exiting with {args[0]}", file=sys.stderr)
        sys.exit(int(args[0]))
    elif mode == "grandchild":     # PIDFILE: start a TERM-ignoring grandchild, then hang
        code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(300)")
        child = subprocess.Popen([sys.executable, "-c", code], close_fds=False)
        pathlib.Path(args[0]).write_text(json.dumps({"runner": os.getpid(),
                                                     "grandchild": child.pid}))
        time.sleep(300)
    elif mode == "lines":          # N: N lines on stdout, N on stderr
        for i in range(int(args[0])):
            print(f"out {i}")
            print(f"err {i}", file=sys.stderr)
    elif mode == "write":          # OUT NAME TEXT
        (pathlib.Path(args[0]) / args[1]).write_text(args[2])
    elif mode == "gate-write":     # GATE OUT: wait until GATE exists, then write result.txt
        while not os.path.exists(args[0]):
            time.sleep(0.01)
        (pathlib.Path(args[1]) / "result.txt").write_text("finished\n")
    elif mode == "symlink":        # OUT NAME TARGET: make OUT/NAME a symlink to TARGET
        os.symlink(args[2], pathlib.Path(args[0]) / args[1])
    elif mode == "big-stderr":     # MEGABYTES: that much stderr without a single newline
        chunk = "x" * (1 << 20)
        for _ in range(int(args[0])):
            sys.stderr.write(chunk)
        sys.stderr.flush()
    elif mode == "input":          # ACTION PATH OUT: append to / read / delete / replace PATH
        action, path = args[0], pathlib.Path(args[1])
        if action == "append":     # writable first, so that this works for any user
            os.chmod(path, 0o644)
            append(path, "written by the downstream step")
        elif action == "read":
            path.read_text()
        elif action == "delete":
            path.unlink()
        elif action == "replace":  # a new file in its place: upstream's file is untouched
            tmp = path.with_name(path.name + ".new")
            tmp.write_text("replaced\n")
            os.replace(tmp, path)
        (pathlib.Path(args[2]) / "done.txt").write_text(action)
    elif mode == "stray":          # STATE OUT: attempt 1 lets go of the attempt lock and
        state = pathlib.Path(args[0])  # ticks forever; later attempts report what they saw
        if attempt == 1:
            os.closerange(3, 4096)     # drops the attempt's lock descriptor too
            (state / "stray.pid").write_text(str(os.getpid()))
            deadline = now() + 60
            while now() < deadline:
                append(state / "ticks", repr(now()))
                time.sleep(0.01)
            return
        started = now()
        stray = int((state / "stray.pid").read_text())
        try:
            with open(f"/proc/{stray}/stat") as handle:
                alive = handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            alive = False
        (state / f"attempt-{attempt}.json").write_text(
            json.dumps({"started": started, "stray_alive": alive}))
        (pathlib.Path(args[1]) / "result.txt").write_text(f"done {attempt}\n")
    else:
        sys.exit(f"unknown mode {mode}")

if __name__ == "__main__":
    main(*sys.argv[1:])
'''


def write_settings(home: Path, **settings: Any) -> None:
    """Write the cell options as ``<home>/jobcell.toml``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [f"{name} = {toml_value(value)}"
             for name, value in {**TEST_SETTINGS, **settings}.items()]
    (home / "jobcell.toml").write_text("\n".join(lines) + "\n")


def toml_value(value: Any) -> str:
    """A TOML literal for a string, bool, number, list or table of them."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)   # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + " }"
    return repr(value)


def cleanup_cell(cell: Cell) -> None:
    """Stop the cell's daemon and any attempt process still alive, then close it."""
    info = cell.store.lock_info()
    if info is not None and info.pid != os.getpid():
        with contextlib.suppress(Exception):
            cell.stop_worker(timeout_s=10)
    for pid_file in cell.home.artifacts.glob("*/*/attempt-*/child.pid"):
        if lock_held(pid_file.parent):     # the attempt is still alive: its pid is ours
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    cell.close()


def run_worker(cell: Cell, timeout_s: float = 60.0) -> Worker:
    """Run an in-process worker until no job is active (stopped after ``timeout_s``)."""
    worker = Worker(cell.home, cell.settings, cell.store)
    timer = threading.Timer(timeout_s, worker.request_stop)
    timer.start()
    try:
        worker.run(until_idle=True)
    finally:
        timer.cancel()
    return worker


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition",
             interval_s: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def pid_gone(pid: int) -> bool:
    """Whether no live process has this PID (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout_s: float = 15.0) -> int | None:
    """Wait for a process to end; reap it when it is our child. Returns its code if known."""
    try:
        return psutil.Process(pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return None


def attempt_dir(cell: Cell, job_id: str, step_id: str, attempt: int = 1) -> Path:
    return cell.home.attempt_dir(job_id, step_id, attempt)


def wait_child_pid(cell: Cell, job_id: str, step_id: str, attempt: int = 1,
                   timeout_s: float = 20.0) -> int:
    """Wait until the attempt's wrapper wrote ``child.pid``; return the runner's PID."""
    path = attempt_dir(cell, job_id, step_id, attempt) / "child.pid"

    def read() -> int | None:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    return int(wait_for(read, timeout_s, f"{path}"))


def worker_command(home: Path, *extra: str) -> list[str]:
    """The daemon's own command line."""
    return [sys.executable, "-m", "jobcell.worker", "--home", str(home), *extra]


def spawn_worker(home: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    """Start ``python -m jobcell.worker`` directly (output captured)."""
    return subprocess.Popen(worker_command(home, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or dict(os.environ),
                            start_new_session=True, cwd=home)


def events_of(cell: Cell, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in cell.events(job_id) if e["kind"] == kind]


def step_of(status: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in status["steps"] if s["id"] == step_id)


def register_tool(cell: Cell, tools: Path, name: str, args: list[str], **fields: Any) -> None:
    """Register a runner that runs ``python tools.py ARGS`` (templated)."""
    cell.register_runner({"name": name, "command": sys.executable,
                          "args_template": [str(tools), *args], **fields})
