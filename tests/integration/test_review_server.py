"""Reviewer's reproducers for the HTTP server (issue 5).

Each test states the behaviour the server should have. Those whose docstring starts
with ``Was:`` reproduce a bug found in review of fd91d9e (now fixed: they guard against
its return); the others pin behaviour that was checked and holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import httpx
import pytest
from integration_support import wait_for

from conftest import Api
from jobcell import subscribers
from jobcell.errors import ConfigError
from jobcell.server import callbacks, create_app
from jobcell.server.deps import file_path
from jobcell.server.signing import KEY_FILE, UrlSigner, load_signing_key
from jobcell.service import Cell
from jobcell.store.base import Changes, JobUpdate
from jobcell.subscribers import RetryPolicy


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return str(response.json()["detail"])


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    api = make_api()
    api.register("write", ["write", "{output_dir}", "{name}", "{text}"],
                 params={"name": {"type": "string"}, "text": {"type": "string"}})
    api.register("join", ["join", "{input_dir}", "{output_dir}"])
    # appends to its staged input in place (chmod first, as a careless tool or root would)
    api.register("tamper", ["input", "append", "{input_dir}/data.bin", "{output_dir}"])
    return api


# -- signed URLs -----------------------------------------------------------------------
def test_a_non_ascii_signature_is_refused_not_a_server_error(api: Api) -> None:
    """Was: ``hmac.compare_digest`` raises TypeError on non-ASCII str -> 500."""
    answer = api.client.get("/api/v1/files/x/y/z?expires=1&sig=%C3%A9")
    problem(answer, 403)


def test_a_short_or_empty_signing_key_is_never_used(api: Api) -> None:
    """An empty/truncated key file is refused with a clear error (never used to sign,
    which would let anybody forge download URLs); deleting it makes a new key."""
    path = api.cell.home.locks / KEY_FILE
    path.unlink(missing_ok=True)
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="damaged"):
        load_signing_key(api.cell.home)
    path.unlink()
    key = load_signing_key(api.cell.home)
    assert len(key) >= 32
    forged = UrlSigner(b"", 3600).sign(file_path("j", "s", "n"))[0]
    assert UrlSigner(key, 3600).check(file_path("j", "s", "n"),
                                      *_query(forged)) is not None


def _query(url: str) -> tuple[str, str]:
    params = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    return params["expires"], params["sig"]


def test_signature_is_over_the_decoded_path(api: Api) -> None:
    """Holds: a name that needs percent-encoding downloads through its signed URL."""
    alice = api.user("alice")
    spec = {"label": "f", "steps": [{"runner": "write",
                                     "params": {"name": "a b%?#.txt", "text": "hi"}}]}
    job = api.client.post("/api/v1/jobs", json=spec, headers=alice).json()["job_id"]
    api.run_worker()
    [out] = api.client.get(f"/api/v1/jobs/{job}/outputs", headers=alice).json()
    assert api.client.get(out["href"]).text == "hi"
    mac = hmac.new(b"x", b"", hashlib.sha256).hexdigest()   # a wrong one is refused
    problem(api.client.get(out["href"].split("sig=")[0] + f"sig={mac}"), 403)


# -- server paths in answers -----------------------------------------------------------
def test_an_unknown_runner_does_not_name_the_cell_home(api: Api) -> None:
    """Was: GET /api/v1/runners/{name} answers 'no runner named .. is registered in
    /path/to/cell' (the service's NotFoundError text, passed through)."""
    alice = api.user("alice")
    detail = problem(api.client.get("/api/v1/runners/nope", headers=alice), 404)
    assert str(api.cell.home.root) not in detail


def test_clashing_file_names_are_refused_at_submit(api: Api) -> None:
    """Was: ``files: {"a": .., "a/b": ..}`` (or ``"./x"`` beside ``"x"``) is
    accepted (201); the step then fails at launch with an OSError whose text, a server
    path under artifacts/, is shown to the user in the job's error."""
    alice = api.user("alice")
    one = api.client.post("/api/v1/uploads", content=b"one", headers=alice).json()["digest"]
    two = api.client.post("/api/v1/uploads", content=b"two", headers=alice).json()["digest"]
    for files in ({"a": one, "a/b": two}, {"./x": one, "x": two}):
        spec = {"label": "c", "steps": [{"runner": "join", "files": files}]}
        answer = api.client.post("/api/v1/jobs", json=spec, headers=alice)
        if answer.status_code == 201:
            api.run_worker()
            status = api.client.get(f"/api/v1/jobs/{answer.json()['job_id']}",
                                    headers=alice).json()
            assert str(api.cell.home.root) not in (status["error"] or "")
        problem(answer, 400)


