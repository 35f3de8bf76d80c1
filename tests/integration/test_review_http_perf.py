"""Review of the HTTP performance commit (2e191f6): list pages, the list thread limiter,
``jobcell serve --workers N`` and the N callback senders it runs.

Each test here states what should hold; the ones that fail show a bug of that commit.
The list data path itself (SQLite JSON page, exact timestamps, table-driven ``iso``,
filters, ties, odd texts) was checked against the previous commit byte for byte and
agrees; the tests for it below pass and guard it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from integration_support import wait_for
from test_ogc_callbacks import TOOLS as CALLBACK_TOOLS
from test_ogc_callbacks import Receiver, execute, sender, wait_posts
from test_store_contract import insert, make_job

from conftest import Api
from jobcell.service import Cell, job_summary
from jobcell.store import Changes
from jobcell.store.base import JobUpdate
from jobcell.subscribers import RetryPolicy

JOBCELL = Path(sys.executable).parent / "jobcell"


# -- helpers: a real ``jobcell serve`` -------------------------------------------------

def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    env.update(extra or {})
    return env


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    def log(self) -> str:
        return (f"--- stdout ---\n{self.out.read_text(errors='replace')}\n"
                f"--- stderr ---\n{self.err.read_text(errors='replace')[-4000:]}")

    def server_processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                    if "--multiprocessing-fork" in " ".join(p.cmdline())]
        return []

    def announced(self) -> dict[str, Any] | None:
        first = self.out.read_text().partition("\n")
        return json.loads(first[0]) if first[1] else None


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Start ``jobcell serve --json`` in a session (process group) of its own; at the end
    every process of that group (the server, its server processes, orphans too) is
    killed, by the group's id, which is the id of the process started here."""
    started: list[Serve] = []

    def start(home: Path, *args: str, stdout: int | None = None,
              env: dict[str, str] | None = None) -> Serve:
        folder = tmp_path / f"serve-{len(started)}"
        folder.mkdir()
        out, err = folder / "serve.out", folder / "serve.err"
        argv = [str(JOBCELL), "serve", "--home", str(home), "--port", "0", "--json",
                "--no-worker", *args]
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=out_file if stdout is None else stdout, stderr=err_file,
                env=_env(env), start_new_session=True)
        served = Serve(process, out, err)
        started.append(served)
        return served

    yield start
    for served in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(served.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            served.process.wait(10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/api/v1/jobs", timeout=2)
    except httpx.HTTPError:
        return False
    return True


def _slow_start(folder: Path, seconds: float) -> dict[str, str]:
    """An environment whose *server processes* (spawned children, not ``serve`` itself)
    take ``seconds`` to start, as on a slow shared filesystem."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys, time
        if "--multiprocessing-fork" in sys.argv:
            time.sleep({seconds})
        """))
    return {"PYTHONPATH": str(folder)}


# -- the list data path (these pass: no bug found there) -----------------------------

def test_list_page_matches_the_old_summaries_for_odd_rows(api: Api) -> None:
    """Ties in created_at, odd texts in error, times far from today: the page the route
    writes is the old ``job_summary`` of ``list_jobs`` rows, in the same order."""
    alice = api.user("alice")
    times = [1.7e9, 1.7e9, 1.7e9 + 0.9995, 1.7e9 + 0.0009995, 0.0, 1e-5, -3.5, 2.0**60,
             253402300799.5, 1000.0, 1000.0]
    texts = [None, "nul \x00 bell \x07 del \x7f", 'q"uote \\ / \u2028 😀', "é" * 40]
    jobs = [make_job(f"{i:011x}-{'0' * 12}", owner="alice", tags=["t", f"x{i % 2}"],
                     created_at=t) for i, t in enumerate(times)]
    insert(api.cell.store, *jobs)
    api.cell.store.apply(Changes(jobs=[JobUpdate(j.job_id, {
        "finished_at": [None, 1.7e9 + 0.25, 1e-7][i % 3], "error": texts[i % 4]})
        for i, j in enumerate(jobs)]))
    for params in ({}, {"limit": 3}, {"limit": 3, "offset": 3}, {"tag": "x1"},
                   {"limit": 1, "offset": 1}, {"label": "demo", "limit": 4, "offset": 7}):
        page = api.client.get("/api/v1/jobs", params=params, headers=alice)
        assert page.status_code == 200, page.text
        limit, offset = params.get("limit", 100), params.get("offset", 0)
        rows = api.cell.store.list_jobs(owner="alice", tag=params.get("tag"),
                                        label=params.get("label"), limit=limit, offset=offset)
        assert page.json()["jobs"] == [job_summary(r) for r in rows], params


