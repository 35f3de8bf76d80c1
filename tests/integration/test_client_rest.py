"""The task client's REST backend: against the real server app in process (an httpx
ASGI transport; the cell's worker daemon runs the jobs), and against a real
``jobcell serve`` on 127.0.0.1 (signed download links read for real)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from client_support import COMMON_TASKS, Events, client_scope, names, recorded_events, task_module
from integration_support import cleanup_cell, wait_for, write_settings

from jobcell.client import (
    CacheConfigurationSQLite,
    CacheMode,
    FileRef,
    FileRefError,
    LocalBackend,
    RestBackend,
    TaskFailed,
    TaskRegistrationError,
    scoped_config,
    task_client,
)
from jobcell.client import cache as client_cache
from jobcell.client.rest import AuthenticationError, RestBackendError, normalise_url
from jobcell.errors import ConfigError
from jobcell.server import create_app
from jobcell.service import Cell

JOBCELL = Path(sys.executable).parent / "jobcell"
URL = "http://jobcell.test"

TASKS = '''
"""Tasks for the REST backend tests."""
import os
import time
from typing import Any

from jobcell.client import FileRef, task
''' + COMMON_TASKS + '''


@task(version="1.0", memory_mb=64)
def write_text(text: str, context: Any) -> FileRef:
    path = context.output_dir / "out.txt"
    path.write_text(text)
    return path


@task(version="1.0", memory_mb=64)
def read_text(f: FileRef) -> str:
    return f.read_text()
'''
TASK_NAMES = ("hello", "fail", "gated", "write_text", "read_text")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module ``rest_tasks`` (in a temp folder the runners import it from)."""
    with task_module(tmp_path_factory.mktemp("rest-tasks"), "rest_tasks", TASKS) as module:
        yield module


def register_tasks(home: Path, tasks: Any) -> None:
    """Register the tasks' runners in the cell at ``home`` (what a server admin does)."""
    backend = LocalBackend(home)

    async def register() -> None:
        for name in TASK_NAMES:
            await backend.ensure_task(getattr(tasks, name).definition)
    try:
        asyncio.run(register())
    finally:
        backend.close()


@dataclass
class Served:
    """The server app over a cell, with a signed-in user's token."""

    home: Path
    app: Any
    token: str

    def backend(self, **options: Any) -> RestBackend:
        options = {"poll_interval_s": 0.02, "max_poll_interval_s": 0.1, **options}
        return RestBackend(URL, self.token, transport=httpx.ASGITransport(app=self.app),
                           **options)

    def jobs(self) -> list[dict[str, Any]]:
        with Cell(self.home, auto_worker=False) as cell:
            return cell.list(limit=1000)


@pytest.fixture
def served(tmp_path: Path, tasks: Any) -> Iterator[Served]:
    """The server app over a fresh cell with the tasks' runners and user alice. The
    ASGI transport runs no lifespan, so the worker is started here as the app's
    startup would (and submits start it again when it idled out)."""
    home = tmp_path / "cell"
    write_settings(home)
    register_tasks(home, tasks)
    app = create_app(home, start_worker=True, callbacks=False)
    cell: Cell = app.state.jobcell.cell
    token = cell.add_user("alice")["token"]
    cell.ensure_worker()
    yield Served(home, app, token)
    cleanup_cell(Cell(home, auto_worker=False))
    cell.close()


@pytest.fixture
def events() -> Iterator[Events]:
    """Every event as ``(event, task, execution id)``."""
    with recorded_events() as recorded:
        yield recorded


@pytest.fixture
def client(served: Served, events: Events, tmp_path: Path) -> Iterator[Any]:
    """A scope with a RestBackend on the in-process server and a SQLite cache."""
    with client_scope(served.backend(), tmp_path / "cache.sqlite") as config:
        yield config



# -- in process ---------------------------------------------------------------------------


def test_hello_gather_and_identity(tasks: Any, client: Any, served: Served,
                                   events: Events) -> None:
    async def main() -> tuple[str, list[str]]:
        one = await tasks.hello("world")
        many = await asyncio.gather(tasks.hello("a"), tasks.hello("b"), tasks.hello("c"))
        return one, many

    assert asyncio.run(main()) == ("Hello, world!", ["Hello, a!", "Hello, b!", "Hello, c!"])
    assert client.backend.identity == f"rest:{URL}:alice"
    jobs = served.jobs()
    assert len(jobs) == 4 and {j["owner"] for j in jobs} == {"alice"}
    assert {j["label"] for j in jobs} == {"rest_tasks"}
    assert names(events).count("backend_initialized") == 1
    # asyncio.run closed that loop's HTTP client; the next run gets a client of its own.
    assert all(state.client.is_closed for state in client.backend._loops.values())
    assert tasks.hello.run("again") == "Hello, again!"


