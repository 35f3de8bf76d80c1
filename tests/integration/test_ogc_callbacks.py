"""OGC subscriber callbacks: a real HTTP receiver on loopback records what is POSTed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from integration_support import wait_for

from conftest import Api
from jobcell import subscribers
from jobcell.server import callbacks
from jobcell.service import Cell
from jobcell.subscribers import RetryPolicy

TOOLS = '''
import time

def slow_report(seconds, context):
    time.sleep(seconds)
    (context.output_dir / "report.txt").write_text("ready\\n")
    return {"ok": True}

def fail(message):
    raise ValueError(message)

def quick():
    return {"quick": True}
'''
FAST = RetryPolicy(max_attempts=4, backoff_s=0.1, factor=2.0, timeout_s=0.5)


class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTs; ``answers[path]`` scripts the
    statuses it answers (then 200), ``/hang`` answers after 3 s."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.answers: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.posts.append({"path": self.path, "body": json.loads(body),
                                           "headers": dict(self.headers),
                                           "at": time.time()})
                    script = receiver.answers.get(self.path) or []
                    code = script.pop(0) if script else 200
                if self.path == "/hang":
                    time.sleep(3)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@contextlib.contextmanager
def sender(cell: Cell, policy: RetryPolicy = FAST) -> Iterator[None]:
    """Run ``callbacks.run`` in a thread of its own (its own event loop)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def main() -> None:
        loop.run_until_complete(callbacks.run(cell, stop, policy=policy, poll_s=0.05))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        assert not thread.is_alive()


@pytest.fixture
def cb(api: Api, tmp_path: Path) -> Api:
    (tmp_path / "cb_tools.py").write_text(textwrap.dedent(TOOLS))
    for name, params in (("slow_report", {"seconds": {"type": "number"}}),
                         ("fail", {"message": {"type": "string"}}), ("quick", {})):
        api.cell.register_runner({"name": name, "python": f"cb_tools:{name}",
                                  "python_path": [str(tmp_path)], "params": params,
                                  "outputs": ["report.txt"] if name == "slow_report" else []})
    return api


def execute(api: Api, headers: dict[str, str], process: str, inputs: dict[str, Any],
            subscriber: dict[str, str]) -> str:
    answer = api.client.post(f"/processes/{process}/execution", headers=headers,
                             json={"inputs": inputs, "subscriber": subscriber})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["jobID"])


def states(cell: Cell, job_id: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in subscribers.deliveries(cell, job_id)}


def wait_posts(receiver: Receiver, path: str, count: int = 1,
               timeout_s: float = 20) -> list[dict[str, Any]]:
    return wait_for(lambda: len(receiver.at(path)) >= count and receiver.at(path),
                    timeout_s, f"{count} POST(s) to {path}")


def test_in_progress_and_success_callbacks_arrive(cb: Api, receiver: Receiver) -> None:
    me = cb.user("ann")
    job_id = execute(cb, me, "slow_report", {"seconds": 1.0},
                     {"successUri": f"{receiver.url}/ok", "failedUri": f"{receiver.url}/bad",
                      "inProgressUri": f"{receiver.url}/running"})
    with sender(cb.cell):
        cb.run_worker()
        [running] = wait_posts(receiver, "/running")
        [success] = wait_posts(receiver, "/ok")
        wait_for(lambda: states(cb.cell, job_id)["success"]["state"] == "done", 10,
                 "the success delivery to be recorded")
    assert running["body"]["jobID"] == job_id
    assert running["body"]["status"] == "running"
    assert running["headers"]["Content-Type"] == "application/json"
    assert running["headers"]["Content-Location"].endswith(f"/jobs/{job_id}")
    body = success["body"]
    assert body["result"] == {"ok": True}
    assert success["headers"]["Content-Location"].endswith(f"/jobs/{job_id}/results")
    download = cb.client.get(body["report.txt"]["href"])   # a signed, working URL
    assert download.status_code == 200
    assert download.text == "ready\n"
    assert receiver.at("/bad") == []
    recorded = states(cb.cell, job_id)
    assert (recorded["inProgress"]["state"], recorded["inProgress"]["attempts"]) == ("done", 1)
    assert (recorded["success"]["state"], recorded["success"]["attempts"]) == ("done", 1)
    assert recorded["failed"]["state"] == "skipped"
    kinds = [e["kind"] for e in cb.cell.events(job_id)]
    assert "subscribed" in kinds and kinds.count("callback_delivered") == 2


