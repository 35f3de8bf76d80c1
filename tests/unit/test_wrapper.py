"""The step wrapper: pinned by a golden file, and run for real with /bin/bash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobcell.executors.wrapper import wrapper_script

GOLDEN = Path(__file__).parent / "golden" / "wrapper.sh"
UPDATE_VARIABLE = "JOBCELL_UPDATE_GOLDEN"
# Read at import time: tests/conftest.py removes JOBCELL_* variables before each test.
UPDATE_GOLDEN = os.environ.get(UPDATE_VARIABLE) == "1"


def test_wrapper_text_matches_the_golden_file() -> None:
    text = wrapper_script()
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), (
        f"{GOLDEN} is missing; create it with {UPDATE_VARIABLE}=1 pytest {__file__}")
    assert text == GOLDEN.read_text(), (
        "the generated wrapper differs from tests/unit/golden/wrapper.sh. Every running "
        "step depends on this script: if the change is intended, review the diff, update "
        f"the golden file by rerunning with {UPDATE_VARIABLE}=1 "
        f"(`{UPDATE_VARIABLE}=1 pytest tests/unit/test_wrapper.py`), and commit it.")


def test_wrapper_uses_the_requested_shell() -> None:
    assert wrapper_script("/usr/bin/bash").startswith("#!/usr/bin/bash\n")
    assert wrapper_script().startswith("#!/bin/bash\n")


# --- behaviour ---------------------------------------------------------------------------


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "wrapper.sh"
    path.write_text(wrapper_script())
    return path


@pytest.fixture
def attempt(tmp_path: Path) -> Path:
    path = tmp_path / "attempt-1"
    path.mkdir()
    return path


def run_wrapper(wrapper: Path, attempt: Path, *argv: str) -> int:
    done = subprocess.run(["/bin/bash", str(wrapper), str(attempt), *argv], timeout=30,
                          stdin=subprocess.DEVNULL, capture_output=True)
    return done.returncode


def recorded(attempt: Path) -> int:
    return int((attempt / "exit_code").read_text())


def wait_for(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_success_writes_pid_logs_and_exit_code(wrapper: Path, attempt: Path) -> None:
    assert run_wrapper(wrapper, attempt, "true") == 0
    assert recorded(attempt) == 0
    assert (attempt / "exit_code").read_text() == "0\n"
    assert int((attempt / "child.pid").read_text()) > 1
    assert (attempt / "stdout.log").read_text() == ""
    assert (attempt / "stderr.log").read_text() == ""
    assert sorted(p.name for p in attempt.iterdir()) == [
        "child.pid", "exit_code", "stderr.log", "stdout.log"], "no temp files left behind"


def test_failure_code_and_separate_logs(wrapper: Path, attempt: Path) -> None:
    code = run_wrapper(wrapper, attempt, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert code == 3
    assert recorded(attempt) == 3
    assert (attempt / "stdout.log").read_text() == "out\n"
    assert (attempt / "stderr.log").read_text() == "err\n"


def test_missing_command_is_127(wrapper: Path, attempt: Path) -> None:
    assert run_wrapper(wrapper, attempt, "jobcell-no-such-command-xyz") == 127
    assert recorded(attempt) == 127
    assert "not found" in (attempt / "stderr.log").read_text()


def test_runner_runs_in_the_attempt_dir_with_no_stdin(wrapper: Path, attempt: Path) -> None:
    code = run_wrapper(wrapper, attempt, sys.executable, "-c",
                       "import os, sys; print(os.getcwd()); print(repr(sys.stdin.read()))")
    assert code == 0
    assert (attempt / "stdout.log").read_text().splitlines() == [str(attempt), "''"]


def test_argv_passes_through_without_a_shell(wrapper: Path, attempt: Path) -> None:
    hostile = ["a b", "$(touch pwned)", "`touch pwned`", "; touch pwned", "*", "'\"", "",
               "line\nbreak", "-n"]
    code = run_wrapper(wrapper, attempt, sys.executable, "-c",
                       "import json, sys; print(json.dumps(sys.argv[1:]))", *hostile)
    assert code == 0
    assert json.loads((attempt / "stdout.log").read_text()) == hostile
    assert not (attempt / "pwned").exists()


def test_missing_attempt_dir_exits_97_without_an_exit_code(wrapper: Path,
                                                           tmp_path: Path) -> None:
    assert run_wrapper(wrapper, tmp_path / "nope", "true") == 97
    assert not (tmp_path / "nope").exists()


def start_sleeping(wrapper: Path, attempt: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the wrapper in its own session around ``sleep``; return it and the child PID."""
    process = subprocess.Popen(["/bin/bash", str(wrapper), str(attempt), "sleep", "30"],
                               start_new_session=True, stdin=subprocess.DEVNULL)
    wait_for(attempt / "child.pid")
    child = int((attempt / "child.pid").read_text())
    return process, child


def assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(
            f"/proc/{pid}/stat").exists() else "X"
        if status == "Z":
            return  # a zombie waiting for its (re-)parent is dead for our purposes
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.01)


def test_child_pid_is_the_real_runner_process(wrapper: Path, attempt: Path) -> None:
    process, child = start_sleeping(wrapper, attempt)
    try:
        # child.pid is written right after the fork; the exec of the runner may lag a little.
        deadline = time.monotonic() + 5
        while True:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if cmdline[:2] == [b"sleep", b"30"] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert cmdline[:2] == [b"sleep", b"30"]
        assert os.getpgid(child) == process.pid, "the runner is in the wrapper's group"
        assert os.getsid(process.pid) == process.pid, "the wrapper leads its own session"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_sigterm_to_the_process_group_records_143(wrapper: Path, attempt: Path) -> None:
    process, child = start_sleeping(wrapper, attempt)
    assert not (attempt / "exit_code").exists()
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=10) == 143
    assert recorded(attempt) == 143
    assert_gone(child)


@pytest.mark.parametrize(("sig", "expected"), [
    (signal.SIGTERM, {143}),
    (signal.SIGHUP, {129}),
    # Background children ignore SIGINT, so the wrapper forwards INT as TERM; the
    # status is the runner's (143), or the interrupted wait's (130) if bash reaped it first.
    (signal.SIGINT, {130, 143}),
], ids=["TERM", "HUP", "INT"])
def test_signal_to_the_wrapper_alone_stops_the_runner_and_records_it(
        wrapper: Path, attempt: Path, sig: signal.Signals, expected: set[int]) -> None:
    process, child = start_sleeping(wrapper, attempt)
    try:
        os.kill(process.pid, sig)
        assert process.wait(timeout=10) in expected
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert recorded(attempt) in expected
    assert_gone(child)


def test_sigint_to_the_process_group_records_an_exit_code(wrapper: Path,
                                                          attempt: Path) -> None:
    process, child = start_sleeping(wrapper, attempt)
    try:
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=10) == 143
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert recorded(attempt) == 143
    assert_gone(child)


def test_sigkill_leaves_no_exit_code(wrapper: Path, attempt: Path) -> None:
    # What the worker sees as "interrupted": never a success.
    process, _ = start_sleeping(wrapper, attempt)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert not (attempt / "exit_code").exists()
