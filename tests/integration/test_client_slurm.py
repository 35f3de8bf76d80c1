"""The task client's Slurm backend end to end: a cell whose worker submits each task to
the session's real Slurm cluster through the loopback sshd (asyncssh), staging through
``slurm_tmp_io``. The compute nodes are this machine, so the tasks module written to a
temp folder imports there too, with this venv's interpreter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import client_scope, names, recorded_events, task_module
from integration_support import cleanup_cell

from jobcell.client import (
    FileRef,
    TaskFailed,
    scoped_config,
)
from jobcell.config import SlurmBackend
from jobcell.executors.slurm import MARKER_FILE
from jobcell.service import Cell

slurm = pytest.mark.slurm
DELEGATED = {"backend_poll_interval_s": 0.2, "backend_poll_max_interval_s": 1.0,
             "backend_exit_code_grace_s": 3.0}
COMMENT = "jobcell-client-slurm-test"
PREPARATION = "export JC_CLIENT_PREP=prepared"

TASKS = '''
"""Tasks for the Slurm task client tests."""
import os
from pathlib import Path

from jobcell.client import task


@task(version="1.0", memory_mb=64)
def hello(name: str) -> str:
    return f"Hello, {name}!"


@task(version="1.0", memory_mb=64)
def where(tag: str) -> dict:
    """What the job sees of Slurm and of the preparation script."""
    return {"tag": tag, "job": os.environ.get("SLURM_JOB_ID"),
            "cpus": os.environ.get("SLURM_CPUS_PER_TASK"),
            "mem": os.environ.get("SLURM_MEM_PER_NODE"),
            "prep": os.environ.get("JC_CLIENT_PREP")}


@task(version="1.0", memory_mb=64)
def report(text: str, context) -> Path:
    path = Path(context.output_dir) / "report.txt"
    path.write_text(text)
    return path


@task(version="1.0", memory_mb=64)
def shout(data: Path) -> str:
    return data.read_text().upper()


@task(version="1.0", memory_mb=64)
def fail(message: str) -> str:
    print("about to fail", flush=True)
    raise ValueError(message)
'''


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module ``client_slurm_tasks`` (in a temp folder the runners import it from)."""
    with task_module(tmp_path_factory.mktemp("slurm-tasks"), "client_slurm_tasks",
                     TASKS) as module:
        yield module


def make_backend(tmp_path: Path, cluster: Any, sshd: Any, **kwargs: Any) -> SlurmBackend:
    """A SlurmBackend on the session cluster through the loopback sshd, configured the way
    a user would: ssh(1)-style arguments in ``ssh_extra``."""
    kwargs.setdefault("debug_slurm_script", True)
    return SlurmBackend(
        sshd.host, str(tmp_path / "tmp_io"), login_user=sshd.user,
        ssh_extra=["-o", f"UserKnownHostsFile={sshd.known_hosts}", "-i", str(sshd.key_path),
                   "-p", str(sshd.port)],
        sbatch_extra=[f"--comment={COMMENT}"], preparation_script_before=[PREPARATION],
        home=tmp_path / "cell", settings={"slurm_env": dict(cluster.env), **DELEGATED},
        poll_interval_s=0.1, max_poll_interval_s=0.5, **kwargs)


@pytest.fixture
def backend(tmp_path: Path, slurm_cluster: Any, sshd_server: Any) -> Iterator[SlurmBackend]:
    made = make_backend(tmp_path, slurm_cluster, sshd_server)
    yield made
    made.close()
    if (tmp_path / "cell" / "state.db").exists():
        cleanup_cell(Cell(tmp_path / "cell", auto_worker=False))


@pytest.fixture
def client(backend: SlurmBackend, tmp_path: Path) -> Iterator[Any]:
    """A scope with the SlurmBackend and a SQLite cache in ``tmp_path``; ``client.events``
    records every event as ``(event, task, execution id)``."""
    with recorded_events() as events, \
            client_scope(backend, tmp_path / "cache.sqlite") as config:
        config.events = events
        yield config


def task_step(backend: SlurmBackend, execution_id: str) -> dict[str, Any]:
    status = backend.cell.status(execution_id)
    assert status["state"] == "succeeded", status
    (step,) = status["steps"]
    return step


def scontrol(cluster: Any, backend_id: str) -> str:
    answer = cluster.run("scontrol", "show", "job", backend_id)
    assert answer.returncode == 0, answer.stderr
    return answer.stdout



