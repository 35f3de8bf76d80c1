"""One behaviour suite, four executors: every step outcome means the same everywhere.

Runs through the real worker against ``embedded`` (local processes), ``slurm`` (the
test cluster's commands run locally), ``slurm-ssh`` (the same commands through a real
sshd on 127.0.0.1, inputs staged to ``slurm_tmp_io``) and ``external`` (the admin
wrapper scripts in ``wrappers/``, which call the real Slurm commands).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration_support import events_of, register_tool, run_worker, step_of, wait_for

from jobcell.service import Cell
from jobcell.worker import Worker

WRAPPERS = Path(__file__).parent / "wrappers"
BACKENDS = ["embedded", "slurm", "slurm-ssh", "external"]
DELEGATED = {"backend_poll_interval_s": 0.2, "backend_poll_max_interval_s": 1.0,
             "backend_exit_code_grace_s": 3.0}


@dataclass
class Backend:
    name: str
    cell: Cell

    @property
    def delegated(self) -> bool:
        return self.name != "embedded"


def backend_settings(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The cell options that put a cell on backend ``name``."""
    if name == "embedded":
        return {}
    cluster = request.getfixturevalue("slurm_cluster")
    if name == "slurm":
        return {"executor_backend": "slurm", "slurm_env": dict(cluster.env), **DELEGATED}
    if name == "slurm-ssh":
        sshd = request.getfixturevalue("sshd_server")
        return {"executor_backend": "slurm", "slurm_env": dict(cluster.env),
                "slurm_login_host": sshd.host, "slurm_login_port": sshd.port,
                "slurm_login_user": sshd.user, "slurm_ssh_key": str(sshd.key_path),
                "slurm_ssh_options": {"UserKnownHostsFile": str(sshd.known_hosts)},
                "slurm_tmp_io": str(tmp_path / "tmp_io"), **DELEGATED}
    # The wrappers call the Slurm commands themselves: they find the cluster this way.
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return {"executor_backend": "external",
            "external_submit_cmd": [str(WRAPPERS / "slurm_submit.sh")],
            "external_status_cmd": [str(WRAPPERS / "slurm_status.sh")],
            "external_cancel_cmd": [str(WRAPPERS / "slurm_cancel.sh")],
            "backend_capabilities_cmd": [str(WRAPPERS / "slurm_capabilities.sh")],
            **DELEGATED}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, make_cell: Callable[..., Cell], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Backend:
    settings = backend_settings(request.param, request, tmp_path, monkeypatch)
    return Backend(request.param, make_cell(**settings))


@pytest.fixture
def tool(backend: Backend, tools: Path) -> Callable[..., None]:
    def register(name: str, args: list[str], **fields: Any) -> None:
        register_tool(backend.cell, tools, name, args, **fields)
    return register


def submit(cell: Cell, steps: list[dict[str, Any]], **spec: Any) -> str:
    return cell.submit({"label": "contract", "steps": steps, **spec}).job_id


