"""Regression tests for the review fixes.

Each test pins one fix: fenced worker writes and resync on conflicts, bounded log
tails, strays of interrupted attempts, symlinked outputs, staged inputs changed in
place, serialised dedup and quotas, a cancel racing a finished step, and spawn
failures that keep their reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from integration_support import (
    attempt_dir,
    events_of,
    pid_gone,
    register_tool,
    run_worker,
    wait_child_pid,
    wait_for,
)

from jobcell.errors import QuotaError
from jobcell.executors.embedded import kill_strays
from jobcell.model.states import StepState
from jobcell.service import Cell, SubmitResult
from jobcell.store import Changes, LockInfo, LockLostError
from jobcell.store.base import StepUpdate
from jobcell.worker import Worker


def submit_one(cell: Cell, runner: str, **spec: Any) -> str:
    return cell.submit({"label": "review", "steps": [{"runner": runner}], **spec}).job_id


def attempt_history(cell: Cell, job_id: str) -> list[tuple[int, str, int | None]]:
    return [(a.attempt, a.state, a.exit_code) for a in cell.store.attempts(job_id)]


def leading_worker(cell: Cell) -> Worker:
    """An in-process worker that holds the lock; the test drives its rounds."""
    worker = Worker(cell.home, cell.settings, cell.store)
    worker.acquire()
    worker.recover()
    return worker


def take_over_lock(cell: Cell, token: str) -> None:
    """Another worker steals the lock from ``token`` (its pid is ours, so the cell's
    cleanup does not try to stop it)."""
    now = time.time()
    intruder = LockInfo("intruder", os.getpid(), socket.gethostname(), now, now)
    assert cell.store.try_acquire_lock(intruder, now, cell.settings.worker_heartbeat_ttl_s,
                                       steal_token=token)


def attempt_ended(cell: Cell, job_id: str, step_id: str) -> None:
    """Wait until the running attempt wrote its exit_code and its wrapper is gone, so that
    the worker's next poll surely sees it ended."""
    step = next(s for s in cell.store.get_job(job_id).steps  # type: ignore[union-attr]
                if s.step_id == step_id)
    path = attempt_dir(cell, job_id, step_id, step.attempt) / "exit_code"
    wait_for(path.exists, what=f"{path}")
    wrapper = step.pid
    assert wrapper is not None
    wait_for(lambda: pid_gone(wrapper), what="the attempt's wrapper to exit")


# -- 1. every worker write is fenced by its lock token; other conflicts resync -------------

def test_replaced_worker_cannot_commit_the_end_of_a_step(make_cell: Callable[..., Cell],
                                                         tools: Path) -> None:
    # A long ttl: the worker never heartbeats during the test, so only the fence can stop it.
    cell = make_cell(worker_heartbeat_ttl_s=600)
    register_tool(cell, tools, "quick", ["write", "{output_dir}", "result.txt", "x"],
                  outputs=["result.txt"])
    job = submit_one(cell, "quick")
    stalled = leading_worker(cell)
    assert stalled.run_once()                       # starts the attempt
    attempt_ended(cell, job, "0-quick")
    take_over_lock(cell, stalled.token)

    with pytest.raises(LockLostError):
        stalled.run_once()                          # its completion commit is refused

    step = cell.store.get_job(job).steps[0]  # type: ignore[union-attr]
    assert (step.state, step.exit_code, step.finished_at) == (StepState.RUNNING, None, None)
    assert attempt_history(cell, job) == [(1, "running", None)]
    assert cell.outputs(job) == [] and events_of(cell, job, "step_succeeded") == []

    cell.store.release_lock("intruder")             # the new holder goes; a worker collects
    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert attempt_history(cell, job) == [(1, "succeeded", 0)]


