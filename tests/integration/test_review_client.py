"""Review regressions for the task client (FileRef, cache modes, interrupts, REST).

Each test reproduces one bug found in review (and failed before its fix).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_support import Events, client_scope, names, recorded_events, task_module
from integration_support import cleanup_cell, wait_for, write_settings

from jobcell.client import (
    CacheConfigurationSQLite,
    CacheMode,
    FileRef,
    LocalBackend,
    RestBackend,
    TaskFailed,
    scoped_config,
    task_client,
)
from jobcell.client import cache as client_cache
from jobcell.errors import JobcellError
from jobcell.server import create_app
from jobcell.service import Cell

TASKS = '''
"""Tasks for the review reproducers."""
import os
import time
from pathlib import Path
from typing import Any

from jobcell.client import FileRef, task


@task(version="1.0", memory_mb=64)
def read_text(source: FileRef) -> str:
    return source.read_text()


@task(version="1.0", memory_mb=64)
def maybe_read(source: Path | None = None) -> str:
    return "no file" if source is None else source.read_text()


@task(version="1.0", memory_mb=64)
def echo_file(source: Path) -> Path:
    return source


@task(version="1.0", memory_mb=64)
def write_text(text: str, context: Any) -> FileRef:
    path = context.output_dir / "out.txt"
    path.write_text(text)
    return path


@task(version="1.0", memory_mb=64)
def gated(gate: str, tag: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.02)
    return f"opened {tag}"


@task(version="1.0", memory_mb=64)
def fail_once(gate: str, marker: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.02)
    if not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise ValueError("the first execution fails")
    return "second execution"
'''
TASK_NAMES = ("read_text", "maybe_read", "echo_file", "write_text", "gated", "fail_once")
SECRET = "server-side secret, not anybody's upload"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with task_module(tmp_path_factory.mktemp("review-tasks"), "review_tasks",
                     TASKS) as module:
        yield module


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "cell"
    write_settings(root)
    yield root
    cleanup_cell(Cell(root, auto_worker=False))


@pytest.fixture
def events() -> Iterator[Events]:
    with recorded_events() as recorded:
        yield recorded


@pytest.fixture
def client(home: Path, tmp_path: Path, events: Events) -> Iterator[Any]:
    backend = LocalBackend(home, poll_interval_s=0.02, max_poll_interval_s=0.1)
    with client_scope(backend, tmp_path / "cache.sqlite") as config:
        yield config


def jobs(home: Path) -> list[dict[str, Any]]:
    with Cell(home, auto_worker=False) as cell:
        return cell.list(limit=1000)


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    return secret


# -- security: a file param's value is a path the runner opens unchecked ------------------


@pytest.mark.parametrize("form", ["absolute", "dotdot"])
def test_file_param_value_cannot_name_a_file_outside_the_input_folder(
        tasks: Any, client: Any, tmp_path: Path, form: str) -> None:
    """pyrunner._call / fileref.staged_value: ``input_dir / value`` with a value from the
    params; an absolute value (or one with '..') names any file the worker can read."""
    legit = tmp_path / "legit.txt"
    legit.write_text("legit")
    assert tasks.read_text.run(legit) == "legit"          # registers the runner
    secret = _secret(tmp_path)
    value = str(secret) if form == "absolute" else "../" * 40 + str(secret).lstrip("/")
    reader = task_client("read_text", version="1.0")       # params sent as they are
    try:
        got = asyncio.run(reader(source=value))
    except (TaskFailed, JobcellError):
        got = None
    assert got != SECRET


# -- FileRef staging: params typed 'Path | None' ------------------------------------------


def test_optional_file_param_is_staged_and_arrives_as_a_path(tasks: Any, client: Any,
                                                             tmp_path: Path) -> None:
    """task.DecoratedTask._file_params / pyrunner._call only know ``FileRef``, ``Path``
    and ``list[...]`` of them: a ``Path | None`` param is staged (the client sends
    'source/x.txt') but the runner passes that string, not the staged file."""
    local = tmp_path / "x.txt"
    local.write_text("optional file")
    assert tasks.maybe_read.run() == "no file"
    assert tasks.maybe_read.run(local) == "optional file"


# -- a returned file named output.json ----------------------------------------------------


def test_returned_file_named_output_json_keeps_its_content(tasks: Any, client: Any,
                                                           tmp_path: Path) -> None:
    """fileref.encode_returned copies a file from outside the output folder to
    ``output/<base name>``; for 'output.json' pyrunner.main then overwrites it with the
    step's JSON value, so the FileRef's content is the marker, not the file."""
    data = tmp_path / "output.json"
    data.write_text('{"measurements": [1, 2, 3]}')
    ref = tasks.echo_file.run(data)
    assert isinstance(ref, FileRef)
    assert ref.read_text() == '{"measurements": [1, 2, 3]}'


# -- cache modes: RESTART_FAILED and a pending entry that has failed since ----------------


def _wait_for_event(events: Events, name: str, timeout_s: float = 60.0) -> Any:
    async def waiting() -> None:
        deadline = time.monotonic() + timeout_s
        while name not in names(events):
            assert time.monotonic() < deadline, names(events)
            await asyncio.sleep(0.02)
    return waiting()


def test_restart_failed_restarts_a_pending_entry_that_failed_meanwhile(
        tasks: Any, client: Any, home: Path, tmp_path: Path, events: Events) -> None:
    """client.task.execute decides on the cached state ('pending') although it has just
    asked the backend for the current one ('failed'): RESTART_FAILED re-attaches to the
    failed execution and raises, instead of ignoring it and submitting anew."""
    gate, marker = tmp_path / "gate", tmp_path / "marker"

    async def detach() -> None:
        waiting = asyncio.ensure_future(tasks.fail_once(str(gate), str(marker)))
        await _wait_for_event(events, "cache_write")      # the pending entry is written
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    with scoped_config(cache_mode=CacheMode.RESTART_FAILED):
        asyncio.run(detach())
        gate.touch()
        [job] = jobs(home)
        with Cell(home, auto_worker=False) as cell:
            wait_for(lambda: cell.status(job["job_id"])["state"] == "failed",
                     timeout_s=60, what="the detached execution to fail")
        # Re-run: the execution behind the entry failed; RESTART_FAILED ignores it.
        assert tasks.fail_once.run(str(gate), str(marker)) == "second execution"
    assert len(jobs(home)) == 2


# -- Ctrl-C (cancellation) while the submit is in flight ----------------------------------


def _slow_submit(backend: LocalBackend, entered: threading.Event) -> None:
    cell = backend.cell
    real = cell.submit

    def submit(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        time.sleep(0.8)           # the job is created after the caller gave up waiting
        return real(*args, **kwargs)
    cell.submit = submit          # type: ignore[method-assign]


async def _cancel_once_submitting(awaitable: Any, entered: threading.Event) -> None:
    waiting = asyncio.ensure_future(awaitable)
    while not entered.is_set():
        await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # asyncio.run then waits for the default executor: the submit thread has finished.


def test_interrupt_during_submit_with_cancel_on_interrupt_cancels_the_execution(
        tasks: Any, client: Any, home: Path, tmp_path: Path, events: Events) -> None:
    """client.task.execute: a cancellation while ``backend.submit`` runs (LocalBackend: a
    worker thread that goes on) skips _observe's handler: no interrupt_waiting, and with
    cancel_on_interrupt=True the execution that does get created is never cancelled."""
    entered = threading.Event()
    _slow_submit(client.backend, entered)
    client.cancel_on_interrupt = True

    async def ctrl_c_once_submitting() -> None:
        waiting = asyncio.ensure_future(tasks.gated(str(tmp_path / "gate"), "x"))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        signal.raise_signal(signal.SIGINT)   # asyncio.run's handler cancels main()
        await waiting

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(ctrl_c_once_submitting())
    [job] = jobs(home)
    assert "interrupt_waiting" in names(events)
    with Cell(home, auto_worker=False) as cell:
        wait_for(lambda: cell.status(job["job_id"])["state"] == "cancelled", timeout_s=10,
                 what="the execution to be cancelled")


def test_interrupt_during_submit_then_rerun_reattaches(
        tasks: Any, client: Any, home: Path, tmp_path: Path, events: Events) -> None:
    """Same hole, detaching: no cache entry is written for the execution created after
    the cancellation, so a re-run in REATTACH_ONLY (a fresh submit, no server dedup)
    submits a second execution instead of re-attaching."""
    gate = tmp_path / "gate"
    entered = threading.Event()
    _slow_submit(client.backend, entered)
    client.cancel_on_interrupt = False
    with scoped_config(cache_mode=CacheMode.REATTACH_ONLY):
        asyncio.run(_cancel_once_submitting(tasks.gated(str(gate), "y"), entered))
        assert len(jobs(home)) == 1
        gate.touch()
        events.clear()
        assert tasks.gated.run(str(gate), "y") == "opened y"
    assert "reattached" in names(events)
    assert len(jobs(home)) == 1


# -- cancellations that are not Ctrl-C ----------------------------------------------------


class _Tty:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def test_a_timeout_is_not_an_interrupt(tasks: Any, client: Any, home: Path, tmp_path: Path,
                                       events: Events,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """client.task._observe treats every CancelledError as Ctrl-C: an
    ``asyncio.wait_for`` timeout (or a TaskGroup sibling's failure) in a terminal
    blocks the event loop on input() with 'Interrupted while awaiting ...'."""
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(sys, "stdin", _Tty(sys.stdin))
    monkeypatch.setattr(sys, "stdout", _Tty(sys.stdout))
    monkeypatch.setattr(builtins, "input", fake_input)

    async def main() -> None:
        waiting = asyncio.ensure_future(tasks.gated(str(tmp_path / "gate"), "t"))
        await _wait_for_event(events, "cache_write")      # submitted: now it is awaited
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(waiting, timeout=0.5)

    asyncio.run(main())
    assert "submitted" in names(events)
    assert asked == []
    [job] = jobs(home)
    with Cell(home, auto_worker=False) as cell:
        assert cell.status(job["job_id"])["state"] in ("queued", "running")


# -- staged names the spec refuses / that cannot be encoded -------------------------------


def test_local_file_with_a_backslash_in_its_name_can_be_passed(tasks: Any, client: Any,
                                                               tmp_path: Path) -> None:
    """client.task.extract_files stages a file as '<param>/<base name>'; a legal Linux
    base name with a backslash is refused by the spec validator (a SpecError about
    'steps.0.files' the user never wrote)."""
    odd = tmp_path / "run\\01.txt"
    odd.write_text("backslash")
    assert tasks.read_text.run(odd) == "backslash"


def test_local_file_with_a_non_utf8_name_can_be_passed(tasks: Any, client: Any,
                                                       tmp_path: Path) -> None:
    """A non-UTF-8 base name (surrogate-escaped by Python) reaches the cache key's
    canonical JSON: a bare UnicodeEncodeError traceback."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name")
    assert tasks.read_text.run(Path(os.fsdecode(raw))) == "latin-1 name"