def finish(cell: Cell, job_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    run_worker(cell, timeout_s=timeout_s)
    return cell.status(job_id)


@pytest.fixture
def background_worker(backend: Backend) -> Iterator[Worker]:
    """A worker serving the cell in a thread (stopped at the end)."""
    worker = Worker(backend.cell.home, backend.cell.settings, backend.cell.store)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield worker
    worker.request_stop()
    thread.join(timeout=30)


def test_a_step_succeeds_with_its_outputs_and_logs(backend: Backend,
                                                   tool: Callable[..., None]) -> None:
    tool("write", ["write", "{output_dir}", "result.txt", "{text}"],
         params={"text": {"type": "string"}}, outputs=["result.txt"])
    job_id = submit(backend.cell, [{"id": "w", "runner": "write",
                                    "params": {"text": "hello from the backend"}}])
    status = finish(backend.cell, job_id)
    assert status["state"] == "succeeded", status
    step = step_of(status, "w")
    assert step["exit_code"] == 0
    assert step["backend"] == backend.name.removesuffix("-ssh")
    assert step["backend_id"]
    [output] = backend.cell.outputs(job_id)
    assert output["name"] == "result.txt"
    assert Path(output["path"]).read_text() == "hello from the backend"
    if backend.delegated:
        [submitted] = events_of(backend.cell, job_id, "step_submitted")
        assert submitted["backend_id"] == step["backend_id"]


def test_hostile_params_reach_the_runner_byte_exact(backend: Backend,
                                                    tool: Callable[..., None]) -> None:
    hostile = "it's \"quoted\" $(touch /tmp/pwned) `id` ; a\nb\\c  $HOME"
    tool("write", ["write", "{output_dir}", "value.txt", "{text}"],
         params={"text": {"type": "string"}})
    job_id = submit(backend.cell, [{"id": "w", "runner": "write",
                                    "params": {"text": hostile}}])
    status = finish(backend.cell, job_id)
    assert status["state"] == "succeeded", status
    out = backend.cell.home.attempt_dir(job_id, "w", 1) / "output" / "value.txt"
    assert out.read_text() == hostile


def test_a_pipeline_stages_upstream_outputs(backend: Backend,
                                            tool: Callable[..., None]) -> None:
    tool("stamp", ["stamp", "{output_dir}", "{name}", "0"],
         params={"name": {"type": "string"}})
    tool("join", ["join", "{input_dir}", "{output_dir}"])
    job_id = backend.cell.submit({"label": "contract", "pipeline": [
        {"id": "a", "runner": "stamp", "params": {"name": "a"}},
        {"id": "b", "runner": "stamp", "params": {"name": "b"}},
        {"id": "j", "runner": "join", "inputs": ["a", "b"]}]}).job_id
    status = finish(backend.cell, job_id)
    assert status["state"] == "succeeded", status
    listing = json.loads((backend.cell.home.attempt_dir(job_id, "j", 1) / "output"
                          / "listing.json").read_text())
    assert listing["files"] == ["a/a.json", "a/a.txt", "b/b.json", "b/b.txt"]


def test_python_callable_runners_pass_values_downstream(backend: Backend) -> None:
    here = [str(Path(__file__).parent)]
    backend.cell.register_runner({"name": "add", "python": "pyrunners_demo:add",
                                  "python_path": here, "params": {"a": {"type": "integer"},
                                                                  "b": {"type": "integer"}}})
    backend.cell.register_runner({"name": "double", "python": "pyrunners_demo:double_upstream",
                                  "python_path": here, "outputs": ["doubled.txt"]})
    backend.cell.register_runner({"name": "where", "python": "pyrunners_demo:where_inputs_are",
                                  "python_path": here})
    job_id = backend.cell.submit({"label": "contract", "pipeline": [
        {"id": "add", "runner": "add", "params": {"a": 2, "b": 3}},
        {"id": "double", "runner": "double", "inputs": ["add"]},
        {"id": "where", "runner": "where", "inputs": ["add"]}]}).job_id
    status = finish(backend.cell, job_id)
    assert status["state"] == "succeeded", status
    steps = backend.cell.result(job_id)["steps"]
    assert steps["double"] == {"doubled": 10, "staged": ["output.json"]}
    # The manifest points into the attempt as the backend sees it (staged or not).
    assert steps["where"] == {"add": {"inside": True, "files": ["output.json"]}}


def test_a_nonzero_exit_fails_the_step_with_its_code_and_retries(
        backend: Backend, tool: Callable[..., None]) -> None:
    tool("exit3", ["exit", "3"], retries=1)
    job_id = submit(backend.cell, [{"id": "x", "runner": "exit3"}])
    status = finish(backend.cell, job_id)
    assert status["state"] == "failed"
    step = step_of(status, "x")
    assert (step["state"], step["exit_code"], step["attempt"]) == ("failed", 3, 2)
    assert "exit code 3" in step["error"]


def test_exit_137_is_oom_like_and_cools_the_group_down(backend: Backend,
                                                       tool: Callable[..., None]) -> None:
    tool("oom", ["exit", "137"])
    job_id = submit(backend.cell, [{"id": "o", "runner": "oom"}])
    status = finish(backend.cell, job_id)
    assert step_of(status, "o")["exit_code"] == 137
    [cooldown] = events_of(backend.cell, job_id, "oom_cooldown")
    assert cooldown["group"] == "oom"


def test_cancelling_a_running_job_stops_its_step(backend: Backend, tool: Callable[..., None],
                                                 tmp_path: Path,
                                                 background_worker: Worker) -> None:
    gate = tmp_path / "never-opened"
    tool("held", ["gate-write", str(gate), "{output_dir}"])
    job_id = submit(backend.cell, [{"id": "h", "runner": "held"}])
    started = backend.cell.home.attempt_dir(job_id, "h", 1) / "child.pid"
    if backend.name == "slurm-ssh":
        wait_for(lambda: step_of(backend.cell.status(job_id), "h")["backend_id"],
                 60, "the step to be submitted")
    else:
        wait_for(started.exists, 60, "the step to start")
    backend.cell.cancel(job_id)
    wait_for(lambda: backend.cell.status(job_id)["state"] == "cancelled", 60,
             "the job to be cancelled")
    assert step_of(backend.cell.status(job_id), "h")["state"] == "cancelled"


def test_the_cell_reports_its_backend(backend: Backend) -> None:
    caps = backend.cell.capabilities()
    assert caps["executor_backend"] == backend.name.removesuffix("-ssh")
    if backend.delegated:
        assert caps["backend"]["usable"] is True, caps["backend"]
        assert caps["backend"]["gpus"] is not None

