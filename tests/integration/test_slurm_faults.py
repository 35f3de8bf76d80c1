"""Faults on the real Slurm cluster: nothing submitted is lost, run twice or falsely succeeds.

- the controller stops mid-run (steps stay running as unknown, then finish);
- the worker is killed right after ``sbatch`` answered, before the database knew the id
  (the next worker recovers it from ``external_backend.json``);
- someone runs ``scancel`` from outside (the step fails, never succeeds);
- the login node's sshd restarts mid-run (Slurm over SSH goes on).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import (
    events_of,
    register_tool,
    run_worker,
    spawn_worker,
    step_of,
    wait_for,
)

from jobcell.executors.delegated import read_record
from jobcell.service import Cell
from jobcell.worker import Worker

pytestmark = pytest.mark.slurm

FAST = {"backend_poll_interval_s": 0.2, "backend_poll_max_interval_s": 1.0,
        "backend_exit_code_grace_s": 5.0}


def counting(tmp_path: Path, program: str, real: str) -> tuple[Path, Path]:
    """A stand-in for a Slurm command that counts its calls, then runs the real one."""
    log = tmp_path / f"{program}.calls"
    script = tmp_path / f"counting-{program}"
    script.write_text(f"#!/bin/sh\necho call >> '{log}'\nexec '{real}' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def sbatch_log(tmp_path: Path, slurm_cluster: Any) -> tuple[Path, Path]:
    return counting(tmp_path, "sbatch", slurm_cluster.bin("sbatch"))


@pytest.fixture
def slurm_cell(make_cell: Callable[..., Cell], slurm_cluster: Any,
               sbatch_log: tuple[Path, Path]) -> Cell:
    return make_cell(executor_backend="slurm", slurm_env=dict(slurm_cluster.env),
                     slurm_sbatch=str(sbatch_log[0]), **FAST)


@pytest.fixture
def serve() -> Iterator[Callable[[Cell], Worker]]:
    """Serve a cell with a worker in a thread (stopped at the end)."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(cell: Cell) -> Worker:
        worker = Worker(cell.home, cell.settings, cell.store)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.request_stop()
        thread.join(timeout=30)


def gated_job(cell: Cell, tools: Path, gate: Path, steps: int = 1) -> str:
    register_tool(cell, tools, "held", ["gate-write", str(gate), "{output_dir}"],
                  params={"n": {"type": "integer"}})
    # Independent pipeline nodes: all ready at once (ordered steps would run one by one).
    return cell.submit({"label": "faults", "pipeline": [
        {"id": f"s{i}", "runner": "held", "params": {"n": i}} for i in range(steps)]}).job_id


def all_started(cell: Cell, job_id: str) -> bool:
    status = cell.status(job_id)
    return all((cell.home.attempt_dir(job_id, s["id"], 1) / "child.pid").exists()
               for s in status["steps"])


def test_the_controller_stopping_mid_run_loses_and_repeats_nothing(
        slurm_cell: Cell, slurm_cluster: Any, tools: Path, tmp_path: Path,
        sbatch_log: tuple[Path, Path], serve: Callable[[Cell], Worker]) -> None:
    gate = tmp_path / "gate"
    job_id = gated_job(slurm_cell, tools, gate, steps=3)
    serve(slurm_cell)
    wait_for(lambda: all_started(slurm_cell, job_id), 60, "all steps to run on the cluster")
    slurm_cluster.stop_controller()
    try:
        time.sleep(3)   # several polling rounds with squeue failing
        status = slurm_cell.status(job_id)
        assert status["state"] == "running"
        assert all(s["state"] == "running" for s in status["steps"]), status
        gate.touch()     # the steps end while the controller is away
        time.sleep(2)
        assert slurm_cell.status(job_id)["state"] == "running"
    finally:
        slurm_cluster.start_controller()
    wait_for(lambda: slurm_cell.status(job_id)["state"] == "succeeded", 90,
             "the job to finish after the controller came back")
    assert calls(sbatch_log[1]) == 1          # one array for the three steps, never again
    assert not events_of(slurm_cell, job_id, "step_requeued")