# -- provisioning the spec refuses --------------------------------------------------------


@pytest.mark.parametrize("shortcut", [{"timeout": 0}, {"timeout": timedelta(seconds=-5)},
                                      {"timeout_minutes": 0}])
def test_scoped_config_refuses_timeouts_the_step_spec_refuses(
        shortcut: dict[str, Any]) -> None:
    """client.config._apply: a zero or negative timedelta timeout is accepted, and only
    the submit fails, with a job-spec validation message about 'resources.timeout_s'."""
    with pytest.raises(ValueError, match="timeout"), scoped_config(**shortcut):
        pass


@pytest.mark.parametrize("shortcut", [{"timeout": 0}, {"timeout_hours": 10_000}])
def test_provisioning_the_spec_refuses_is_reported_as_provisioning(
        tasks: Any, client: Any, shortcut: dict[str, Any]) -> None:
    """What the user sees today when the step spec refuses the provisioning: "job spec:
    field 'steps.0.resources.timeout_s': Input should be greater than 0" (a spec the
    user never wrote)."""
    try:
        with scoped_config(**shortcut):
            tasks.gated.run("/nonexistent-gate", "never")
    except Exception as exc:
        message = str(exc)
    else:
        message = ""
    assert "scoped_config" in message or "provisioning" in message, message


