"""`jobcell wait` shows a live progress bar on a terminal, and none when piped.

The job's first step waits for a gate file the test creates, so the bar is seen while the
job runs however slowly this machine starts the command.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import JOBCELL, Cli, clean_env, write_spec

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_terminal(argv: list[str], env: dict[str, str],
                    on_output: Callable[[str], None], timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal (its stdin, stdout and stderr) and return what it
    wrote; ``on_output`` sees the text so far (without terminal codes) after each read."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                   start_new_session=True)
    finally:
        os.close(slave)
    raw = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"{argv} did not finish within {timeout} s:\n{raw!r}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every holder of the terminal has closed it
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            raw += data
            on_output(ANSI.sub("", raw.decode("utf-8", "replace")))
        return process.wait(timeout=10), raw.decode("utf-8", "replace")
    finally:
        os.close(master)


@pytest.fixture
def gated_job(cli: Cli, tmp_path: Path) -> tuple[str, Path]:
    gate = tmp_path / "gate-open"
    spec = write_spec(tmp_path, "progress.yaml", f"""\
        label: progress
        steps:
          - id: held
            runner: gate
            params: {{gate: "{gate}"}}
          - id: write
            runner: writer
    """)
    return cli.submit(spec), gate


def test_progress_bar_on_a_terminal(cli: Cli, gated_job: tuple[str, Path]) -> None:
    job_id, gate = gated_job
    env = clean_env({"TERM": "xterm-256color"})
    for name in ("COLUMNS", "LINES", "NO_COLOR", "TERM_PROGRAM", "CI"):
        env.pop(name, None)
    seen_while_running: list[str] = []

    def open_gate_once_the_bar_shows(text: str) -> None:
        if not seen_while_running and re.search(r"running \(running: held\).*\b0/2\b", text):
            seen_while_running.append(text)
            gate.touch()

    code, raw = run_on_terminal([str(JOBCELL), "wait", job_id, "--home", str(cli.home)], env,
                                open_gate_once_the_bar_shows)
    text = ANSI.sub("", raw)
    assert seen_while_running, f"no progress bar while the job ran:\n{raw!r}"
    assert code == 0, raw
    assert "Traceback" not in text
    assert "\r" in raw and "\x1b[" in raw   # redrawn in place, with terminal control codes
    assert re.search(r"\b2/2\b", text), text  # the step counter reached the end
    final = re.search(rf"job {job_id}\s+succeeded", text)
    assert final, text
    assert final.start() > text.rindex("2/2")  # the final status comes after the bar


def test_no_progress_bar_when_piped(cli: Cli, gated_job: tuple[str, Path]) -> None:
    job_id, gate = gated_job
    process = subprocess.Popen([str(JOBCELL), "wait", job_id, "--home", str(cli.home)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=clean_env())
    time.sleep(1.0)  # the job is held at its first step meanwhile
    assert process.poll() is None
    gate.touch()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout + stderr
    assert re.search(rf"job {job_id}\s+succeeded", stdout), stdout
    assert stderr == ""
    assert not re.search(r"\b\d+/2\b", stdout), stdout
    assert "\r" not in stdout and "\x1b[" not in stdout