def test_a_worker_killed_after_sbatch_is_recovered_from_external_backend_json(
        slurm_cell: Cell, tools: Path, tmp_path: Path,
        sbatch_log: tuple[Path, Path]) -> None:
    gate = tmp_path / "gate"
    job_id = gated_job(slurm_cell, tools, gate)
    env = {**os.environ, "JOBCELL_FAULT_INJECT": "after_spawn"}
    crashed = spawn_worker(slurm_cell.home.root, env=env)
    assert crashed.wait(timeout=60) == 70, crashed.stderr.read() if crashed.stderr else ""
    step = step_of(slurm_cell.status(job_id), "s0")
    assert step["state"] == "running" and step["backend_id"] is None   # the DB never knew
    record = read_record(slurm_cell.home.attempt_dir(job_id, "s0", 1))
    assert record is not None and record.backend == "slurm"
    gate.touch()
    run_worker(slurm_cell, timeout_s=90)
    status = slurm_cell.status(job_id)
    assert status["state"] == "succeeded", status
    assert calls(sbatch_log[1]) == 1
    assert slurm_cell.store.attempts(job_id)[-1].backend_id == record.backend_id


def test_scancel_from_outside_never_counts_as_success(
        slurm_cell: Cell, slurm_cluster: Any, tools: Path, tmp_path: Path,
        serve: Callable[[Cell], Worker]) -> None:
    job_id = gated_job(slurm_cell, tools, tmp_path / "never-opened")
    serve(slurm_cell)
    wait_for(lambda: all_started(slurm_cell, job_id), 60, "the step to run")
    backend_id = wait_for(lambda: step_of(slurm_cell.status(job_id), "s0")["backend_id"],
                          30, "the backend id")
    done = slurm_cluster.run("scancel", backend_id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: slurm_cell.status(job_id)["state"] == "failed", 60,
             "the job to fail after scancel")
    step = step_of(slurm_cell.status(job_id), "s0")
    assert step["state"] == "failed" and step["exit_code"] != 0


@pytest.mark.ssh
def test_the_login_nodes_sshd_restarting_mid_run_is_survived(
        make_cell: Callable[..., Cell], slurm_cluster: Any, sshd_server: Any, tools: Path,
        tmp_path: Path, sbatch_log: tuple[Path, Path],
        serve: Callable[[Cell], Worker]) -> None:
    cell = make_cell(executor_backend="slurm", slurm_env=dict(slurm_cluster.env),
                     slurm_sbatch=str(sbatch_log[0]), slurm_login_host=sshd_server.host,
                     slurm_login_port=sshd_server.port, slurm_login_user=sshd_server.user,
                     slurm_ssh_key=str(sshd_server.key_path),
                     slurm_ssh_options={"UserKnownHostsFile": str(sshd_server.known_hosts)},
                     slurm_tmp_io=str(tmp_path / "tmp_io"), **FAST)
    gate = tmp_path / "gate"
    job_id = gated_job(cell, tools, gate)
    serve(cell)
    wait_for(lambda: step_of(cell.status(job_id), "s0")["backend_id"], 60, "the submission")
    sshd_server.restart()
    time.sleep(2)
    assert cell.status(job_id)["state"] == "running"
    gate.touch()
    wait_for(lambda: cell.status(job_id)["state"] == "succeeded", 90,
             "the job to finish over the new connection")
    assert calls(sbatch_log[1]) == 1
    out = cell.home.attempt_dir(job_id, "s0", 1) / "output" / "result.txt"
    assert out.exists()   # fetched back from the staging area


