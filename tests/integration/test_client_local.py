"""The task client end to end on a real local cell: its embedded worker (a daemon the
first submit starts) runs the Python callable runners made by ``@task``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import COMMON_TASKS, client_scope, names, recorded_events, task_module
from integration_support import cleanup_cell, wait_for, write_settings

from jobcell.client import (
    CacheMode,
    FileRef,
    FileRefError,
    LocalBackend,
    SubmissionsDisabled,
    TaskFailed,
    TaskOutputError,
    global_config,
    scoped_config,
    task_client,
)
from jobcell.service import Cell

TASKS = '''
"""Tasks for the task client tests."""
import os
import time
from pathlib import Path

from jobcell import FileRef, StepContext
from jobcell.client import task
''' + COMMON_TASKS + '''


@task(version="1.0", memory_mb=64)
def add(a: int, b: int = 2) -> int:
    return a + b


@task(version="1.0", memory_mb=64)
def write_text(text: str, name: str = "out.txt") -> FileRef:
    path = Path(name)      # the attempt folder: copied into the outputs when returned
    path.write_text(text)
    return path


@task(version="1.0", memory_mb=64)
def write_two(text: str, context: StepContext) -> dict:
    first = context.output_dir / "a.txt"
    first.write_text(text)
    (context.output_dir / "sub").mkdir()
    second = context.output_dir / "sub" / "b.txt"
    second.write_text(text.upper())
    return {"files": [first, second], "count": 2}


@task(version="1.0", memory_mb=64)
def read_text(source: FileRef) -> str:
    return source.read_text() + f" ({source.name})"


@task(version="1.0", memory_mb=64)
def concat(sources: list[Path], sep: str = "+") -> str:
    return sep.join(p.read_text() for p in sources)


@task(version="1.0", memory_mb=64)
def wrong_type(x: int) -> str:
    return x  # type: ignore[return-value]


@task(version="1.0", memory_mb=64, vcpu=1, timeout=60)
def limits() -> dict:
    return {"ok": True}
'''

SCRIPT = '''
import asyncio, json, sys
sys.path.insert(0, {tasks_dir!r})
from jobcell.config import global_config, LocalBackend, CacheConfigurationSQLite
import client_tasks

global_config.backend = LocalBackend({home!r}, poll_interval_s=0.02, max_poll_interval_s=0.1)
global_config.cache = CacheConfigurationSQLite(file={cache!r})
events = []
for name in ("submitted", "reattached", "finished", "cache_hit", "interrupt_waiting"):
    getattr(global_config, "on_" + name)(
        lambda request, name=name: print("EVENT", name, request.execution_id, flush=True))

async def main():
    value = await client_tasks.gated({gate!r}, "detach")
    print("RESULT", json.dumps(value), flush=True)

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module ``client_tasks`` (in a temp folder the runners import it from)."""
    with task_module(tmp_path_factory.mktemp("tasks"), "client_tasks", TASKS) as module:
        yield module


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A cell home with the test settings; its worker is stopped afterwards."""
    root = tmp_path / "cell"
    write_settings(root)
    yield root
    cleanup_cell(Cell(root, auto_worker=False))


@pytest.fixture
def client(home: Path, tmp_path: Path) -> Iterator[Any]:
    """A scope with a LocalBackend on ``home`` and a SQLite cache in ``tmp_path``;
    ``client.events`` records every event as ``(event, task, execution id)``."""
    backend = LocalBackend(home, poll_interval_s=0.02, max_poll_interval_s=0.1)
    with recorded_events() as events, \
            client_scope(backend, tmp_path / "cache.sqlite") as config:
        config.events = events
        yield config


def job_count(home: Path) -> int:
    with Cell(home, auto_worker=False) as cell:
        return len(cell.list(limit=1000))



def test_hello_gather_and_run(tasks: Any, client: Any, home: Path) -> None:
    async def main() -> tuple[str, list[Any]]:
        one = await tasks.hello("world")
        many = await asyncio.gather(tasks.hello("a"), tasks.hello("b"), tasks.add(40))
        return one, many

    one, many = asyncio.run(main())
    assert one == "Hello, world!"
    assert many == ["Hello, a!", "Hello, b!", 42]
    assert tasks.add.run(1, b=5) == 6
    with Cell(home, auto_worker=False) as cell:
        runner = cell.runner("hello")
        jobs = cell.list(limit=100)
    assert runner.version == "1.0" and runner.resources.memory_mb == 64
    assert runner.python == "client_tasks:_jobcell_task__hello"
    assert {j["label"] for j in jobs} == {"client_tasks"}
    assert len(jobs) == 5


def test_fresh_run_then_cache_hit_callback_order(tasks: Any, client: Any, home: Path) -> None:
    assert tasks.hello.run("order") == "Hello, order!"
    fresh = names(client.events)
    assert fresh == ["backend_initialized", "creating", "cache_miss", "submitted",
                     "cache_write", "finished", "cache_write"]
    assert any(e[0] == "progress" for e in client.events)
    client.events.clear()
    assert tasks.hello.run("order") == "Hello, order!"
    assert names(client.events) == ["creating", "cache_hit"]
    assert job_count(home) == 1


def test_task_failed_carries_error_and_log_tail(tasks: Any, client: Any) -> None:
    with pytest.raises(TaskFailed) as caught:
        tasks.fail.run("broken on purpose")
    assert caught.value.state == "failed"
    assert "broken on purpose" in str(caught.value.error)
    assert any("about to fail" in line for line in caught.value.log_tail)
    # FULLY_CACHED serves the failure from the cache; RESTART_FAILED submits again.
    client.events.clear()
    with pytest.raises(TaskFailed):
        tasks.fail.run("broken on purpose")
    assert names(client.events) == ["creating", "cache_hit"]
    client.events.clear()
    with scoped_config(cache_mode=CacheMode.RESTART_FAILED), pytest.raises(TaskFailed):
        tasks.fail.run("broken on purpose")
    assert names(client.events)[:4] == ["creating", "cache_ignored", "submitted",
                                        "cache_write"]


def test_invalid_input_is_refused_before_submission(tasks: Any, client: Any,
                                                     home: Path) -> None:
    with pytest.raises(TypeError, match="param 'a' expected integer"):
        tasks.add("not a number")
    with pytest.raises(TypeError):
        tasks.hello()
    assert not (home / "runners" / "add.yaml").exists()


def test_cache_modes_on_a_real_cell(tasks: Any, client: Any, home: Path) -> None:
    assert tasks.add.run(1) == 3
    for mode, submits in ((CacheMode.FULLY_CACHED, 0), (CacheMode.RESTART_FAILED, 0),
                          (CacheMode.REATTACH_ONLY, 1), (CacheMode.WRITE_ONLY, 1),
                          (CacheMode.DISABLED, 1)):
        before = job_count(home)
        client.events.clear()
        with scoped_config(cache_mode=mode):
            assert tasks.add.run(1) == 3
        assert job_count(home) - before == submits, mode
        if mode is CacheMode.DISABLED:
            assert "cache_write" not in names(client.events)
            assert "cache_miss" not in names(client.events)


def test_disable_submissions(tasks: Any, client: Any, home: Path) -> None:
    assert tasks.hello.run("cached") == "Hello, cached!"
    with scoped_config(disable_submissions=True):
        assert tasks.hello.run("cached") == "Hello, cached!"
        with pytest.raises(SubmissionsDisabled, match="submissions are disabled"):
            tasks.hello.run("never submitted")
    assert job_count(home) == 1


def test_deleted_job_is_a_cache_miss(tasks: Any, client: Any, home: Path) -> None:
    assert tasks.hello.run("gone") == "Hello, gone!"
    with Cell(home, auto_worker=False) as cell:
        cell.gc(older_than_days=0)
        assert cell.list() == []
    client.events.clear()
    assert tasks.hello.run("gone") == "Hello, gone!"
    assert names(client.events)[:3] == ["creating", "cache_miss", "submitted"]


def test_reattach_to_a_pending_entry_in_process(tasks: Any, client: Any, home: Path,
                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def detach() -> None:
        waiting = asyncio.ensure_future(tasks.gated(str(gate), "in-process"))
        await asyncio.sleep(0.5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(detach())
    assert names(client.events)[-1] == "interrupt_waiting"
    client.events.clear()
    gate.touch()
    assert tasks.gated.run(str(gate), "in-process") == "opened in-process"
    assert names(client.events) == ["creating", "reattached", "finished", "cache_write"]
    assert job_count(home) == 1


def test_raising_callback_does_not_break_the_task(tasks: Any, client: Any) -> None:
    @global_config.on_submitted
    def broken(request: Any) -> None:
        raise RuntimeError("callback bug")

    @global_config.on_finished
    def also_broken(request: Any) -> None:
        raise RuntimeError("callback bug")

    assert tasks.hello.run("robust") == "Hello, robust!"


def test_task_client_for_a_runner_registered_elsewhere(tasks: Any, client: Any,
                                                        home: Path) -> None:
    assert tasks.hello.run("registered") == "Hello, registered!"   # registers "hello"
    hello = task_client("hello", version="1.0")
    assert asyncio.run(hello(name="by name")) == "Hello, by name!"
    with pytest.raises(TypeError, match="keyword arguments only"):
        hello("positional")


def test_detach_by_killing_the_script_then_reattach(tasks: Any, home: Path,
                                                    tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tasks_dir=str(Path(tasks.__file__).parent), home=str(home),
        cache=str(tmp_path / "script-cache.sqlite"), gate=str(gate))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = first.stdout.readline() if first.stdout else ""
        assert line.startswith("EVENT submitted"), line
        job_id = line.split()[2]
        with Cell(home, auto_worker=False) as cell:
            wait_for(lambda: cell.status(job_id)["state"] == "running", what="running")
        first.send_signal(signal.SIGINT)       # Ctrl-C while it awaits: detach
        output, _ = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    assert "EVENT interrupt_waiting" in output and "KeyboardInterrupt" in output
    with Cell(home, auto_worker=False) as cell:
        assert cell.status(job_id)["state"] in ("queued", "running")   # it goes on
    gate.touch()
    time.sleep(0.2)
    second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"EVENT reattached {job_id}" in second.stdout
    assert "EVENT submitted" not in second.stdout
    assert 'RESULT "opened detach"' in second.stdout
    assert job_count(home) == 1


def test_detach_by_sigkill_then_reattach(tasks: Any, home: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tasks_dir=str(Path(tasks.__file__).parent), home=str(home),
        cache=str(tmp_path / "script-cache.sqlite"), gate=str(gate))))
    first = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             text=True)
    try:
        line = first.stdout.readline() if first.stdout else ""
        assert line.startswith("EVENT submitted"), line
        first.kill()
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    gate.touch()
    second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "EVENT submitted" not in second.stdout
    assert 'RESULT "opened detach"' in second.stdout
    assert json.loads(second.stdout.split("RESULT ", 1)[1]) == "opened detach"
    assert job_count(home) == 1


def test_file_output_is_a_local_file_ref(tasks: Any, client: Any, home: Path) -> None:
    ref = tasks.write_text.run("hello file")
    assert isinstance(ref, FileRef)
    assert ref.name == "out.txt" and ref.step == "task" and ref.size == 10
    assert ref.read_bytes() == b"hello file" and ref.read_text() == "hello file"
    assert Path(ref.path).is_relative_to(home)             # the cell's own output file
    with ref.open() as handle:
        assert handle.read() == b"hello file"
    (home.parent / "downloads").mkdir()
    target = ref.download(home.parent / "downloads")       # a folder: the base name in it
    assert target.read_text() == "hello file" and target.name == "out.txt"
    assert ref.download(home.parent / "new" / "copy.txt").read_text() == "hello file"
    import blake3
    assert ref.digest == blake3.blake3(b"hello file").hexdigest()


def test_nested_file_outputs(tasks: Any, client: Any) -> None:
    value = tasks.write_two.run("ab")
    assert value["count"] == 2
    first, second = value["files"]
    assert (first.name, second.name) == ("a.txt", "sub/b.txt")
    assert (first.read_text(), second.read_text()) == ("ab", "AB")


def test_file_ref_passed_on_to_another_task(tasks: Any, client: Any, home: Path) -> None:
    async def main() -> tuple[Any, str]:
        ref = await tasks.write_text("passed on", name="note.txt")
        return ref, await tasks.read_text(ref)
    ref, text = asyncio.run(main())
    assert text == "passed on (source/note.txt)"
    with Cell(home, auto_worker=False) as cell:
        jobs = cell.list(limit=10)
        reader = next(j for j in jobs if j["job_id"] != ref.execution_id)
        step = cell.status(reader["job_id"])["steps"][0]
        assert step["files"] == {"source/note.txt": ref.digest}   # staged by content


def test_local_files_as_input_and_the_cache_key_follows_content(
        tasks: Any, client: Any, home: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("1")
    two.write_text("2")
    assert tasks.concat.run([one, two]) == "1+2"
    assert tasks.concat.run([str(one), FileRef.local(two)]) == "1+2"   # same content: hit
    assert job_count(home) == 1
    assert names(client.events).count("cache_hit") == 1
    one.write_text("one")                                # new content: a new execution
    assert tasks.concat.run([one, two]) == "one+2"
    assert job_count(home) == 2
    assert tasks.read_text.run(one) == "one (source/one.txt)"
    with pytest.raises(FileRefError, match="not a readable regular file"):
        tasks.read_text.run(tmp_path / "missing.txt")


def test_output_checked_against_the_return_annotation(tasks: Any, client: Any) -> None:
    with pytest.raises(TaskOutputError, match="does not match its return annotation"):
        tasks.wrong_type.run(3)


def test_provisioning_overrides_the_step_resources(tasks: Any, client: Any,
                                                   home: Path) -> None:
    assert tasks.limits.run() == {"ok": True}
    with scoped_config(vcpu=1.5, memory_mb=96, timeout_minutes=2):
        assert tasks.limits.run() == {"ok": True}       # a client-cache hit: same key
    assert job_count(home) == 1
    with scoped_config(vcpu=1.5, memory_mb=96, timeout_minutes=2,
                       cache_mode=CacheMode.WRITE_ONLY):
        assert tasks.limits.run() == {"ok": True}
    with Cell(home, auto_worker=False) as cell:
        jobs = sorted(cell.list(limit=10), key=lambda j: j["created_at"])
        assert len(jobs) == 2
        first, second = (cell.status(j["job_id"])["steps"][0] for j in jobs)
        assert (first["cpu_slots"], first["memory_mb"]) == (1, 64)
        assert (second["cpu_slots"], second["memory_mb"]) == (2, 96)
        spec = cell.store.get_job(jobs[1]["job_id"]).spec
        assert spec["steps"][0]["resources"] == {"cpu_slots": 2, "memory_mb": 96,
                                                 "timeout_s": 120.0}


def test_provisioning_that_never_fits_is_refused_at_submit(tasks: Any, client: Any) -> None:
    with scoped_config(memory_gb=1_000_000), pytest.raises(Exception, match="memory"):
        tasks.limits.run()


def _interrupt_script(tasks: Any, home: Path, tmp_path: Path, cancel: str) -> Path:
    script = tmp_path / "script.py"
    text = textwrap.dedent(SCRIPT.format(
        tasks_dir=str(Path(tasks.__file__).parent), home=str(home),
        cache=str(tmp_path / "script-cache.sqlite"), gate=str(tmp_path / "gate")))
    script.write_text(text.replace("events = []",
                                   f"global_config.cancel_on_interrupt = {cancel}\nevents = []"))
    return script


def test_interrupt_with_cancel_on_interrupt_cancels(tasks: Any, home: Path,
                                                    tmp_path: Path) -> None:
    script = _interrupt_script(tasks, home, tmp_path, "True")
    first = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = first.stdout.readline() if first.stdout else ""
        assert line.startswith("EVENT submitted"), line
        job_id = line.split()[2]
        with Cell(home, auto_worker=False) as cell:
            wait_for(lambda: cell.status(job_id)["state"] == "running", what="running")
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=30)
            wait_for(lambda: cell.status(job_id)["state"] == "cancelled", what="cancelled")
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.parametrize("answer", ["y", "n"])
def test_interactive_interrupt_asks_whether_to_cancel(tasks: Any, home: Path, tmp_path: Path,
                                                      answer: str) -> None:
    import pty
    import select

    script = _interrupt_script(tasks, home, tmp_path, "None")
    master, slave = pty.openpty()
    first = subprocess.Popen([sys.executable, str(script)], stdin=slave, stdout=slave,
                             stderr=slave, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    seen = b""

    def read_until(pattern: bytes, timeout: float = 30.0) -> re.Match[bytes]:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, seen)) is None:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:     # the script has exited
                    break
        assert match is not None, seen.decode(errors="replace")
        return match
    try:
        # A whole line: print() writes its parts one by one to an unbuffered stream.
        job_id = read_until(rb"EVENT submitted (\S+)\r?\n").group(1).decode()
        with Cell(home, auto_worker=False) as cell:
            wait_for(lambda: cell.status(job_id)["state"] == "running", what="running")
            first.send_signal(signal.SIGINT)
            read_until(rb"\[y/N\]")
            assert b"Cancel the running executions too?" in seen
            os.write(master, answer.encode() + b"\n")
            first.wait(timeout=30)
            if answer == "y":
                wait_for(lambda: cell.status(job_id)["state"] == "cancelled",
                         what="cancelled")
            else:
                time.sleep(0.3)
                assert cell.status(job_id)["state"] == "running"   # detached: it goes on
                cell.cancel(job_id)
    finally:
        if first.poll() is None:
            first.kill()
        os.close(master)