# -- LocalBackend: an output of another cell whose path shares the prefix -----------------


def test_file_ref_of_a_sibling_cell_is_uploaded_not_looked_up(
        tasks: Any, client: Any, home: Path, tmp_path: Path) -> None:
    """LocalBackend.stage_files: ``ref.path.startswith(root)`` with no separator takes a
    file of the cell at '<root>-other' for one of this cell's outputs and asks
    upload_output for a job this cell does not have (NotFoundError)."""
    other = Path(str(home) + "-other") / "artifacts" / "job" / "task" / "out.txt"
    other.parent.mkdir(parents=True)
    other.write_text("from the other cell")
    import blake3

    ref = FileRef(name="out.txt", path=str(other), execution_id="1a1fd9ffeed-0123456789ab",
                  step="task", digest=blake3.blake3(b"from the other cell").hexdigest(),
                  size=other.stat().st_size)
    assert tasks.read_text.run(ref) == "from the other cell"


# -- REST: the same path escape across owners ---------------------------------------------

URL = "http://jobcell.test"


@dataclass
class Served:
    home: Path
    app: Any
    cell: Cell

    def backend(self, token: str) -> RestBackend:
        return RestBackend(URL, token, transport=httpx.ASGITransport(app=self.app),
                           poll_interval_s=0.02, max_poll_interval_s=0.1)