def test_serving_worker_stops_cleanly_when_its_commit_is_fenced_off(
        make_cell: Callable[..., Cell], tools: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cell = make_cell(worker_heartbeat_ttl_s=600)
    gate = tmp_path / "gate"
    register_tool(cell, tools, "gated", ["gate-write", str(gate), "{output_dir}"],
                  outputs=["result.txt"])
    job = submit_one(cell, "gated")
    worker = Worker(cell.home, cell.settings, cell.store)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            worker.run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        wait_child_pid(cell, job, "0-gated")
        take_over_lock(cell, worker.token)
        gate.touch()
        wait_for(lambda: not thread.is_alive() or cell.status(job)["state"] != "running",
                 20, "the replaced worker to stop")
        thread.join(10)
    finally:
        worker.request_stop()
        thread.join(10)

    assert not thread.is_alive() and errors == []
    assert "another worker took over the scheduler lock; stopping" in capsys.readouterr().err
    status = cell.status(job)
    assert (status["state"], status["steps"][0]["state"]) == ("running", "running")
    assert events_of(cell, job, "step_succeeded") == []
    info = cell.store.lock_info()
    assert info is not None and info.token == "intruder"   # it did not release the new lock
    cell.store.release_lock("intruder")


def test_conflict_that_is_not_a_lost_lock_makes_the_worker_reread_the_cell(
        cell: Cell, tools: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate = tmp_path / "gate"
    register_tool(cell, tools, "gated", ["gate-write", str(gate), "{output_dir}"],
                  outputs=["result.txt"])
    job = submit_one(cell, "gated")
    worker = leading_worker(cell)
    assert worker.run_once()                        # attempt 1 starts
    wait_child_pid(cell, job, "0-gated")
    # Behind the worker's back, the running step is put back in the queue.
    cell.store.apply(Changes(steps=[StepUpdate(job, "0-gated", {"state": StepState.QUEUED},
                                               StepState.RUNNING)]))
    gate.touch()
    attempt_ended(cell, job, "0-gated")

    timer = threading.Timer(30, worker.request_stop)
    timer.start()
    try:
        worker.run(until_idle=True)                 # its completion commit conflicts
    finally:
        timer.cancel()

    assert "re-reading it" in capsys.readouterr().err
    assert worker._running == {}                     # rebuilt from the store, then emptied
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert status["steps"][0]["attempt"] == 2         # the queued step ran again
    assert (attempt_dir(cell, job, "0-gated", 2) / "output" / "result.txt").exists()


# -- 2. log tails are bounded -----------------------------------------------------------------

def test_step_with_a_huge_stderr_line_succeeds_and_its_log_tail_is_bounded(
        cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "noisy", ["big-stderr", "30"])
    job = submit_one(cell, "noisy")
    run_worker(cell)

    assert cell.status(job)["state"] == "succeeded"
    assert (attempt_dir(cell, job, "0-noisy") / "stderr.log").stat().st_size == 30 << 20
    logs = cell.logs(job)["steps"][0]
    assert len(logs["stderr"]) == 1
    assert 0 < len(logs["stderr"][0]) <= 4096 and set(logs["stderr"][0]) == {"x"}
    assert logs["stdout"] == []


# -- 3. strays of an interrupted attempt -------------------------------------------------------

def test_runner_that_outlives_its_killed_wrapper_never_runs_beside_the_next_attempt(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    state = tmp_path / "stray"
    state.mkdir()
    register_tool(cell, tools, "stray", ["stray", str(state), "{output_dir}"],
                  outputs=["result.txt"])
    job = submit_one(cell, "stray")
    cell.ensure_worker()
    stray: int | None = None
    try:
        runner = wait_child_pid(cell, job, "0-stray")
        wait_for((state / "ticks").exists, what="the runner to drop its descriptors")
        stray = int((state / "stray.pid").read_text())
        assert stray == runner
        wrapper = int(wait_for(lambda: cell.store.get_job(job).steps[0].pid,  # type: ignore
                               what="the attempt's pid to be recorded"))
        assert psutil.Process(runner).ppid() == wrapper
        held = [f.path for f in psutil.Process(runner).open_files()]
        assert not any(path.endswith("/.lock") for path in held), held   # it let go of it
        os.kill(wrapper, signal.SIGKILL)            # only the wrapper: no exit_code is written

        status = cell.wait(job, timeout_s=30)
        assert status["state"] == "succeeded", status
        assert [(a, code) for a, _s, code in attempt_history(cell, job)] == [(1, None), (2, 0)]
        assert len(events_of(cell, job, "step_requeued")) == 1
        second = json.loads((state / "attempt-2.json").read_text())
        assert second["stray_alive"] is False, "attempt 2 started while attempt 1 still ran"
        last_tick = max(float(t) for t in (state / "ticks").read_text().split())
        assert last_tick < second["started"], "attempt 1 still ran after attempt 2 started"
        wait_for(lambda: pid_gone(runner), 5, "the stray runner to be gone")
    finally:
        if stray is not None and not pid_gone(stray):
            os.kill(stray, signal.SIGKILL)


def test_kill_strays_kills_exactly_the_processes_of_that_attempt(tmp_path: Path) -> None:
    mine, other = tmp_path / "attempt-1", tmp_path / "attempt-10"   # a prefix is no match
    mine.mkdir()
    other.mkdir()
    code = ("import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('up'); "
            "time.sleep(60)")

    def start(step_dir: Path, ready: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code, str(ready)],
                                env={**os.environ, "JOBCELL_STEP_DIR": str(step_dir)},
                                start_new_session=True)    # its own session, like setsid

    target = start(mine, tmp_path / "target.ready")
    bystander = start(other, tmp_path / "bystander.ready")
    try:
        wait_for(lambda: (tmp_path / "target.ready").exists()
                 and (tmp_path / "bystander.ready").exists(), what="both processes to start")
        assert kill_strays(mine) == 1
        assert target.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert kill_strays(mine) == 0
    finally:
        for process in (target, bystander):
            process.kill()
            process.wait(timeout=10)


# -- 4. outputs must be regular files ----------------------------------------------------------

def test_symlinked_outputs_fail_the_step_and_expose_nothing(cell: Cell, tools: Path,
                                                             tmp_path: Path) -> None:
    secret = tmp_path / "server-secret.json"
    secret.write_text(json.dumps({"secret": "hunter2"}))
    register_tool(cell, tools, "leak_value", ["symlink", "{output_dir}", "output.json",
                                              str(secret)])
    register_tool(cell, tools, "leak_declared", ["symlink", "{output_dir}", "data.txt",
                                                 str(secret)], outputs=["data.txt"])
    register_tool(cell, tools, "honest", ["write", "{output_dir}", "output.json", "{text}"],
                  params={"text": {"type": "string"}})
    leaks = {"output.json": submit_one(cell, "leak_value"),
             "data.txt": submit_one(cell, "leak_declared")}
    honest = cell.submit({"label": "review", "steps": [
        {"runner": "honest", "params": {"text": json.dumps({"value": 1})}}]}).job_id
    run_worker(cell)

    for name, job in leaks.items():
        status = cell.status(job)
        step = status["steps"][0]
        assert (status["state"], step["state"], step["exit_code"]) == ("failed", "failed", 0)
        assert "symlink" in step["error"] and name in step["error"], step["error"]
        result = cell.result(job)
        assert "hunter2" not in json.dumps(result)
        assert result["steps"] == {} and result["outputs"] == []
        assert cell.outputs(job) == []
    assert cell.result(honest)["result"] == {"value": 1}
    assert [o["name"] for o in cell.outputs(honest)] == ["output.json"]


def test_symlinked_value_of_a_session_runner_is_refused(cell: Cell, tools: Path,
                                                        tmp_path: Path) -> None:
    secret = tmp_path / "server-secret.json"
    secret.write_text(json.dumps({"secret": "hunter2"}))
    register_tool(cell, tools, "leak", ["symlink", "{output_dir}", "output.json", str(secret)],
                  plane="session")
    answer = cell.run_session("leak")
    assert answer["succeeded"] is False and answer["value"] is None
    assert "symlink" in answer["error"]
    assert "hunter2" not in json.dumps(answer)


# -- 5. staged inputs are read-only --------------------------------------------------------------

def test_downstream_step_that_changes_its_staged_input_in_place_fails_without_retry(
        cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "make", ["write", "{output_dir}", "data.txt", "{text}"],
                  params={"text": {"type": "string"}}, outputs=["data.txt"])
    register_tool(cell, tools, "use", ["input", "{action}", "{input_dir}/a/data.txt",
                                       "{output_dir}"],
                  params={"action": {"type": "string"}}, outputs=["done.txt"], retries=2)
    jobs = {action: cell.submit({"label": "inputs", "pipeline": [
        {"id": "a", "runner": "make", "params": {"text": f"upstream of {action}\n"}},
        {"id": "b", "runner": "use", "inputs": ["a"], "params": {"action": action}}]}).job_id
        for action in ("append", "read", "delete", "replace")}
    run_worker(cell)

    tampered = cell.status(jobs["append"])
    b = tampered["steps"][1]
    assert (tampered["state"], b["state"], b["exit_code"]) == ("failed", "failed", 0)
    assert "changed its staged input" in b["error"] and "a/data.txt" in b["error"], b["error"]
    assert b["attempt"] == 1                          # a retry would not undo it
    assert [(a.step_id, a.attempt) for a in cell.store.attempts(jobs["append"])] == [
        ("a", 1), ("b", 1)]
    assert events_of(cell, jobs["append"], "retry_scheduled") == []
    for action in ("read", "delete", "replace"):
        status = cell.status(jobs[action])
        assert status["state"] == "succeeded", (action, status)
        upstream = attempt_dir(cell, jobs[action], "a") / "output" / "data.txt"
        assert upstream.read_text() == f"upstream of {action}\n"


# -- 6. dedup and quotas are one decision per submit -------------------------------------------

def widen(cell: Cell, method: str, seconds: float = 0.1) -> None:
    """Stretch the gap between a store read and the insert that depends on it, so that
    racing submitters all land in it unless submits are serialised."""
    original = getattr(cell.store, method)

    def slow(*args: Any, **kwargs: Any) -> Any:
        value = original(*args, **kwargs)
        time.sleep(seconds)
        return value

    setattr(cell.store, method, slow)


def submit_at_once(cells: list[Cell], specs: list[dict[str, Any]]
                   ) -> tuple[list[SubmitResult], list[BaseException]]:
    barrier = threading.Barrier(len(cells))
    results: list[SubmitResult] = []
    errors: list[BaseException] = []

    def submit(c: Cell, spec: dict[str, Any]) -> None:
        barrier.wait()
        try:
            results.append(c.submit(spec))
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=pair)
               for pair in zip(cells, specs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def other_cells(cell: Cell, count: int) -> list[Cell]:
    return [Cell(cell.home, auto_worker=False) for _ in range(count)]


def test_identical_specs_submitted_at_once_make_one_job(cell: Cell) -> None:
    cell.register_runner({"name": "noop", "command": "true"})
    cells = [cell, *other_cells(cell, 5)]
    for c in cells:
        widen(c, "find_job_by_spec_hash")
    spec = {"label": "same", "steps": [{"runner": "noop"}]}
    try:
        results, errors = submit_at_once(cells, [spec] * len(cells))
    finally:
        for c in cells[1:]:
            c.close()
    assert errors == []
    assert len(results) == 6 and len({r.job_id for r in results}) == 1
    assert sorted(r.deduplicated for r in results) == [False] + [True] * 5
    assert cell.store.count_jobs() == 1


def test_quota_holds_against_concurrent_submits(make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(max_jobs_global=1)
    cell.register_runner({"name": "noop", "command": "true"})
    cells = [cell, *other_cells(cell, 3)]
    for c in cells:
        widen(c, "count_jobs")
    specs = [{"label": f"job-{i}", "cache": False, "steps": [{"runner": "noop"}]}
             for i in range(4)]
    try:
        results, errors = submit_at_once(cells, specs)
    finally:
        for c in cells[1:]:
            c.close()
    assert len(results) == 1 and results[0].deduplicated is False
    assert len(errors) == 3 and all(isinstance(e, QuotaError) for e in errors), errors
    assert cell.store.count_jobs() == 1


# -- 7. a cancel racing a step's end does not throw the finished work away --------------------

def test_cancel_that_arrives_as_the_step_ends_keeps_the_finished_work(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_tool(cell, tools, "gated", ["gate-write", str(gate), "{output_dir}"],
                  outputs=["result.txt"])
    job = submit_one(cell, "gated")
    first = leading_worker(cell)
    assert first.run_once()                        # starts the attempt, then looks away
    wait_child_pid(cell, job, "0-gated")
    gate.touch()
    attempt_ended(cell, job, "0-gated")        # the work is done ...
    assert cell.store.request_cancel(job, time.time())   # ... when the cancel arrives
    first.release()

    run_worker(cell)                               # sees both in the same round
    status = cell.status(job)
    assert (status["state"], status["steps"][0]["state"]) == ("succeeded", "succeeded")
    assert status["steps"][0]["exit_code"] == 0
    assert [o["name"] for o in cell.outputs(job)] == ["result.txt"]
    assert len(events_of(cell, job, "cancel_requested")) == 1
    assert events_of(cell, job, "cancelled") == []


# -- 8. a spawn failure keeps its reason -------------------------------------------------------

def test_attempt_that_cannot_be_started_fails_with_its_reason(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["write", "{output_dir}", "x.txt", "x"], retries=1)
    job = submit_one(cell, "ok")
    for attempt in (1, 2):       # the attempt directories are in the way: mkdir fails
        attempt_dir(cell, job, "0-ok", attempt).mkdir(parents=True)
    run_worker(cell)

    status = cell.status(job)
    step = status["steps"][0]
    assert (status["state"], step["state"], step["attempt"]) == ("failed", "failed", 2)
    assert step["error"].startswith("could not start: "), step["error"]
    assert "File exists" in step["error"]
    assert [(a.attempt, a.state) for a in cell.store.attempts(job)] == [
        (1, "retry"), (2, "failed")]
    assert all(a.reason.startswith("could not start") for a in cell.store.attempts(job))
    assert events_of(cell, job, "step_requeued") == []
    assert len(events_of(cell, job, "retry_scheduled")) == 1
    assert not attempt_dir(cell, job, "0-ok", 3).exists()


def test_attempt_under_a_regular_file_fails_with_its_reason(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["write", "{output_dir}", "x.txt", "x"])
    job = submit_one(cell, "ok")
    (cell.home.artifacts / job).write_text("in the way")
    run_worker(cell, timeout_s=20)

    step = cell.status(job)["steps"][0]
    assert step["state"] == "failed" and "could not start" in step["error"], step


def test_hard_linked_output_from_outside_the_step_fails_and_leaves_the_file_alone(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    """A hard link to a server file is not an output: the step fails and the outside
    file keeps its content and mode (registration would have made it read-only)."""
    secret = tmp_path / "server-secret.json"
    secret.write_text('{"secret": "s3cr3t"}')
    secret.chmod(0o644)
    script = "import os, sys; os.link(sys.argv[1], os.path.join(sys.argv[2], 'output.json'))"
    cell.register_runner({"name": "hardlink", "command": sys.executable,
                          "args_template": ["-c", script, str(secret), "{output_dir}"]})
    job = submit_one(cell, "hardlink")
    run_worker(cell)
    step = cell.status(job)["steps"][0]
    assert step["state"] == "failed" and "hard links" in step["error"], step
    assert "s3cr3t" not in json.dumps(cell.result(job))
    assert secret.stat().st_mode & 0o777 == 0o644