def test_cache_hit_submits_nothing(tasks: Any, client: Any, served: Served,
                                   events: Events) -> None:
    assert tasks.hello.run("cached") == "Hello, cached!"
    assert names(events) == ["backend_initialized", "creating", "cache_miss", "submitted",
                             "cache_write", "finished", "cache_write"]
    events.clear()
    assert tasks.hello.run("cached") == "Hello, cached!"
    assert names(events) == ["creating", "cache_hit"]
    assert len(served.jobs()) == 1
    # A fresh execution is asked for: a new job, not the deduplicated one.
    with scoped_config(cache_mode=CacheMode.WRITE_ONLY):
        assert tasks.hello.run("cached") == "Hello, cached!"
    assert len(served.jobs()) == 2


def test_task_failed_carries_error_and_log_tail(tasks: Any, client: Any) -> None:
    with pytest.raises(TaskFailed) as caught:
        tasks.fail.run("broken on purpose")
    assert caught.value.state == "failed"
    assert "broken on purpose" in str(caught.value.error)
    assert any("about to fail" in line for line in caught.value.log_tail)
    assert any("ValueError: broken on purpose" in line for line in caught.value.log_tail)


def test_reattach_after_detaching(tasks: Any, client: Any, served: Served, events: Events,
                                  tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def detach() -> None:
        waiting = asyncio.ensure_future(tasks.gated(str(gate), "rest"))
        await asyncio.sleep(0.5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(detach())
    assert names(events)[-1] == "interrupt_waiting"
    [job] = served.jobs()
    assert job["state"] in ("queued", "running")      # it goes on
    events.clear()
    gate.touch()
    assert tasks.gated.run(str(gate), "rest") == "opened rest"
    assert names(events) == ["creating", "reattached", "finished", "cache_write"]
    assert [e[2] for e in events if e[0] == "reattached"] == [job["job_id"]]
    assert len(served.jobs()) == 1


def test_file_output_and_passing_it_on(tasks: Any, client: Any, served: Served) -> None:
    ref = tasks.write_text.run("from task to task")
    assert isinstance(ref, FileRef)
    assert ref.name == "out.txt" and ref.step == "task" and ref.path is None
    [job] = served.jobs()
    assert ref.execution_id == job["job_id"]
    assert ref.url is not None and ref.url.startswith(
        f"{URL}/api/v1/files/{job['job_id']}/task/out.txt?expires=")
    assert ref.digest == blake3.blake3(b"from task to task").hexdigest()
    assert ref.size == len("from task to task") and ref.expires_at
    # Passed on as input: copied into alice's uploads on the server (the in-process URL
    # cannot be downloaded from here, so this only works server-side).
    assert tasks.read_text.run(ref) == "from task to task"
    jobs = served.jobs()
    assert len(jobs) == 2
    with Cell(served.home, auto_worker=False) as cell:
        [step] = cell.status(jobs[0]["job_id"])["steps"]
    assert step["files"] == {"f/out.txt": ref.digest}


def test_new_local_file_is_uploaded(tasks: Any, client: Any, served: Served,
                                    tmp_path: Path) -> None:
    local = tmp_path / "notes.txt"
    local.write_text("written on the client " * 100_000)      # a few MiB: many chunks
    assert tasks.read_text.run(local) == local.read_text()
    assert tasks.read_text.run(FileRef.local(local)) == local.read_text()   # cache hit
    assert len(served.jobs()) == 1
    with Cell(served.home, auto_worker=False) as cell:
        [step] = cell.status(served.jobs()[0]["job_id"])["steps"]
    assert step["files"] == {"f/notes.txt": blake3.blake3(local.read_bytes()).hexdigest()}


def test_missing_file_fails_before_submission(tasks: Any, client: Any, served: Served,
                                              tmp_path: Path) -> None:
    gone = FileRef(name="gone.txt", path=str(tmp_path / "gone.txt"), digest="0" * 64)
    with pytest.raises(FileRefError, match="gone"):
        tasks.read_text.run(gone)
    assert served.jobs() == []


def test_provisioning_reaches_the_step(tasks: Any, client: Any, served: Served) -> None:
    with scoped_config(memory_mb=512, vcpu=1.5, timeout_minutes=2):
        assert tasks.hello.run("big") == "Hello, big!"
    [job] = served.jobs()
    with Cell(served.home, auto_worker=False) as cell:
        [step] = cell.status(job["job_id"])["steps"]
    assert step["memory_mb"] == 512 and step["cpu_slots"] == 2


def test_unknown_runner_and_other_version(tasks: Any, client: Any, served: Served) -> None:
    with pytest.raises(TaskRegistrationError, match="no runner named 'nowhere'") as caught:
        asyncio.run(task_client("nowhere", version="1")(x=1))
    assert "cannot register runners" in str(caught.value)
    with pytest.raises(TaskRegistrationError, match=r"in version 1\.0, but the task is "
                                                    r"version 2"):
        asyncio.run(task_client("hello", version="2")(name="x"))
    assert asyncio.run(task_client("hello", version="1.0")(name="by name")) == \
        "Hello, by name!"
    assert len(served.jobs()) == 1


def test_bad_token_and_missing_configuration(tasks: Any, served: Served, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RestBackend(URL, "jc_" + "x" * 43,
                          transport=httpx.ASGITransport(app=served.app))
    with scoped_config() as config:
        config.backend = backend
        config.cache = CacheConfigurationSQLite(file=tmp_path / "cache.sqlite")
        with pytest.raises(AuthenticationError, match="refused the token"):
            tasks.hello.run("nobody")
    client_cache.close_all()
    assert served.jobs() == []
    with pytest.raises(ConfigError, match="JOBCELL_URL"):
        RestBackend(token="t")
    with pytest.raises(ConfigError, match="JOBCELL_TOKEN"):
        RestBackend("http://example.org")
    monkeypatch.setenv("JOBCELL_URL", "HTTP://Example.ORG:80/api/v1/")
    monkeypatch.setenv("JOBCELL_TOKEN", "jc_token")
    assert RestBackend().url == "http://example.org"
    assert normalise_url("https://h.example:8443/jobcell/") == "https://h.example:8443/jobcell"
    with pytest.raises(ConfigError, match="http"):
        RestBackend("ftp://example.org", "t")


class Flaky(httpx.AsyncBaseTransport):
    """A transport over the app that fails chosen requests: ``plan`` maps
    ``(method, path prefix)`` to the failures to give, in order (an exception or an
    HTTP status), before letting requests through."""

    def __init__(self, app: Any, plan: dict[tuple[str, str], list[Any]]) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.plan = plan
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        for (method, prefix), failures in self.plan.items():
            if request.method == method and request.url.path.startswith(prefix) and failures:
                failure = failures.pop(0)
                if isinstance(failure, int):
                    return httpx.Response(failure, text="bad gateway")
                raise failure
        return await self.inner.handle_async_request(request)


def test_lost_connection_while_polling_is_retried(tasks: Any, served: Served, events: Events,
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    refused = httpx.ConnectError("connection refused")
    flaky = Flaky(served.app, {
        ("POST", "/api/v1/jobs"): [refused, refused],       # never sent: sent again
        ("GET", "/api/v1/jobs/"): [refused, 502, httpx.ReadError("reset"), 504, refused]})
    backend = RestBackend(URL, served.token, transport=flaky, poll_interval_s=0.02,
                          max_poll_interval_s=0.05)
    with scoped_config() as config, caplog.at_level(logging.WARNING, "jobcell.client"):
        config.backend = backend
        config.cache = CacheConfigurationSQLite(file=tmp_path / "cache.sqlite")
        assert tasks.hello.run("flaky") == "Hello, flaky!"
    client_cache.close_all()
    assert len(served.jobs()) == 1
    lost = [r.getMessage() for r in caplog.records if "lost the connection" in r.getMessage()]
    assert len(lost) == 2, lost       # one warning per outage: the submit's, the polls'
    assert any("reconnected" in r.getMessage() for r in caplog.records)


def test_fresh_submit_is_not_sent_again_after_a_broken_answer(tasks: Any, served: Served,
                                                               tmp_path: Path) -> None:
    flaky = Flaky(served.app, {("POST", "/api/v1/jobs"): [httpx.ReadError("reset")]})
    backend = RestBackend(URL, served.token, transport=flaky, poll_interval_s=0.02)
    with scoped_config(cache_mode=CacheMode.DISABLED) as config:
        config.backend = backend
        with pytest.raises(RestBackendError, match="not sent again"):
            tasks.hello.run("fresh")
    assert flaky.seen.count(("POST", "/api/v1/jobs")) == 1


# -- a real `jobcell serve` ----------------------------------------------------------------

TTL_S = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A ``jobcell serve`` process over a cell with the tasks' runners."""

    process: subprocess.Popen[bytes]
    home: Path
    url: str
    token: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tasks: Any) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    home = folder / "cell"
    write_settings(home, download_url_ttl_s=TTL_S)
    register_tasks(home, tasks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    added = subprocess.run([str(JOBCELL), "users", "add", "alice", "--json", "--home",
                            str(home)], capture_output=True, text=True, env=env, timeout=60)
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    out, log = folder / "serve.out", folder / "serve.err"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen([str(JOBCELL), "serve", "--port", str(free_port()),
                                    "--json", "--home", str(home)], stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr, env=env)

    def announced() -> dict[str, Any] | None:
        assert process.poll() is None, log.read_text()
        first = out.read_text().partition("\n")
        return json.loads(first[0]) if first[1] else None

    try:
        info = wait_for(announced, timeout_s=30, what="jobcell serve to listen")
        yield Server(process, home, str(info["url"]), token, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        cleanup_cell(Cell(home, auto_worker=False))


@pytest.fixture
def remote(server: Server, tmp_path: Path) -> Iterator[Any]:
    backend = RestBackend(server.url, server.token, poll_interval_s=0.05,
                          max_poll_interval_s=0.2)
    with scoped_config() as config:
        config.backend = backend
        config.cache = CacheConfigurationSQLite(file=tmp_path / "cache.sqlite")
        yield config
    backend.close()
    client_cache.close_all()


def test_served_hello_and_file_download(tasks: Any, remote: Any, server: Server,
                                        tmp_path: Path) -> None:
    assert tasks.hello.run("served") == "Hello, served!"
    ref = tasks.write_text.run("downloaded for real")
    assert ref.url is not None and ref.url.startswith(server.url + "/api/v1/files/")
    assert ref.read_bytes() == b"downloaded for real"
    assert ref.read_text() == "downloaded for real"
    with ref.open() as handle:
        assert handle.read() == b"downloaded for real"
    (tmp_path / "downloads").mkdir()
    target = ref.download(tmp_path / "downloads")       # a folder: the base name in it
    assert target == tmp_path / "downloads" / "out.txt"
    assert target.read_text() == "downloaded for real"
    named = ref.download(tmp_path / "sub" / "copy.txt")
    assert named.read_text() == "downloaded for real"
    assert tasks.read_text.run(ref) == "downloaded for real"     # passed on server-side
    local = tmp_path / "local.txt"
    local.write_text("uploaded in chunks\n" * 300_000)              # about 5 MiB
    assert tasks.read_text.run(local) == local.read_text()


def test_served_tampered_and_expired_links(tasks: Any, remote: Any, server: Server) -> None:
    ref = tasks.write_text.run("expiring")
    assert ref.url is not None and ref.expires_at is not None
    tampered = FileRef(name=ref.name, url=ref.url.replace("sig=", "sig=0"))
    with pytest.raises(FileRefError, match="await the task that produced it again"):
        tampered.read_bytes()
    time.sleep(TTL_S + 1.5)
    with pytest.raises(FileRefError, match="expired"):
        ref.read_bytes()
    # An expired link still passes the file on: the server copies it by job id.
    assert tasks.read_text.run(ref) == "expiring"
    # Awaiting again is a cache hit that hands out fresh links.
    fresh = tasks.write_text.run("expiring")
    assert fresh.execution_id == ref.execution_id
    assert fresh.url != ref.url and fresh.expires_at is not None
    assert fresh.expires_at > ref.expires_at
    assert fresh.read_bytes() == b"expiring"
    with Cell(server.home, auto_worker=False) as cell:
        assert len(cell.list(label="rest_tasks", limit=1000)) >= 2