@pytest.fixture
def served(tmp_path: Path, tasks: Any) -> Iterator[Served]:
    root = tmp_path / "served"
    write_settings(root)
    backend = LocalBackend(root)

    async def register() -> None:
        for name in TASK_NAMES:
            await backend.ensure_task(getattr(tasks, name).definition)
    try:
        asyncio.run(register())
    finally:
        backend.close()
    app = create_app(root, start_worker=True, callbacks=False)
    cell: Cell = app.state.jobcell.cell
    cell.ensure_worker()
    yield Served(root, app, cell)
    cleanup_cell(Cell(root, auto_worker=False))
    cell.close()


def test_rest_user_cannot_read_another_owners_output_through_a_file_param(
        tasks: Any, served: Served, tmp_path: Path) -> None:
    bob = served.backend(served.cell.add_user("bob")["token"])
    alice = served.backend(served.cell.add_user("alice")["token"])
    with scoped_config() as config:
        config.backend = bob
        config.cache = CacheConfigurationSQLite(file=tmp_path / "bob.sqlite")
        bobs = tasks.write_text.run("bob's private result")
    [output] = [o for o in served.cell.outputs(bobs.execution_id) if o["name"] == "out.txt"]
    try:
        with scoped_config() as config:
            config.backend = alice
            config.cache = CacheConfigurationSQLite(file=tmp_path / "alice.sqlite")
            try:
                got = asyncio.run(task_client("read_text", version="1.0")(
                    source=output["path"]))
            except (TaskFailed, JobcellError):
                got = None
    finally:
        bob.close()
        alice.close()
        client_cache.close_all()
    assert got != "bob's private result"


# -- REST over TLS with a private CA: output links ignore ``verify`` ---------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import subprocess

    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def test_rest_output_link_is_read_with_the_backends_tls_settings(
        tasks: Any, served: Served, tmp_path: Path) -> None:
    """RestBackend(verify=CA bundle) reaches a TLS server with a private CA, but the
    FileRefs it returns are read by FileRef._open_url with a default httpx.Client
    (system CAs): read_bytes()/download() fail with CERTIFICATE_VERIFY_FAILED."""
    import socket

    import uvicorn

    cert, key = _self_signed(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(served.app, host="127.0.0.1", port=port,
                                           ssl_certfile=str(cert), ssl_keyfile=str(key),
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    backend = RestBackend(f"https://127.0.0.1:{port}", served.cell.add_user("carol")["token"],
                          verify=str(cert), poll_interval_s=0.02, max_poll_interval_s=0.1)
    try:
        wait_for(lambda: server.started, timeout_s=20, what="uvicorn to listen")
        with scoped_config() as config:
            config.backend = backend
            config.cache = CacheConfigurationSQLite(file=tmp_path / "carol.sqlite")
            ref = tasks.write_text.run("over TLS")
        assert ref.url is not None and ref.url.startswith("https://")
        assert ref.read_bytes() == b"over TLS"
    finally:
        backend.close()
        client_cache.close_all()
        server.should_exit = True
        thread.join(timeout=20)
