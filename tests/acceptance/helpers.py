"""Drive the ``jobcell`` command in a subprocess, exactly as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

JOBCELL = Path(sys.executable).parent / "jobcell"

# Short retry and kill delays keep the tier fast; the idle exit is a safety net in case a
# test dies before its finalizer stops the worker.
FAST_CONFIG = textwrap.dedent("""\
    retry_backoff_s = 0.05
    kill_grace_s = 1
    poll_interval_s = 0.1
    worker_idle_exit_s = 60
""")

RUNNER_FILES = {
    "writer.yaml": """\
        name: writer
        version: "1.0"
        description: Write TEXT (REPEAT times) to out.txt; chat on stdout and stderr.
        command: python3
        args_template: ["{runner_dir}/writer.py", "{output_dir}", "{text}", "{repeat}"]
        params:
          text: {type: string, default: hello}
          repeat: {type: integer, default: 1, minimum: 1}
        env: {LC_ALL: C.UTF-8}
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 60}
        outputs: [out.txt]
        """,
    "writer.py": """\
        import pathlib, sys
        out, text, repeat = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        (out / "out.txt").write_text(text * repeat, encoding="utf-8")
        for number in (1, 2, 3):
            print(f"stdout line {number}")
        print("stderr note", file=sys.stderr)
        """,
    "join.yaml": """\
        name: join
        version: "1.0"
        description: Join every staged out.txt into joined.txt, one 'path=text' line each.
        command: python3
        args_template: ["{runner_dir}/join.py", "{input_dir}", "{output_dir}"]
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 60}
        outputs: [joined.txt]
        """,
    "join.py": """\
        import pathlib, sys
        source, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        lines = [f"{p.relative_to(source).as_posix()}={p.read_text(encoding='utf-8')}"
                 for p in sorted(source.rglob("out.txt"))]
        (out / "joined.txt").write_text("\\n".join(lines) + "\\n", encoding="utf-8")
        """,
    "failing.yaml": """\
        name: failing
        version: "1.0"
        command: sh
        args_template: ["-c", "echo 'disk on fire' >&2; exit 3"]
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 60}
        retries: 0
        """,
    "gate.yaml": """\
        name: gate
        version: "1.0"
        description: Wait until the file GATE exists (the test opens the gate).
        command: sh
        args_template: ["-c", "while [ ! -e \\"$0\\" ]; do sleep 0.05; done", "{gate}"]
        params:
          gate: {type: string, minLength: 1}
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 60}
        """,
    "slow.yaml": """\
        name: slow
        version: "1.0"
        description: Sleep in a grandchild process (so stopping must reach the process group).
        command: sh
        args_template: ["-c", "sleep {seconds} & echo $! > {output_dir}/sleeper.pid; wait"]
        params:
          seconds: {type: number, default: 30, minimum: 0}
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 120}
        """,
}


def write_runner_files(folder: Path) -> Path:
    """Write the test runners (YAML + scripts) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RUNNER_FILES.items():
        (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return folder


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any JOBCELL_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    env["COLUMNS"] = "200"  # wide enough that rich does not wrap the lines we look for
    env.update(extra or {})
    return env


@dataclass
class Result:
    """One finished ``jobcell`` invocation."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{self} did not print JSON: {exc}") from None

    def __str__(self) -> str:
        return (f"`jobcell {' '.join(self.args)}` exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


@dataclass
class Cli:
    """The ``jobcell`` command bound to one cell home (passed as ``--home`` every time)."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None,
            home: bool = True, timeout: float = 60) -> Result:
        argv = [*args, *(["--home", str(self.home)] if home else [])]
        done = subprocess.run([str(JOBCELL), *argv], input=stdin, capture_output=True,
                              text=True, env=clean_env({**self.env, **(env or {})}),
                              timeout=timeout, stdin=None if stdin is not None else
                              subprocess.DEVNULL)
        return Result(argv, done.returncode, done.stdout, done.stderr)

    def run_many(self, calls: Mapping[str, Sequence[str]]) -> dict[str, Result]:
        """Run independent commands at the same time (the tier is dominated by start-up
        time); returns each one's result under its key."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {key: pool.submit(self.run, *args) for key, args in calls.items()}
            return {key: future.result() for key, future in futures.items()}

    def ok(self, *args: str, **kwargs: Any) -> Result:
        """Run and insist on exit 0 and an empty stderr."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, str(result)
        assert "Traceback" not in result.stderr, str(result)
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        """Run with ``--json``, insist on exit 0, return the parsed stdout."""
        return self.ok(*args, "--json", **kwargs).json

    def submit(self, spec: Path | str, *options: str) -> str:
        answer = self.json("submit", str(spec), *options)
        assert answer["deduplicated"] is False, answer
        return str(answer["job_id"])

    def stop_worker(self) -> subprocess.Popen[str] | None:
        """Start ``jobcell worker stop`` if a worker was ever spawned for this home (it logs
        there); the caller waits for the returned process."""
        if not (self.home / "worker.log").exists():
            return None
        argv = [str(JOBCELL), "worker", "stop", "--timeout", "10", "--home", str(self.home)]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=clean_env(self.env))


def assert_clean_error(result: Result, *needles: str, exit_code: int | None = None) -> str:
    """A user error: non-zero exit, one sentence on stderr naming ``needles``, no traceback."""
    assert result.returncode != 0, str(result)
    if exit_code is not None:
        assert result.returncode == exit_code, str(result)
    assert "Traceback" not in result.stderr, str(result)
    assert "internal error" not in result.stderr, str(result)
    message = result.stderr.strip()
    assert message.startswith("jobcell: "), str(result)
    assert "\n" not in message, f"expected one line on stderr\n{result}"
    for needle in needles:
        assert needle in message, f"{needle!r} missing from stderr\n{result}"
    assert result.stdout == "", str(result)
    return message


def write_spec(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def poll(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1,
         what: str = "condition") -> Any:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def step_running(cli: Cli, job_id: str) -> dict[str, Any] | None:
    """The job's status once one of its steps is running, else None."""
    status = cli.json("status", job_id)
    if any(s["state"] == "running" for s in status["steps"]):
        return status
    return None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