# -- the list thread limiter ----------------------------------------------------------

def test_list_limiter_works_for_apps_on_different_event_loops(
        make_api: Callable[..., Api]) -> None:
    """Two apps, each on its own event loop (two TestClients, or an app reached through
    httpx.ASGITransport from two threads). A module-level limiter was shared by both:
    loop B's waiter was woken from loop A's thread (not thread-safe) and hung. Each
    loop now has its own limiters: B's list is served while A's hold all of theirs."""
    a, b = make_api("a"), make_api("b")
    alice, bob = a.user("alice"), b.user("bob")
    gate, entered = threading.Event(), []
    original = a.cell.list

    def slow_list(**query: Any) -> list[dict[str, Any]]:
        entered.append(1)
        gate.wait(30)
        return original(**query)

    a.cell.list = slow_list       # type: ignore[method-assign]
    statuses: list[tuple[str, int]] = []
    holders = [threading.Thread(target=lambda: statuses.append(
        ("a", a.client.get("/api/v1/jobs", headers=alice).status_code))) for _ in range(4)]
    for thread in holders:
        thread.start()
    try:
        wait_for(lambda: len(entered) == 4, 10, "four lists of app a to hold the list threads")
        waiter = threading.Thread(target=lambda: statuses.append(
            ("b", b.client.get("/api/v1/jobs", headers=bob).status_code)), daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "app b's list waited for app a's list threads"
    finally:
        gate.set()
        for thread in holders:
            thread.join(10)
    assert sorted(statuses) == [("a", 200)] * 4 + [("b", 200)]


# -- the callback senders of serve --workers N ---------------------------------------

@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def test_two_server_processes_send_a_jobs_callbacks_in_order(
        make_api: Callable[..., Api], tmp_path: Path, receiver: Receiver) -> None:
    """``serve --workers 2`` runs one callback sender per server process (each with its
    own Cell on the cell's database). The sender promises that "the callbacks of one job
    go out in order": the success callback goes out only after the inProgress POST was
    answered. With one sender it holds (checked first); with two, the second sender
    claims the success row while the first still waits for the inProgress answer."""
    api = make_api("cb")
    (tmp_path / "cb_tools.py").write_text(textwrap.dedent(CALLBACK_TOOLS))
    api.cell.register_runner({"name": "slow_report", "python": "cb_tools:slow_report",
                              "python_path": [str(tmp_path)],
                              "params": {"seconds": {"type": "number"}},
                              "outputs": ["report.txt"]})
    ann = api.user("ann")
    policy = RetryPolicy(max_attempts=1, backoff_s=0.1, timeout_s=8)

    def run(paths: tuple[str, str], senders: int) -> tuple[float, float]:
        running, done = paths
        with contextlib.ExitStack() as stack:
            stack.enter_context(sender(api.cell, policy))
            for _ in range(senders - 1):
                other = stack.enter_context(Cell(api.cell.home, auto_worker=False))
                stack.enter_context(sender(other, policy))
            seconds = 1.0 + senders / 100      # a new step each run: no cache hit
            execute(api, ann, "slow_report", {"seconds": seconds},
                    {"inProgressUri": f"{receiver.url}{running}",
                     "successUri": f"{receiver.url}{done}"})
            api.run_worker()
            [first] = wait_posts(receiver, running)
            [second] = wait_posts(receiver, done)
            time.sleep(3.5)    # let /hang answer before the senders stop
        return float(first["at"]), float(second["at"])

    receiver_hang = "/hang"   # the receiver answers it after 3 s
    # One sender: the success POST waits for the inProgress answer (about 3 s).
    started, succeeded = run((receiver_hang, "/ok-one"), senders=1)
    assert succeeded - started >= 2.5, (started, succeeded)
    # Two senders (two server processes): the same must hold.
    receiver.posts.clear()
    started, succeeded = run((receiver_hang, "/ok-two"), senders=2)
    assert succeeded - started >= 2.5, (
        f"success was POSTed {succeeded - started:.2f} s after inProgress, before the "
        "inProgress POST was answered: two senders send one job's callbacks at once")


# -- jobcell serve --workers N as a process -------------------------------------------

def test_serve_workers_exits_when_its_supervisor_fails(make_cell: Callable[..., Cell],
                                                       serve: Callable[..., Serve]) -> None:
    """An error in the supervising process (here: the announcement line cannot be
    written, stdout's reader is gone) must end ``serve`` with an error, as it does with
    one process. With --workers 2 it prints "internal error" and then hangs forever:
    Multiprocess.run has no finally that stops the server processes, and at exit
    multiprocessing joins its non-daemon children, which keep serving the port."""
    home = make_cell("pipe").home.root
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        one = serve(home, stdout=write_end)
        assert one.process.wait(30) != 0          # one process: a clean failure
        two = serve(home, "--workers", "2", stdout=write_end)
    finally:
        os.close(write_end)
    try:
        code = two.process.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    left = two.server_processes()
    assert code is not None, (f"serve --workers 2 still runs 30 s after failing, with "
                              f"{len(left)} server processes\n{two.log()}")
    assert code != 0 and not left


def test_serve_workers_processes_stop_when_serve_is_killed(
        make_cell: Callable[..., Cell], serve: Callable[..., Serve]) -> None:
    """SIGKILL of ``serve`` (the OOM killer, a supervisor's final kill) must not leave
    server processes behind that keep answering on the port: nothing makes the spawned
    processes notice that their parent is gone."""
    home = make_cell("kill").home.root
    served = serve(home, "--workers", "2")
    info = wait_for(served.announced, 60, "serve --workers 2 to listen")
    processes = served.server_processes()
    assert len(processes) == 2
    url = str(info["url"])
    assert _answers(url)
    os.kill(served.process.pid, signal.SIGKILL)
    served.process.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
            _answers(url) or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                 for p in processes)):
        time.sleep(0.25)
    alive = [p.pid for p in processes
             if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive and not _answers(url), (
        f"15 s after serve was killed, its server processes {alive} still serve {url}")


def test_serve_workers_stops_on_sigterm_while_its_processes_start(
        make_cell: Callable[..., Cell], serve: Callable[..., Serve], tmp_path: Path) -> None:
    """SIGTERM stops ``serve`` (its help says so) also while the server processes are
    still starting. With --workers N the supervisor only queues the signal and goes on
    waiting (up to 120 s per process) until every process serves."""
    home = make_cell("term").home.root
    served = serve(home, "--workers", "2", env=_slow_start(tmp_path / "slow", 60))
    wait_for(lambda: len(served.server_processes()) == 2, 30, "the server processes")
    time.sleep(1)
    sent = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    try:
        served.process.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve --workers 2 ignored SIGTERM for {time.monotonic() - sent:.0f} s "
                    f"while its processes started\n{served.log()}")