# -- uploads -----------------------------------------------------------------------
def test_a_step_cannot_corrupt_the_content_addressed_upload(api: Api) -> None:
    """A step that writes its input in place (as root the 0444 mode would not stop it)
    changes only its own copy: the stored upload keeps its bytes."""
    alice, bob = api.user("alice"), api.user("bob")
    content = b"original content\n"
    digest = api.client.post("/api/v1/uploads", content=content, headers=alice).json()["digest"]
    spec = {"label": "t", "steps": [{"runner": "tamper", "files": {"data.bin": digest}}]}
    job = api.client.post("/api/v1/jobs", json=spec, headers=alice).json()["job_id"]
    api.run_worker()
    assert api.cell.status(job)["state"] in ("succeeded", "failed")
    again = api.client.post("/api/v1/uploads", content=content, headers=bob).json()
    assert again["digest"] == digest
    stored = api.cell.home.upload_path(digest).read_bytes()
    assert blake3.blake3(stored).hexdigest() == digest, stored


def test_stalled_uploads_do_not_freeze_the_api(make_cell: Callable[..., Cell]) -> None:
    """Was: each upload holds a thread of anyio's default limiter (40) for as long
    as its body takes to arrive, and every sync route (and the sync ``current_user``
    dependency) needs a thread from the same limiter: 40 slow uploads from one user
    and the whole API (REST, OGC, files) stops answering."""
    uvicorn = pytest.importorskip("uvicorn")
    cell = make_cell("stall")
    token = cell.add_user("alice")["token"]
    app = create_app(cell=cell, start_worker=False, callbacks=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    stalled = []
    try:
        for _ in range(40):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(f"POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         f"Bearer {token}\r\nContent-Length: 1000000\r\n\r\nabc".encode())
            stalled.append(conn)
        time.sleep(0.5)
        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", timeout=3,
                           headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
    finally:
        for conn in stalled:
            conn.close()
        server.should_exit = True
        thread.join(10)


# -- callbacks -----------------------------------------------------------------------
N_JOBS = 168   # 504 open rows: the newest job's lie past the 500 read
TOOLS = '''
def quick():
    return {"quick": True}
'''


@contextlib.contextmanager
def sender(cell: Cell, policy: RetryPolicy) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        callbacks.run(cell, stop, policy=policy, poll_s=0.05)), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()


@contextlib.contextmanager
def dripping_receiver(seconds: float) -> Iterator[str]:
    """Answers every request one byte at a time, 0.1 s apart, for ``seconds``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    done = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            deadline = time.time() + seconds
            while time.time() < deadline and not done.is_set():
                conn.sendall(b"a")      # the headers never end: each byte resets httpx's
                time.sleep(0.1)         # per-read timeout
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/drip"
    finally:
        done.set()
        listener.close()


def test_a_dripping_receiver_is_cut_off_at_the_timeout(api: Api, tmp_path: Path) -> None:
    """Fixed: ``timeout_s`` was passed to httpx as per-phase timeouts, so a receiver
    that sends a byte every 0.1 s holds one POST (and a slot of the sender's
    16) indefinitely; the docs promise it bounds the whole POST."""
    (tmp_path / "cb_review.py").write_text(textwrap.dedent(TOOLS))
    api.cell.register_runner({"name": "quick", "python": "cb_review:quick",
                              "python_path": [str(tmp_path)]})
    me = api.user("ann")
    with dripping_receiver(8.0) as uri:
        answer = api.client.post("/processes/quick/execution", headers=me,
                                 json={"inputs": {}, "subscriber": {"successUri": uri}})
        job_id = answer.json()["jobID"]
        api.run_worker()
        policy = RetryPolicy(max_attempts=1, backoff_s=0.1, timeout_s=0.5)
        with sender(api.cell, policy):
            wait_for(lambda: subscribers.deliveries(api.cell, job_id)[0]["attempts"] >= 1,
                     3.0, "the attempt to be cut off after about 0.5 s")


def test_many_waiting_callbacks_do_not_starve_newer_ones(api: Api) -> None:
    """Fixed: ``open_deliveries`` read only the 500 oldest open rows; ~170 queued
    jobs with three callbacks each fill them, and a newer job's due callback is never
    looked at until those jobs end."""
    alice = "alice"
    spec = {"label": "q", "steps": [{"runner": "join"}]}
    jobs = [api.cell.submit(spec, owner=alice, dedup=False).job_id for _ in range(N_JOBS)]
    uris = {"inProgress": "http://127.0.0.1:9/a", "success": "http://127.0.0.1:9/b",
            "failed": "http://127.0.0.1:9/c"}
    for job_id in jobs:
        subscribers.subscribe(api.cell, job_id, uris, owner=alice, base_url="http://x")
    newest = jobs[-1]
    api.cell.store.apply(Changes(jobs=[JobUpdate(newest, {"state": "succeeded"})]))
    ready = subscribers.due_deliveries(api.cell)
    assert any(row.job_id == newest and row.kind == "success" for row in ready)


# -- authorization (holds) ---------------------------------------------------------------
def test_another_users_upload_cannot_be_named_by_rest_or_ogc(api: Api) -> None:
    """Holds: a digest uploaded only by alice is refused for bob on both front ends."""
    alice, bob = api.user("alice"), api.user("bob")
    digest = api.client.post("/api/v1/uploads", content=b"secret", headers=alice
                             ).json()["digest"]
    spec = {"label": "x", "steps": [{"runner": "join", "files": {"s": digest}}]}
    problem(api.client.post("/api/v1/jobs", json=spec, headers=bob), 400)
    answer = api.client.post("/processes/join/execution", headers=bob,
                             json={"inputs": {"files": {"s": digest}}})
    problem(answer, 400)


def test_another_users_job_is_hidden_from_ogc_and_callbacks(api: Api) -> None:
    """Holds: bob cannot see, dismiss or read results of alice's OGC job."""
    alice, bob = api.user("alice"), api.user("bob")
    job = api.client.post("/processes/join/execution", headers=alice,
                          json={"inputs": {}}).json()["jobID"]
    for method, path in (("GET", f"/jobs/{job}"), ("GET", f"/jobs/{job}/results"),
                         ("DELETE", f"/jobs/{job}"), ("GET", f"/api/v1/jobs/{job}/events"),
                         ("GET", f"/api/v1/jobs/{job}/logs"),
                         ("DELETE", f"/api/v1/jobs/{job}")):
        problem(api.client.request(method, path, headers=bob), 404)
    assert api.cell.status(job)["state"] == "queued"
    listed = api.client.get("/jobs", headers=bob).json()["jobs"]
    assert listed == []


def test_profiles_follow_upload_bytes_and_the_count_param(api: Api) -> None:
    """Holds: the first profile whose thresholds hold is chosen and recorded."""
    api.register("prof", ["join", "{input_dir}", "{output_dir}"],
                 params={"n": {"type": "integer", "default": 5}},
                 resources={"memory_mb": 100},
                 profiles=[{"name": "preview", "max_input_bytes": 10, "count_param": "n",
                            "max_count": 10, "resources": {"memory_mb": 50}},
                           {"name": "fullres", "resources": {"memory_mb": 1000}}])
    alice = api.user("alice")
    small = api.client.post("/api/v1/uploads", content=b"12345", headers=alice
                            ).json()["digest"]
    big = api.client.post("/api/v1/uploads", content=b"x" * 100, headers=alice
                          ).json()["digest"]
    cases = [({}, "preview", 50), ({"files": {"s": small}}, "preview", 50),
             ({"files": {"b": big}}, "fullres", 1000), ({"params": {"n": 11}}, "fullres", 1000)]
    for step, profile, memory in cases:
        spec = {"label": "p", "steps": [{"runner": "prof", **step}]}
        job = api.client.post("/api/v1/jobs", json=spec, headers=alice).json()["job_id"]
        [row] = api.client.get(f"/api/v1/jobs/{job}", headers=alice).json()["steps"]
        assert (row["profile"], row["memory_mb"]) == (profile, memory), step



def test_a_cache_hit_does_not_show_another_owners_job_id(api: Api) -> None:
    """Was: OGC executions all have the label 'ogc' (one cache namespace), so bob's
    step is a cache copy of alice's, and bob's events name alice's job
    (``step_cached``: ``source_job``), which /api/v1/scheduler takes care to hide."""
    alice, bob = api.user("alice"), api.user("bob")
    body = {"inputs": {}}
    first = api.client.post("/processes/join/execution", headers=alice, json=body)
    api.run_worker()
    second = api.client.post("/processes/join/execution", headers=bob, json=body)
    api.run_worker()
    mine, theirs = second.json()["jobID"], first.json()["jobID"]
    events = api.client.get(f"/api/v1/jobs/{mine}/events", headers=bob)
    assert events.status_code == 200
    assert theirs not in events.text
    assert theirs not in api.client.get(f"/api/v1/jobs/{mine}", headers=bob).text


class CountingReceiver:
    """Records POSTs; answers 200 after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.posts.append(self.path)
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_delivered_callback_is_not_sent_again_from_a_stale_read(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: the sender skips jobs in flight, but a read of the due rows that
    started while a job's POST was in flight and ends after it finished hands the
    already-delivered row to a new task: the receiver gets it twice (the read is
    slowed here to widen the window; a busy database does the same)."""
    (tmp_path / "cb_review2.py").write_text(textwrap.dedent(TOOLS))
    api.cell.register_runner({"name": "quick", "python": "cb_review2:quick",
                              "python_path": [str(tmp_path)]})
    original = subscribers.due_deliveries

    def slow_read(*args: object, **kwargs: object) -> object:
        rows = original(*args, **kwargs)   # type: ignore[arg-type]
        time.sleep(0.5)
        return rows

    monkeypatch.setattr(subscribers, "due_deliveries", slow_read)
    receiver = CountingReceiver(delay_s=0.2)
    try:
        me = api.user("ann")
        answer = api.client.post("/processes/quick/execution", headers=me, json={
            "inputs": {}, "subscriber": {"successUri": f"{receiver.url}/ok"}})
        job_id = answer.json()["jobID"]
        api.run_worker()
        with sender(api.cell, RetryPolicy(max_attempts=3, backoff_s=0.1, timeout_s=2)):
            wait_for(lambda: subscribers.deliveries(api.cell, job_id)[0]["state"] == "done",
                     10, "the delivery")
            time.sleep(2.0)
        assert receiver.posts == ["/ok"]
    finally:
        receiver.close()


def test_the_step_cache_tells_files_apart_by_content_and_name(api: Api) -> None:
    """Holds: a step is a cache copy only when its files have the same names and bytes."""
    alice = api.user("alice")
    one = api.client.post("/api/v1/uploads", content=b"one", headers=alice).json()["digest"]
    two = api.client.post("/api/v1/uploads", content=b"two", headers=alice).json()["digest"]
    states = []
    for files in ({"d": one}, {"d": two}, {"e": one}, {"d": one}):
        spec = {"label": "cache", "steps": [{"runner": "join", "files": files}]}
        job = api.cell.submit(spec, owner="alice", dedup=False).job_id
        api.run_worker()
        states.append(api.cell.status(job)["steps"][0]["state"])
    assert states == ["succeeded", "succeeded", "succeeded", "cached"]