def test_failed_uri_gets_the_status_of_a_failed_job(cb: Api, receiver: Receiver) -> None:
    me = cb.user("ann")
    job_id = execute(cb, me, "fail", {"message": "bad raster"},
                     {"successUri": f"{receiver.url}/ok", "failedUri": f"{receiver.url}/bad"})
    cb.run_worker()
    with sender(cb.cell):
        [failed] = wait_posts(receiver, "/bad")
        wait_for(lambda: states(cb.cell, job_id)["success"]["state"] == "skipped", 10,
                 "the success callback to be skipped")
    assert failed["body"]["jobID"] == job_id
    assert failed["body"]["status"] == "failed"
    assert "bad raster" in failed["body"]["message"]
    assert receiver.at("/ok") == []


def test_a_flaky_receiver_is_retried_with_backoff(cb: Api, receiver: Receiver) -> None:
    receiver.answers["/flaky"] = [500, 500]
    me = cb.user("ann")
    job_id = execute(cb, me, "quick", {}, {"successUri": f"{receiver.url}/flaky"})
    cb.run_worker()
    with sender(cb.cell):
        posts = wait_posts(receiver, "/flaky", 3)
        wait_for(lambda: states(cb.cell, job_id)["success"]["state"] == "done", 10,
                 "the delivery to be recorded as done")
    recorded = states(cb.cell, job_id)["success"]
    assert recorded["attempts"] == 3
    assert recorded["last_error"] == "HTTP 500"     # the error before it went through
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(posts)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19        # 0.1 s, then 0.2 s
    assert all(p["body"] == {"result": {"quick": True}} for p in posts)


def test_unreachable_and_hanging_receivers_give_up_and_never_touch_the_job(
        cb: Api, receiver: Receiver) -> None:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/gone"   # nobody listens
    me = cb.user("ann")
    gone = execute(cb, me, "quick", {}, {"successUri": dead})
    hanging = execute(cb, me, "slow_report", {"seconds": 0},
                      {"successUri": f"{receiver.url}/hang"})
    fine = execute(cb, me, "fail", {"message": "x"},
                   {"successUri": f"{receiver.url}/ok", "failedUri": f"{receiver.url}/bad"})
    cb.run_worker()
    policy = RetryPolicy(max_attempts=2, backoff_s=0.1, timeout_s=0.3)
    with sender(cb.cell, policy):
        [failed] = wait_posts(receiver, "/bad", timeout_s=5)   # not held up by the others
        wait_for(lambda: states(cb.cell, gone)["success"]["state"] == "gave_up" and
                 states(cb.cell, hanging)["success"]["state"] == "gave_up", 20,
                 "both deliveries to give up")
    unreachable = states(cb.cell, gone)["success"]
    assert unreachable["attempts"] == 2
    assert "ConnectError" in unreachable["last_error"]
    assert states(cb.cell, hanging)["success"]["last_error"] == "no answer within 0.3 s"
    assert cb.cell.status(gone)["state"] == "succeeded"
    assert cb.cell.status(hanging)["state"] == "succeeded"
    assert [e["kind"] for e in cb.cell.events(gone)][-1] == "callback_gave_up"
    assert failed["body"]["jobID"] == fine


def test_deliveries_survive_a_restart_of_the_sender(cb: Api, receiver: Receiver) -> None:
    receiver.answers["/later"] = [503]
    me = cb.user("ann")
    job_id = execute(cb, me, "quick", {}, {"successUri": f"{receiver.url}/later"})
    cb.run_worker()
    slow = RetryPolicy(max_attempts=3, backoff_s=0.5, timeout_s=1)
    with sender(cb.cell, slow):
        wait_posts(receiver, "/later")
        wait_for(lambda: states(cb.cell, job_id)["success"]["attempts"] == 1, 10,
                 "the first attempt to be recorded")
    assert states(cb.cell, job_id)["success"]["state"] == "due"
    with Cell(cb.cell.home, auto_worker=False) as fresh, sender(fresh, slow):
        wait_for(lambda: states(fresh, job_id)["success"]["state"] == "done", 10,
                 "the new sender to deliver")
    assert len(receiver.at("/later")) == 2