@slurm
def test_hello_and_gather_run_through_slurm(tasks: Any, client: Any,
                                            backend: SlurmBackend) -> None:
    async def main() -> tuple[str, list[str], dict[str, Any]]:
        one = await tasks.hello("world")
        many = await asyncio.gather(tasks.hello("a"), tasks.hello("b"), tasks.hello("c"))
        return one, list(many), await tasks.where("plain")

    one, many, seen = asyncio.run(main())
    assert one == "Hello, world!"
    assert many == ["Hello, a!", "Hello, b!", "Hello, c!"]
    assert seen["job"] and seen["prep"] == "prepared"   # ran as a Slurm job, prepared
    executions = [e[2] for e in client.events if e[0] == "submitted"]
    assert len(executions) == 5
    for execution_id in executions:
        step = task_step(backend, execution_id)
        assert step["backend"] == "slurm" and step["backend_id"], step
    jobs = backend.cell.list(limit=100)
    assert {j["label"] for j in jobs} == {"client_slurm_tasks"} and len(jobs) == 5
    # Staged to slurm_tmp_io and fetched back; the batch script had the site's lines.
    step = task_step(backend, executions[0])
    attempt = backend.cell.home.attempt_dir(executions[0], step["id"], step["attempt"])
    marker = json.loads((attempt / MARKER_FILE).read_text())
    assert marker["backend_dir"].startswith(backend.slurm_tmp_io + "/"), marker
    log = (backend.cell.home.worker_log).read_text()
    assert "batch script" in log and PREPARATION in log   # debug_slurm_script
    assert backend.cell.settings.executor_backend == "slurm"
    assert backend.cell.worker_status()["alive"]


@slurm
def test_a_cache_hit_submits_nothing(tasks: Any, client: Any, backend: SlurmBackend) -> None:
    assert tasks.hello.run("cached") == "Hello, cached!"
    assert "submitted" in names(client.events)
    client.events.clear()
    with scoped_config(vcpu=2):     # provisioning is not part of the cache key
        assert tasks.hello.run("cached") == "Hello, cached!"
    assert names(client.events) == ["creating", "cache_hit"]
    assert len(backend.cell.list(limit=100)) == 1


@slurm
def test_provisioning_reaches_sbatch(tasks: Any, client: Any, backend: SlurmBackend,
                                     slurm_cluster: Any) -> None:
    with scoped_config(memory_mb=300, vcpu=2, timeout_minutes=7):
        seen = tasks.where.run("big")
    assert (seen["cpus"], seen["mem"]) == ("2", "300")     # what the job got from Slurm
    (execution_id,) = [e[2] for e in client.events if e[0] == "submitted"]
    step = task_step(backend, execution_id)
    assert (step["cpu_slots"], step["memory_mb"]) == (2, 300)
    shown = scontrol(slurm_cluster, step["backend_id"])
    assert "NumCPUs=2" in shown and "MinMemoryNode=300M" in shown, shown
    assert "TimeLimit=00:07:00" in shown and f"Comment={COMMENT}" in shown, shown
    # Without a scope: the task's own resources (64 MB, one CPU).
    client.events.clear()
    assert tasks.where.run("small")["mem"] == "64"


@slurm
def test_files_come_back_and_local_files_go_out(tasks: Any, client: Any,
                                                backend: SlurmBackend, tmp_path: Path) -> None:
    ref = tasks.report.run("from the compute node")
    assert isinstance(ref, FileRef) and ref.name == "report.txt"
    assert ref.read_text() == "from the compute node"
    assert ref.path is not None and Path(ref.path).is_relative_to(backend.home)
    assert not Path(ref.path).is_relative_to(tmp_path / "tmp_io")   # fetched back
    assert ref.size == len("from the compute node") and ref.digest
    # A local file as input is staged into the job; a returned FileRef too.
    local = tmp_path / "note.txt"
    local.write_text("quiet words")
    assert tasks.shout.run(local) == "QUIET WORDS"
    assert tasks.shout.run(ref) == "FROM THE COMPUTE NODE"


@slurm
def test_a_failed_task_brings_its_log_tail_back(tasks: Any, client: Any) -> None:
    with pytest.raises(TaskFailed) as caught:
        tasks.fail.run("broken on Slurm")
    assert caught.value.state == "failed"
    assert "broken on Slurm" in str(caught.value.error)
    assert any("about to fail" in line for line in caught.value.log_tail)


@slurm
def test_changed_options_restart_the_worker(tasks: Any, client: Any, backend: SlurmBackend,
                                            tmp_path: Path, slurm_cluster: Any,
                                            sshd_server: Any) -> None:
    assert tasks.hello.run("first") == "Hello, first!"
    before = backend.cell.worker_status()
    assert before["alive"]
    backend.close()
    changed = make_backend(tmp_path, slurm_cluster, sshd_server, debug_slurm_script=False)
    try:
        assert changed.cell.worker_status()["alive"] is False   # stopped: old options
        assert changed.identity == backend.identity              # same cache entries
        client.backend = changed
        client.events.clear()
        assert tasks.hello.run("first") == "Hello, first!"      # cache hit, same cell
        assert names(client.events) == ["creating", "cache_hit"]
        assert tasks.hello.run("second") == "Hello, second!"
        after = changed.cell.worker_status()
        assert after["alive"] and after["pid"] != before["pid"]
        assert changed.cell.settings.debug_slurm_script is False
    finally:
        changed.close()
