"""Faults: the durable protocol under crashes, kills and racing workers.

Every test asserts the job's final state and the attempt history: which
attempts ran, how often the runner really ran (runners append to a file), and
that no attempt without an ``exit_code`` was ever taken for a success.
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

import blake3
import psutil
import pytest
from integration_support import (
    attempt_dir,
    events_of,
    pid_gone,
    register_tool,
    run_worker,
    spawn_worker,
    step_of,
    wait_child_pid,
    wait_for,
    wait_gone,
    worker_command,
)

from jobcell.executors.embedded import lock_held
from jobcell.service import Cell
from jobcell.store import LockInfo

FAULT_EXIT = 70   # what the worker exits with at an injected fault point


def register_counter(cell: Cell, tools: Path, runs: Path, mode: str = "count",
                     seconds: float = 2.0, **fields: Any) -> None:
    """A runner that appends ``JOB STEP attempt=N`` to ``runs`` on every real run."""
    register_tool(cell, tools, mode, [mode, str(runs), "{output_dir}", str(seconds)],
                  outputs=["result.txt"], **fields)


def register_after(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "after", ["write", "{output_dir}", "after.txt", "downstream ran"],
                  outputs=["after.txt"])


def two_step_job(cell: Cell, first_runner: str) -> str:
    return cell.submit({"label": "fault", "pipeline": [
        {"id": "first", "runner": first_runner},
        {"id": "after", "runner": "after", "inputs": ["first"]}]}).job_id


def run_lines(runs: Path) -> list[str]:
    return runs.read_text().splitlines() if runs.exists() else []


def attempt_history(cell: Cell, job_id: str, step_id: str) -> list[tuple[int, str, int | None]]:
    return [(a.attempt, a.state, a.exit_code) for a in cell.store.attempts(job_id)
            if a.step_id == step_id]


def assert_outputs_match_files(cell: Cell, job_id: str) -> None:
    for out in cell.outputs(job_id):
        data = Path(out["path"]).read_bytes()
        assert out["size"] == len(data)
        assert out["blake3"] == blake3.blake3(data).hexdigest()


def wait_runs(runs: Path, count: int) -> None:
    """Wait until the runner really ran ``count`` times (not only until it was spawned)."""
    wait_for(lambda: len(run_lines(runs)) >= count, what=f"{count} run(s) in {runs}")


def kill_worker(cell: Cell, pid: int) -> None:
    """kill -9 the worker and reap it; its lock stays behind."""
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    info = cell.store.lock_info()
    assert info is not None and info.pid == pid
    assert cell.worker_status()["alive"] is False


def start_worker_with_fault(cell: Cell, monkeypatch: pytest.MonkeyPatch, point: str) -> int:
    """Start the daemon with the fault injected at ``point``; returns its pid."""
    monkeypatch.setenv("JOBCELL_FAULT_INJECT", point)
    pid = int(cell.ensure_worker()["pid"])
    monkeypatch.delenv("JOBCELL_FAULT_INJECT")
    return pid


# -- 1. kill -9 the worker while a step runs ---------------------------------------------

def test_kill_9_worker_mid_step_readopts_the_running_attempt(cell: Cell, tools: Path,
                                                             tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=2.0)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    first_worker = int(cell.ensure_worker()["pid"])
    runner = wait_child_pid(cell, job, "first")

    kill_worker(cell, first_worker)
    assert not pid_gone(runner)                    # the step outlives its worker
    assert lock_held(attempt_dir(cell, job, "first"))
    second_worker = int(cell.ensure_worker()["pid"])
    assert second_worker != first_worker
    status = cell.wait(job, timeout_s=30)

    assert status["state"] == "succeeded", status
    assert len(run_lines(runs)) == 1 and run_lines(runs)[0].endswith("first attempt=1")
    assert step_of(status, "first")["attempt"] == 1
    assert attempt_history(cell, job, "first") == [(1, "succeeded", 0)]
    assert events_of(cell, job, "step_requeued") == []
    assert not attempt_dir(cell, job, "first", 2).exists()
    out = attempt_dir(cell, job, "first") / "output" / "result.txt"
    assert out.read_text() == "done 1\n"
    assert (attempt_dir(cell, job, "after") / "input" / "first" / "result.txt").read_text() == \
        "done 1\n"
    assert {(o["step"], o["name"]) for o in cell.outputs(job)} == {
        ("first", "result.txt"), ("after", "after.txt")}
    assert_outputs_match_files(cell, job)


def test_step_that_ends_while_no_worker_runs_is_collected_not_rerun(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=0.5)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    worker = int(cell.ensure_worker()["pid"])
    wait_child_pid(cell, job, "first")
    kill_worker(cell, worker)
    exit_code = attempt_dir(cell, job, "first") / "exit_code"
    wait_for(exit_code.exists, what="the orphaned attempt to finish")
    assert cell.status(job)["steps"][0]["state"] == "running"   # nobody has looked yet

    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert len(run_lines(runs)) == 1
    assert attempt_history(cell, job, "first") == [(1, "succeeded", 0)]
    assert_outputs_match_files(cell, job)


# -- 2. kill -9 the step's runner process ------------------------------------------------

def test_kill_9_runner_is_not_a_success(cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=30)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    cell.ensure_worker()
    runner = wait_child_pid(cell, job, "first")
    wait_runs(runs, 1)
    os.kill(runner, signal.SIGKILL)
    status = cell.wait(job, timeout_s=30)

    assert status["state"] == "failed"
    first = step_of(status, "first")
    assert (first["state"], first["exit_code"]) == ("failed", 137)
    assert "OOM-like" in first["error"]
    assert step_of(status, "after")["state"] == "cancelled"
    assert (attempt_dir(cell, job, "first") / "exit_code").read_text().strip() == "137"
    assert attempt_history(cell, job, "first") == [(1, "failed", 137)]
    assert cell.outputs(job) == []
    assert len(run_lines(runs)) == 1


def test_kill_9_runner_with_retries_left_is_retried(make_cell: Callable[..., Cell],
                                                    tools: Path, tmp_path: Path) -> None:
    # Signal 9 is OOM-like: the group cools down (briefly here) before the retry.
    cell = make_cell(oom_cooldown_s=0.5)
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, mode="slow-first", seconds=30, retries=1)
    register_after(cell, tools)
    job = two_step_job(cell, "slow-first")
    cell.ensure_worker()
    runner = wait_child_pid(cell, job, "first")
    wait_runs(runs, 1)
    os.kill(runner, signal.SIGKILL)
    status = cell.wait(job, timeout_s=30)

    assert status["state"] == "succeeded", status
    history = attempt_history(cell, job, "first")
    assert [(a, code) for a, _state, code in history] == [(1, 137), (2, 0)]
    assert history[0][1] != "succeeded"
    reasons = [a.reason for a in cell.store.attempts(job) if a.attempt == 1
               and a.step_id == "first"]
    assert "OOM-like" in reasons[0]
    assert len(events_of(cell, job, "retry_scheduled")) == 1
    assert [line.split()[-1] for line in run_lines(runs)] == ["attempt=1", "attempt=2"]
    assert len(events_of(cell, job, "oom_cooldown")) == 1
    assert (attempt_dir(cell, job, "first", 2) / "output" / "result.txt").read_text() == \
        "done 2\n"
    assert_outputs_match_files(cell, job)


# -- 3. crash between the completion commit and the advance ------------------------------

def test_crash_after_completion_commit_resumes_the_advance(
        cell: Cell, tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=0.2)
    register_after(cell, tools)
    faulty = start_worker_with_fault(cell, monkeypatch, "after_completion_commit")
    job = two_step_job(cell, "count")
    assert wait_gone(faulty, timeout_s=30) == FAULT_EXIT

    crashed = cell.status(job)    # completion is durable, the advance never happened
    assert step_of(crashed, "first")["state"] == "succeeded"
    assert step_of(crashed, "after")["state"] == "pending"
    assert crashed["state"] == "running"
    assert events_of(cell, job, "step_queued") == []

    cell.ensure_worker()
    status = cell.wait(job, timeout_s=30)
    assert status["state"] == "succeeded", status
    assert len(run_lines(runs)) == 1                       # the completed step did not re-run
    assert attempt_history(cell, job, "first") == [(1, "succeeded", 0)]
    assert attempt_history(cell, job, "after") == [(1, "succeeded", 0)]
    assert len(events_of(cell, job, "step_succeeded")) == 2
    assert len(events_of(cell, job, "step_queued")) == 1
    assert (attempt_dir(cell, job, "after") / "output" / "after.txt").read_text() == \
        "downstream ran"
    assert_outputs_match_files(cell, job)


# -- 4. crash after the start commit, before anything was spawned ------------------------

def test_crash_after_start_commit_requeues_never_succeeds(
        cell: Cell, tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=0.2)
    register_after(cell, tools)
    faulty = start_worker_with_fault(cell, monkeypatch, "after_start_commit")
    job = two_step_job(cell, "count")
    assert wait_gone(faulty, timeout_s=30) == FAULT_EXIT

    crashed = step_of(cell.status(job), "first")
    assert (crashed["state"], crashed["attempt"], crashed["exit_code"]) == ("running", 1, None)
    assert not attempt_dir(cell, job, "first").exists()     # no process was ever started
    assert run_lines(runs) == []

    cell.ensure_worker()
    status = cell.wait(job, timeout_s=30)
    assert status["state"] == "succeeded", status
    assert step_of(status, "first")["attempt"] == 2
    history = attempt_history(cell, job, "first")
    assert [(a, code) for a, _state, code in history] == [(1, None), (2, 0)]
    assert history[0][1] != "succeeded"
    assert [e["attempt"] for e in events_of(cell, job, "step_requeued")] == [1]
    assert [line.split()[-1] for line in run_lines(runs)] == ["attempt=2"]
    assert not (attempt_dir(cell, job, "first", 1) / "exit_code").exists()
    assert_outputs_match_files(cell, job)


# -- crash after spawning, before the PID was recorded ------------------------------------

@pytest.mark.parametrize("stop_by", ["cancel", "timeout"])
def test_crash_before_the_pid_commit_leaves_a_stoppable_attempt(
        cell: Cell, tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        stop_by: str) -> None:
    pids = tmp_path / "pids.json"
    register_tool(cell, tools, "hang", ["grandchild", str(pids)],
                  resources={"timeout_s": 2 if stop_by == "timeout" else 600})
    faulty = start_worker_with_fault(cell, monkeypatch, "after_spawn")
    job = cell.submit({"label": "fault", "steps": [{"runner": "hang"}]}).job_id
    assert wait_gone(faulty, timeout_s=30) == FAULT_EXIT
    wait_for(pids.exists, what="the runner's pid file")
    crashed = cell.status(job)["steps"][0]
    assert (crashed["state"], cell.store.get_job(job).steps[0].pid) == (  # type: ignore[union-attr]
        "running", None)
    recorded = json.loads(pids.read_text())

    cell.ensure_worker()
    if stop_by == "cancel":
        assert cell.cancel(job, wait_s=15)["cancelled"] is True
        expected = ("cancelled", "cancelled")
    else:
        status = cell.wait(job, timeout_s=15)
        assert "timed out" in status["steps"][0]["error"]
        expected = ("failed", "failed")
    status = cell.status(job)
    assert (status["state"], status["steps"][0]["state"]) == expected
    assert status["steps"][0]["attempt"] == 1
    wait_for(lambda: pid_gone(recorded["runner"]) and pid_gone(recorded["grandchild"]), 5,
             "the attempt's processes to be killed")


def test_cancel_requested_while_no_worker_runs_stops_the_adopted_attempt(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=60)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    worker = int(cell.ensure_worker()["pid"])
    runner = wait_child_pid(cell, job, "first")
    kill_worker(cell, worker)
    assert cell.cancel(job, wait_s=0)["cancelled"] is False     # recorded, nobody to act yet

    cell.ensure_worker()
    status = cell.wait(job, timeout_s=20)
    assert status["state"] == "cancelled"
    assert [s["state"] for s in status["steps"]] == ["cancelled", "cancelled"]
    wait_for(lambda: pid_gone(runner), 5, "the adopted runner to be killed")
    assert attempt_history(cell, job, "first") == [(1, "cancelled", 143)]


# -- 5. no exit_code: the attempt's whole process group was killed ------------------------

def kill_attempt_group(cell: Cell, job_id: str, step_id: str, runs: Path) -> int:
    """SIGKILL the wrapper and the runner together, so that no exit_code is written."""
    runner = wait_child_pid(cell, job_id, step_id)
    wait_runs(runs, 1)
    group = os.getpgid(runner)
    assert group != os.getpgid(0)          # the attempt runs in its own session
    os.killpg(group, signal.SIGKILL)
    wait_for(lambda: pid_gone(runner) and pid_gone(group), what="the attempt to die")
    return runner


def test_missing_exit_code_is_requeued(cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, mode="slow-first", seconds=30)
    register_after(cell, tools)
    job = two_step_job(cell, "slow-first")
    cell.ensure_worker()
    kill_attempt_group(cell, job, "first", runs)
    status = cell.wait(job, timeout_s=30)

    assert status["state"] == "succeeded", status
    assert not (attempt_dir(cell, job, "first", 1) / "exit_code").exists()
    history = attempt_history(cell, job, "first")
    assert [(a, code) for a, _state, code in history] == [(1, None), (2, 0)]
    assert history[0][1] != "succeeded"
    requeued = events_of(cell, job, "step_requeued")
    assert len(requeued) == 1 and requeued[0]["attempt"] == 1
    assert "interrupted" in requeued[0]["reason"]
    assert events_of(cell, job, "retry_scheduled") == []     # not counted as a failure
    assert [line.split()[-1] for line in run_lines(runs)] == ["attempt=1", "attempt=2"]
    assert_outputs_match_files(cell, job)


def test_missing_exit_code_of_an_adopted_attempt_is_requeued(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, mode="slow-first", seconds=30)
    register_after(cell, tools)
    job = two_step_job(cell, "slow-first")
    worker = int(cell.ensure_worker()["pid"])
    wait_child_pid(cell, job, "first")
    kill_worker(cell, worker)              # the next worker must adopt, not own, the attempt
    kill_attempt_group(cell, job, "first", runs)

    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert [(a, code) for a, _s, code in attempt_history(cell, job, "first")] == [
        (1, None), (2, 0)]
    assert len(events_of(cell, job, "step_requeued")) == 1
    assert len(run_lines(runs)) == 2


# -- 6. two workers started at once --------------------------------------------------------

def worker_processes(home: Path) -> list[psutil.Process]:
    """Live daemon processes serving ``home``."""
    wanted = worker_command(home)[1:]
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if cmdline[1:] == wanted and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.parametrize("lock_left_by", ["nobody", "a killed worker"])
def test_two_workers_started_at_once_one_scheduler(cell: Cell, tools: Path, tmp_path: Path,
                                                   lock_left_by: str) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=1.5)
    if lock_left_by == "a killed worker":       # both newcomers try to steal the same lock
        kill_worker(cell, int(cell.ensure_worker()["pid"]))
    jobs = [cell.submit({"label": "race", "cache": False, "steps": [{"runner": "count"}]}).job_id
            for _ in range(3)]
    workers = [spawn_worker(cell.home.root, "--until-idle") for _ in range(2)]
    results = [(w.pid, *w.communicate(timeout=60), w.returncode) for w in workers]

    codes = sorted(code for *_rest, code in results)
    assert codes == [0, 3], results
    winner = next(pid for pid, _out, _err, code in results if code == 0)
    loser_err = next(err for _pid, _out, err, code in results if code == 3)
    assert "already running" in loser_err and f"pid {winner}" in loser_err
    assert socket.gethostname() in loser_err
    assert "Traceback" not in loser_err
    for job in jobs:
        assert cell.status(job)["state"] == "succeeded"
        assert attempt_history(cell, job, "0-count") == [(1, "succeeded", 0)]
    lines = run_lines(runs)
    assert sorted(line.split()[0] for line in lines) == sorted(jobs)   # each ran exactly once
    assert cell.store.lock_info() is None        # the winner released the lock on exit


def test_concurrent_ensure_worker_from_threads_starts_one_daemon(cell: Cell) -> None:
    cells = [cell] + [Cell(cell.home, auto_worker=False) for _ in range(3)]
    barrier = threading.Barrier(len(cells))
    pids: list[int] = []
    errors: list[BaseException] = []

    def start(c: Cell) -> None:
        barrier.wait()
        try:
            pids.append(int(c.ensure_worker()["pid"]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in cells]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in cells[1:]:
        c.close()
    assert errors == []
    assert len(set(pids)) == 1 and len(pids) == 4
    assert [p.pid for p in worker_processes(cell.home.root)] == pids[:1]
    assert "already running" not in cell.home.worker_log.read_text()
    assert cell.worker_status()["alive"] is True


def test_concurrent_ensure_worker_from_processes_starts_one_daemon(cell: Cell) -> None:
    code = ("import json, sys; from jobcell.service import Cell; "
            "c = Cell(sys.argv[1], auto_worker=False); print(json.dumps(c.ensure_worker()))")
    starters = [subprocess.Popen([sys.executable, "-c", code, str(cell.home.root)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    answers = []
    for starter in starters:
        out, err = starter.communicate(timeout=60)
        assert starter.returncode == 0, err
        answers.append(json.loads(out))
    pids = {answer["pid"] for answer in answers}
    assert len(pids) == 1 and all(answer["alive"] for answer in answers)
    assert [p.pid for p in worker_processes(cell.home.root)] == list(pids)
    assert "already running" not in cell.home.worker_log.read_text()


# -- 7. stopping a worker; taking over a dead one's lock ---------------------------------

@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_worker_stopped_by_signal_clears_its_lock(cell: Cell,
                                                  signal_number: signal.Signals) -> None:
    pid = int(cell.ensure_worker()["pid"])
    assert cell.store.lock_info().pid == pid  # type: ignore[union-attr]
    os.kill(pid, signal_number)
    assert wait_gone(pid) == 0
    assert cell.store.lock_info() is None
    assert cell.worker_status()["alive"] is False


def test_stop_worker_clears_the_lock_and_running_steps_survive(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=1.5)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    pid = int(cell.ensure_worker()["pid"])
    runner = wait_child_pid(cell, job, "first")

    answer = cell.stop_worker(timeout_s=10)
    assert answer == {"stopped": True, "pid": pid}
    assert pid_gone(pid) and cell.store.lock_info() is None
    assert cell.stop_worker()["stopped"] is False
    assert not pid_gone(runner)              # stopping the worker does not stop the work

    cell.ensure_worker()
    status = cell.wait(job, timeout_s=30)
    assert status["state"] == "succeeded", status
    assert len(run_lines(runs)) == 1
    assert attempt_history(cell, job, "first") == [(1, "succeeded", 0)]


def test_dead_workers_lock_is_taken_over_immediately(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["write", "{output_dir}", "x.txt", "x"])
    first = int(cell.ensure_worker()["pid"])
    kill_worker(cell, first)
    stale = cell.store.lock_info()
    assert stale is not None and stale.pid == first

    started = time.monotonic()
    second = int(cell.ensure_worker()["pid"])
    elapsed = time.monotonic() - started
    ttl = cell.settings.worker_heartbeat_ttl_s
    assert second != first
    assert elapsed < ttl / 3, f"takeover took {elapsed:.1f} s; the heartbeat ttl is {ttl} s"
    info = cell.store.lock_info()
    assert info is not None and info.pid == second and info.token != stale.token
    job = cell.submit({"label": "after", "steps": [{"runner": "ok"}]}).job_id
    assert cell.wait(job, timeout_s=30)["state"] == "succeeded"


def test_worker_that_loses_its_lock_stops(make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(worker_heartbeat_ttl_s=1)
    pid = int(cell.ensure_worker()["pid"])
    current = cell.store.lock_info()
    assert current is not None
    now = time.time()
    intruder = LockInfo("intruder", os.getpid(), socket.gethostname(), now, now)
    assert cell.store.try_acquire_lock(intruder, now, 1.0, steal_token=current.token)
    assert wait_gone(pid, timeout_s=10) == 0
    assert "lost the scheduler lock" in cell.home.worker_log.read_text()
    info = cell.store.lock_info()
    assert info is not None and info.token == "intruder"     # it did not release ours
    cell.store.release_lock("intruder")


def test_hung_worker_past_the_ttl_is_replaced_and_steps_down(
        make_cell: Callable[..., Cell], tools: Path, tmp_path: Path) -> None:
    cell = make_cell(worker_heartbeat_ttl_s=1)
    runs = tmp_path / "runs.log"
    register_counter(cell, tools, runs, seconds=2.5)
    register_after(cell, tools)
    job = two_step_job(cell, "count")
    hung = int(cell.ensure_worker()["pid"])
    wait_child_pid(cell, job, "first")
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for(lambda: not cell.worker_status()["alive"], 10, "the heartbeat to go stale")
        replacement = int(cell.ensure_worker()["pid"])
        assert replacement != hung
    finally:
        os.kill(hung, signal.SIGCONT)
    assert wait_gone(hung, timeout_s=10) == 0          # it noticed and stepped down
    assert "lost the scheduler lock" in cell.home.worker_log.read_text()
    assert cell.store.lock_info().pid == replacement  # type: ignore[union-attr]

    status = cell.wait(job, timeout_s=30)
    assert status["state"] == "succeeded", status
    assert len(run_lines(runs)) == 1
    assert attempt_history(cell, job, "first") == [(1, "succeeded", 0)]