def test_a_foreign_job_with_a_non_utf8_name_does_not_stop_the_worker(
        slurm_cell: Cell, slurm_cluster: Any, tools: Path) -> None:
    foreign = slurm_cluster.run("sbatch", "--parsable", "--job-name=" + os.fsdecode(b"caf\xe9"),
                                "--wrap", "sleep 60")
    assert foreign.returncode == 0, foreign.stderr
    try:
        register_tool(slurm_cell, tools, "w", ["write", "{output_dir}", "x.txt", "ok"])
        job_id = slurm_cell.submit({"label": "faults", "steps": [{"runner": "w"}]}).job_id
        run_worker(slurm_cell, timeout_s=60)
        assert slurm_cell.status(job_id)["state"] == "succeeded"
    finally:
        slurm_cluster.run("scancel", foreign.stdout.strip())


def test_a_cancel_while_the_controller_is_down_is_sent_when_it_is_back(
        slurm_cell: Cell, slurm_cluster: Any, tools: Path, tmp_path: Path,
        serve: Callable[[Cell], Worker]) -> None:
    job_id = gated_job(slurm_cell, tools, tmp_path / "never-opened", steps=2)
    serve(slurm_cell)
    wait_for(lambda: all_started(slurm_cell, job_id), 60, "the steps to run")
    slurm_cluster.stop_controller()
    try:
        slurm_cell.cancel(job_id)
        time.sleep(3)              # scancel cannot reach the controller meanwhile
        assert slurm_cell.status(job_id)["state"] == "running"
    finally:
        slurm_cluster.start_controller()
    # The steps would run forever: only a cancel that was kept and sent ends them.
    wait_for(lambda: slurm_cell.status(job_id)["state"] == "cancelled", 90,
             "the job to be cancelled once the controller is back")
    assert all(s["state"] == "cancelled" for s in slurm_cell.status(job_id)["steps"])


def test_slurm_steps_never_see_the_workers_jobcell_settings(
        slurm_cell: Cell, tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBCELL_ADMIN_KEY", "s3cret-admin-key")
    slurm_cell.register_runner({"name": "env", "command": "/bin/sh",
                                "args_template": ["-c", 'env > "$1/env.txt"', "sh",
                                                  "{output_dir}"]})
    job_id = slurm_cell.submit({"label": "faults", "steps": [{"id": "e",
                                                              "runner": "env"}]}).job_id
    run_worker(slurm_cell, timeout_s=60)
    assert slurm_cell.status(job_id)["state"] == "succeeded"
    seen = (slurm_cell.home.attempt_dir(job_id, "e", 1) / "output" / "env.txt").read_text()
    assert "s3cret-admin-key" not in seen
    assert f"JOBCELL_JOB_ID={job_id}" in seen      # jobcell's own step variables are there


@pytest.mark.parametrize(("default", "most_sbatch"), [("slurm", 1), ("embedded", 2)])
def test_queued_steps_go_to_slurm_in_few_arrays_whatever_the_local_cpus(
        make_cell: Callable[..., Cell], slurm_cluster: Any, tools: Path,
        sbatch_log: tuple[Path, Path], default: str, most_sbatch: int) -> None:
    # ("embedded": a cell whose runner asks for Slurm itself; its first round, before the
    # Slurm executor exists, reads only what fits the local CPU.)
    cell = make_cell(executor_backend=default, slurm_env=dict(slurm_cluster.env),
                     slurm_sbatch=str(sbatch_log[0]), cpu_slots=1, **FAST)
    register_tool(cell, tools, "w", ["write", "{output_dir}", "x.txt", "{n}"],
                  params={"n": {"type": "integer"}}, executor="slurm")
    jobs = [cell.submit({"label": "faults", "steps": [{"runner": "w", "params": {"n": i}}]})
            for i in range(24)]
    run_worker(cell, timeout_s=90)
    assert all(cell.status(j.job_id)["state"] == "succeeded" for j in jobs)
    assert all(cell.status(j.job_id)["steps"][0]["backend"] == "slurm" for j in jobs)
    # The local host's one CPU does not limit the batches.
    assert 1 <= calls(sbatch_log[1]) <= most_sbatch
