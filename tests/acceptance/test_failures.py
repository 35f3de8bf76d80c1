"""Jobs that fail, time out or are cancelled: exit codes, states, errors, processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from .helpers import (
    JOBCELL,
    Cli,
    clean_env,
    poll,
    process_alive,
    step_running,
    write_spec,
)


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(Path(f.path).name == name for f in psutil.Process(pid).open_files())
    except psutil.NoSuchProcess:
        return False


def test_failing_runner(shared_cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "fail.yaml", """\
        label: failures
        steps:
          - id: boom
            runner: failing
          - id: never
            runner: writer
    """)
    job_id = shared_cli.submit(spec)
    waited = shared_cli.run("wait", job_id, "--json")
    assert waited.returncode == 1, str(waited)
    assert waited.json["state"] == "failed"

    status = shared_cli.json("status", job_id)
    assert status["state"] == "failed"
    assert "boom" in status["error"]
    steps = {s["id"]: s for s in status["steps"]}
    assert steps["boom"]["state"] == "failed"
    assert steps["boom"]["exit_code"] == 3
    assert "disk on fire" in steps["boom"]["error"]
    assert steps["never"]["state"] == "cancelled"
    assert steps["never"]["attempt"] == 0

    # Without --json, wait prints the status for people and still exits 1.
    text = shared_cli.run("wait", job_id)
    assert text.returncode == 1, str(text)
    assert "failed" in text.stdout and "disk on fire" in text.stdout
    assert "Traceback" not in text.stderr

    logs = shared_cli.json("logs", job_id, "--step", "boom")
    assert logs["steps"][0]["stderr"] == ["disk on fire"]
    kinds = [e["kind"] for e in shared_cli.json("events", job_id)]
    assert "step_failed" in kinds and kinds[-1] == "job_failed"
    result = shared_cli.json("result", job_id)
    assert result["state"] == "failed" and result["result"] is None and result["error"]

    # submit --wait reports the failure with exit 1 as well (a failed job is not reused).
    again = shared_cli.run("submit", str(spec), "--wait", "--json")
    assert again.returncode == 1, str(again)
    assert again.json["state"] == "failed" and again.json["job_id"] != job_id


@pytest.fixture(scope="module")
def slow_job(shared_cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> str:
    spec = write_spec(tmp_path_factory.mktemp("slow"), "slow.yaml", """\
        label: slow
        steps:
          - id: nap
            runner: slow
            params: {seconds: 60}
    """)
    job_id = shared_cli.submit(spec)
    poll(lambda: step_running(shared_cli, job_id), what="the slow step to start")
    return job_id


def test_wait_timeout_exits_124(shared_cli: Cli, slow_job: str) -> None:
    result = shared_cli.run("wait", slow_job, "--timeout", "0.5", "--json")
    assert result.returncode == 124, str(result)
    assert result.json["state"] == "running"
    assert "still running" in result.stderr and "Traceback" not in result.stderr

    submitted = shared_cli.run("submit", "-", "--wait", "--timeout", "0.3",
                               stdin="label: slow\nsteps: [{id: nap, runner: slow, "
                                     "params: {seconds: 60}}]\n")
    assert submitted.returncode == 124, str(submitted)
    assert slow_job in submitted.stdout  # the identical running job was returned


def test_cancel_running_job(shared_cli: Cli, slow_job: str) -> None:
    attempt = shared_cli.home / "artifacts" / slow_job / "nap" / "attempt-1"
    child = int(poll(lambda: (attempt / "child.pid").is_file() and
                     (attempt / "child.pid").read_text().strip(), what="child.pid"))
    sleeper = int(poll(lambda: (attempt / "output" / "sleeper.pid").is_file() and
                       (attempt / "output" / "sleeper.pid").read_text().strip(),
                       what="sleeper.pid"))
    assert process_alive(child) and process_alive(sleeper)

    answer = shared_cli.json("cancel", slow_job)
    assert answer["job_id"] == slow_job
    assert answer["state"] == "cancelled"
    assert answer["cancelled"] is True

    # The runner and the grandchild it started (same process group) are gone.
    poll(lambda: not process_alive(child) and not process_alive(sleeper), timeout=10,
         what="the step's processes to end")
    status = shared_cli.json("status", slow_job)
    assert status["state"] == "cancelled"
    assert status["steps"][0]["state"] == "cancelled"
    waited = shared_cli.run("wait", slow_job, "--json")
    assert waited.returncode == 1, str(waited)
    kinds = [e["kind"] for e in shared_cli.json("events", slow_job)]
    assert "cancel_requested" in kinds and "step_cancelled" in kinds
    assert kinds[-1] == "cancelled"  # the job's own event (DESIGN.md names it `cancelled`)

    # Cancelling again is not an error; it says the job already ended.
    again = shared_cli.json("cancel", slow_job)
    assert again["cancelled"] is False and again["state"] == "cancelled"


def test_interrupted_wait_leaves_the_job_running(shared_cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate-open"
    spec = write_spec(tmp_path, "gated.yaml", f"""\
        label: detach
        steps: [{{id: held, runner: gate, params: {{gate: "{gate}"}}}}]
    """)
    job_id = shared_cli.submit(spec)
    poll(lambda: step_running(shared_cli, job_id), what="the gated step to start")
    waiting = subprocess.Popen([str(JOBCELL), "wait", job_id, "--home", str(shared_cli.home)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        # Once it has the cell's database open it is past start-up, in its polling loop.
        poll(lambda: _has_open(waiting.pid, "state.db"), what="wait to open the cell")
        waiting.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, stderr = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 130, stdout + stderr
    assert stderr.strip() == "jobcell: interrupted"
    # Only the waiting command stopped; the job goes on and can be waited for again.
    assert shared_cli.json("status", job_id)["state"] == "running"
    gate.touch()
    final = shared_cli.run("wait", job_id, "--json")
    assert final.returncode == 0, str(final)
    assert final.json["state"] == "succeeded"
