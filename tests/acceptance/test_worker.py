"""The worker daemon, the scheduler's view and the cell's capabilities."""

from __future__ import annotations

from pathlib import Path

import psutil

from .helpers import FAST_CONFIG, Cli, poll, process_alive, step_running, write_spec


def test_worker_start_status_stop(cli: Cli) -> None:
    idle = cli.json("worker", "status")
    assert idle["alive"] is False and idle["pid"] is None

    started = cli.json("worker", "start")
    assert started["alive"] is True
    assert started["already_running"] is False
    pid = started["pid"]
    assert isinstance(pid, int) and process_alive(pid)
    assert "jobcell.worker" in " ".join(psutil.Process(pid).cmdline())

    again = cli.json("worker", "start")
    assert again["already_running"] is True
    assert again["alive"] is True and again["pid"] == pid
    assert set(again) == set(started)  # both answers have the same shape ...
    assert type(again["started_at"]) is type(started["started_at"])  # ... and types
    assert "already running" in cli.ok("worker", "start").stdout

    status = cli.json("worker", "status")
    assert {"pid", "alive", "heartbeat_age_s"} <= set(status)
    assert status["pid"] == pid and status["alive"] is True
    assert 0 <= status["heartbeat_age_s"] < 15

    stopped = cli.json("worker", "stop")
    assert stopped == {"stopped": True, "pid": pid}
    assert not process_alive(pid)
    after = cli.json("worker", "status")
    assert after["alive"] is False and after["pid"] is None
    nothing = cli.ok("worker", "stop")
    assert "no worker is running" in nothing.stdout


def test_scheduler_status_shows_leases_and_queue(cli: Cli, tmp_path: Path) -> None:
    # One CPU slot, so a second job waits in the queue behind the running slow step.
    (cli.home / "jobcell.toml").write_text(FAST_CONFIG + "cpu_slots = 1\n")
    idle = cli.json("scheduler", "status")
    assert set(idle) >= {"capacity", "used", "free", "leases", "queue", "worker"}
    assert idle["capacity"]["cpu_slots"] == 1
    assert idle["used"] == {"cpu_slots": 0, "memory_mb": 0, "gpus": []}
    assert idle["cooldowns"] == [] and idle["queue"]["waiting_cache"] == 0
    assert idle["free"] == idle["capacity"]
    assert idle["leases"] == [] and idle["queue"]["depth"] == 0
    assert idle["worker"]["alive"] is False

    slow = write_spec(tmp_path, "slow.yaml", """\
        label: sched
        steps: [{id: nap, runner: slow, params: {seconds: 30}}]
    """)
    job_id = cli.submit(slow)
    poll(lambda: step_running(cli, job_id), what="the slow step to start")
    waiting = write_spec(tmp_path, "waiting.yaml", """\
        label: sched
        steps: [{id: later, runner: writer}]
    """)
    queued_id = cli.submit(waiting)

    state = cli.json("scheduler", "status")
    [lease] = state["leases"]
    assert lease["job_id"] == job_id and lease["step"] == "nap" and lease["runner"] == "slow"
    assert lease["cpu_slots"] == 1 and lease["memory_mb"] == 64 and lease["attempt"] == 1
    assert state["used"] == {"cpu_slots": 1, "memory_mb": 64, "gpus": []}
    assert lease["gpus"] == [] and lease["owner"]
    assert state["free"]["cpu_slots"] == 0
    assert state["free"]["memory_mb"] == state["capacity"]["memory_mb"] - 64
    assert state["queue"]["depth"] == 1
    assert state["queue"]["by_runner"] == {"writer": 1}
    assert state["worker"]["alive"] is True
    assert cli.json("status", queued_id)["state"] == "queued"
    text = cli.ok("scheduler", "status").stdout
    assert "capacity" in text and job_id in text and "queue depth: 1" in text

    assert cli.json("cancel", job_id)["cancelled"] is True
    assert cli.run("wait", queued_id, "--json").json["state"] == "succeeded"
    assert cli.json("scheduler", "status")["leases"] == []


def test_capabilities(cli: Cli) -> None:
    caps = cli.json("capabilities")
    assert caps["executor_backend"] == "embedded"
    assert isinstance(caps["cpu_slots"], int) and caps["cpu_slots"] >= 1
    assert isinstance(caps["memory_mb"], int) and caps["memory_mb"] > 0
    assert caps["cpu_source"] and caps["memory_source"]
    assert caps["home"] == str(cli.home)
    assert caps["jobcell_version"]
    assert "embedded" in cli.ok("capabilities").stdout