def test_the_app_runs_the_sender_in_its_lifespan(make_api: Callable[..., Api], tmp_path: Path,
                                                 receiver: Receiver) -> None:
    api = make_api("served", callbacks=True)
    (tmp_path / "cb_tools.py").write_text(textwrap.dedent(TOOLS))
    api.cell.register_runner({"name": "quick", "python": "cb_tools:quick",
                              "python_path": [str(tmp_path)]})
    job_id = execute(api, api.user("ann"), "quick", {}, {"successUri": f"{receiver.url}/ok"})
    api.run_worker()
    [post] = wait_posts(receiver, "/ok")
    assert post["body"] == {"result": {"quick": True}}
    assert post["headers"]["Content-Location"].endswith(f"/jobs/{job_id}/results")


def test_each_execution_with_callbacks_gets_its_own_job(cb: Api, receiver: Receiver) -> None:
    me = cb.user("ann")
    first = execute(cb, me, "quick", {}, {"successUri": f"{receiver.url}/ok"})
    again = execute(cb, me, "quick", {}, {"successUri": f"{receiver.url}/elsewhere"})
    assert again != first                   # never merged into an identical execution
    assert [d["uri"] for d in subscribers.deliveries(cb.cell, first)] == [f"{receiver.url}/ok"]
    assert [d["uri"] for d in subscribers.deliveries(cb.cell, again)] == [
        f"{receiver.url}/elsewhere"]
    plain = cb.client.post("/processes/quick/execution", headers=me, json={"inputs": {}})
    plain_again = cb.client.post("/processes/quick/execution", headers=me, json={"inputs": {}})
    assert plain.json()["jobID"] == plain_again.json()["jobID"]   # no callbacks: reused


def test_a_late_in_progress_callback_still_says_running(cb: Api) -> None:
    from jobcell.server.signing import UrlSigner, load_signing_key
    from jobcell.store.base import DeliveryRow

    job_id = execute(cb, cb.user("ann"), "quick", {}, {"successUri": "http://x/ok",
                                                       "inProgressUri": "http://x/run"})
    cb.run_worker()
    assert cb.cell.status(job_id)["state"] == "succeeded"
    signer = UrlSigner(load_signing_key(cb.cell.home), 60)
    row = DeliveryRow(1, job_id, "inProgress", "http://x/run", "due", 1, None, None, None)
    body, location = callbacks.payload(cb.cell, signer, row)   # a retry after the end
    assert (body["status"], body["jobID"]) == ("running", job_id)
    assert "finished" not in body and location.endswith(f"/jobs/{job_id}")


def test_an_attempt_that_cannot_be_recorded_is_not_posted_again(
        cb: Api, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    original = subscribers.record_attempt
    failures: list[float] = []

    def full_disk(*args: Any, **kwargs: Any) -> str:
        if len(failures) < 3:
            failures.append(time.monotonic())
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(subscribers, "record_attempt", full_disk)
    monkeypatch.setattr(callbacks, "RECORD_RETRY_S", (0.1, 0.2))
    job_id = execute(cb, cb.user("ann"), "quick", {}, {"successUri": f"{receiver.url}/ok"})
    cb.run_worker()
    with sender(cb.cell):
        wait_for(lambda: states(cb.cell, job_id)["success"]["state"] == "done", 10,
                 "the attempt to be recorded at last")
    assert len(receiver.at("/ok")) == 1                        # posted once, recorded later
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19                 # backing off
    assert states(cb.cell, job_id)["success"]["attempts"] == 1


def test_a_failing_round_is_logged_and_the_sender_goes_on(
        cb: Api, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    original = callbacks._start
    calls: list[int] = []

    def flaky(*args: Any) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("boom")
        original(*args)

    monkeypatch.setattr(callbacks, "_start", flaky)
    job_id = execute(cb, cb.user("ann"), "quick", {}, {"successUri": f"{receiver.url}/ok"})
    cb.run_worker()
    with caplog.at_level("ERROR", logger="jobcell.server.callbacks"), sender(cb.cell):
        wait_posts(receiver, "/ok")
        wait_for(lambda: states(cb.cell, job_id)["success"]["state"] == "done", 10,
                 "the delivery")
    assert "failed a round" in caplog.text and "boom" in caplog.text


def test_the_sender_stops_promptly_even_in_a_slow_read(
        cb: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    reading = threading.Event()

    def slow_read(*_: Any, **__: Any) -> list[Any]:
        reading.set()
        time.sleep(3)   # a locked database
        return []

    monkeypatch.setattr(subscribers, "due_deliveries", slow_read)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        callbacks.run(cb.cell, stop, policy=FAST, poll_s=0.05)), daemon=True)
    thread.start()
    try:
        assert reading.wait(5)
        started = time.monotonic()
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 1.5
    finally:
        loop.close()    # the abandoned read ends on its own in its thread