def test_serve_workers_ctrl_c_while_its_processes_start_is_a_clean_stop(
        make_cell: Callable[..., Cell], serve: Callable[..., Serve], tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) during start: one process exits 0
    (checked first); --workers 2 reports "the server did not start" and exits 1, since
    its starting processes die of the KeyboardInterrupt before the queued SIGINT is
    handled."""
    home = make_cell("int").home.root
    single = serve(home, env=_slow_start(tmp_path / "slow", 4))
    time.sleep(1.0)   # serve itself is importing or starting (its children are not slow)
    os.killpg(single.process.pid, signal.SIGINT)
    assert single.process.wait(30) == 0, single.log()
    served = serve(home, "--workers", "2", env=_slow_start(tmp_path / "slow", 4))
    wait_for(lambda: len(served.server_processes()) == 2, 30, "the server processes")
    time.sleep(0.5)
    os.killpg(served.process.pid, signal.SIGINT)
    code = served.process.wait(30)
    assert code == 0 and "did not start" not in served.err.read_text(), served.log()


def test_serve_workers_answers_on_port_zero(make_cell: Callable[..., Cell],
                                            serve: Callable[..., Serve]) -> None:
    """--port 0 with several processes: one real port, announced once, answered by both
    (passes: no bug found)."""
    cell = make_cell("zero")
    token = cell.add_user("alice")["token"]
    served = serve(cell.home.root, "--workers", "2")
    info = wait_for(served.announced, 60, "serve --workers 2 to listen")
    assert info["port"] != 0 and info["workers"] == 2
    for _ in range(6):
        answer = httpx.get(f"{info['url']}/api/v1/jobs?state=bogus",
                           headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 400
        assert answer.headers["content-type"].startswith("application/problem+json")
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(30) == 0, served.log()
    assert served.out.read_text().count("\n") == 1
    with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", int(info["port"])), timeout=2):
        pytest.fail("the port still answers after SIGTERM")
