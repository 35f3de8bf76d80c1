"""``jobcell serve`` as a user runs it: a real server on 127.0.0.1, driven with httpx.

The module's server runs on a shared cell with the test runners; it starts the cell's
worker, so jobs submitted over HTTP run for real. Tests that stop a server start their own.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .helpers import JOBCELL, Cli, assert_clean_error, clean_env, poll, write_spec

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    """One ``jobcell serve`` process; its stdout and stderr go to files (never a pipe
    that could fill up)."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    info: dict[str, Any]

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def log(self) -> str:
        return (f"--- serve stdout ---\n{self.stdout.read_text(errors='replace')}\n"
                f"--- serve stderr ---\n{self.stderr.read_text(errors='replace')}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"jobcell serve ignored signal {sig}\n{self.log()}") \
                    from None
        return int(self.process.returncode)


def start_server(cli: Cli, folder: Path, *args: str, port: int | None = None) -> Served:
    """Start ``jobcell serve --json`` and wait for the line saying where it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "serve.out", folder / "serve.err"
    argv = [str(JOBCELL), "serve", "--port", str(free_port() if port is None else port),
            "--json", "--home", str(cli.home), *args]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   env=clean_env(cli.env))
    served = Served(process, stdout, stderr, {})

    def announced() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"jobcell serve exited {process.returncode}\n{served.log()}")
        first = stdout.read_text().partition("\n")
        return json.loads(first[0]) if first[1] else None

    try:
        served.info = poll(announced, timeout=30, what="jobcell serve to listen")
    except BaseException:
        served.stop()
        raise
    return served


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def tokens(shared_cli: Cli) -> dict[str, str]:
    return {name: shared_cli.json("users", "add", name)["token"] for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def server(shared_cli: Cli, tokens: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = start_server(shared_cli, tmp_path_factory.mktemp("serve"))
    yield served
    code = served.stop()
    assert code == 0, served.log()


@pytest.fixture(scope="module")
def http(server: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def wait_for_job(http: httpx.Client, token: str, job_id: str,
                 timeout: float = 60) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        answer = http.get(f"/api/v1/jobs/{job_id}", headers=bearer(token))
        assert answer.status_code == 200, answer.text
        status: dict[str, Any] = answer.json()
        return status if status["state"] in TERMINAL else None

    return poll(finished, timeout=timeout, interval=0.1, what=f"job {job_id} to end")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def finished_job(http: httpx.Client, tokens: dict[str, str]) -> dict[str, Any]:
    """A job submitted over HTTP by alice, run by the worker that serve started."""
    spec = {"label": "http-acceptance", "tags": ["served"],
            "steps": [{"id": "write", "runner": "writer",
                       "params": {"text": "hi ", "repeat": 2}}]}
    answer = http.post("/api/v1/jobs", json=spec, headers=bearer(tokens["alice"]))
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["deduplicated"] is False
    assert answer.headers["location"].endswith(f"/api/v1/jobs/{body['job_id']}")
    status = wait_for_job(http, tokens["alice"], body["job_id"])
    return status


def test_landing_page_and_openapi(http: httpx.Client, server: Served) -> None:
    landing = http.get("/")
    assert landing.status_code == 200, landing.text
    hrefs = [link["href"] for link in landing.json()["links"]]
    assert server.url + "/conformance" in hrefs, hrefs
    document = http.get("/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    for route in ("/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/result",
                  "/api/v1/uploads", "/api/v1/me", "/processes", "/jobs/{job_id}"):
        assert route in paths, route
    assert server.info["host"] == "127.0.0.1" and server.info["worker_pid"] > 0


def test_me_needs_a_valid_token(http: httpx.Client, tokens: dict[str, str]) -> None:
    missing = http.get("/api/v1/me")
    assert missing.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in missing.json()["detail"]
    wrong = http.get("/api/v1/me", headers=bearer("jc_" + "x" * 43))
    assert wrong.status_code == 401
    assert http.get("/api/v1/me", headers=bearer(tokens["alice"])).json() == {"user": "alice"}


def test_job_over_http_matches_the_cli(http: httpx.Client, shared_cli: Cli,
                                       tokens: dict[str, str],
                                       finished_job: dict[str, Any]) -> None:
    job_id = finished_job["job_id"]
    assert finished_job["state"] == "succeeded", finished_job
    assert finished_job["owner"] == "alice"
    # The same status document as `jobcell status --json`.
    assert finished_job == shared_cli.json("status", job_id)

    alice = bearer(tokens["alice"])
    page = http.get("/api/v1/jobs", params={"label": "http-acceptance"}, headers=alice).json()
    assert [j["job_id"] for j in page["jobs"]] == [job_id]
    assert page["next_offset"] is None

    result = http.get(f"/api/v1/jobs/{job_id}/result", headers=alice)
    assert result.status_code == 200, result.text
    assert result.json()["state"] == "succeeded"
    logs = http.get(f"/api/v1/jobs/{job_id}/logs", params={"last_n": 2, "step": "write"},
                    headers=alice)
    assert logs.status_code == 200, logs.text
    assert "stdout line 3" in json.dumps(logs.json())

    # Another user: the job does not exist for them.
    bob = bearer(tokens["bob"])
    assert http.get(f"/api/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert http.get(f"/api/v1/jobs/{job_id}/outputs", headers=bob).status_code == 404
    assert http.get("/api/v1/jobs", params={"label": "http-acceptance"},
                    headers=bob).json()["jobs"] == []


def test_download_through_signed_urls(http: httpx.Client, tokens: dict[str, str],
                                      finished_job: dict[str, Any], server: Served) -> None:
    job_id = finished_job["job_id"]
    outputs = http.get(f"/api/v1/jobs/{job_id}/outputs", headers=bearer(tokens["alice"]))
    assert outputs.status_code == 200, outputs.text
    [entry] = [o for o in outputs.json() if o["name"] == "out.txt"]
    assert entry["size"] == 6 and "path" not in entry
    href = entry["href"]
    assert href.startswith(server.url + "/api/v1/files/")

    # The signed URL is the credential: no bearer token.
    whole = httpx.get(href, timeout=30)
    assert whole.status_code == 200 and whole.content == b"hi hi "
    part = httpx.get(href, headers={"Range": "bytes=3-4"}, timeout=30)
    assert part.status_code == 206 and part.content == b"hi"
    assert part.headers["content-range"] == "bytes 3-4/6"

    tampered = href.replace("expires=", "expires=1")
    assert httpx.get(tampered, timeout=30).status_code == 403
    unsigned = href.split("?")[0]
    assert httpx.get(unsigned, timeout=30).status_code == 403


def test_uploaded_file_as_step_input(http: httpx.Client, shared_cli: Cli,
                                     tokens: dict[str, str], tmp_path: Path) -> None:
    alice = bearer(tokens["alice"])
    sent = http.post("/api/v1/uploads", content=b"uploaded over http",
                     headers={**alice, "Content-Type": "application/octet-stream"})
    assert sent.status_code == 201, sent.text
    over_http = sent.json()["digest"]
    # `jobcell upload` stores the same way, for an owner given on the command line.
    local = tmp_path / "local.txt"
    local.write_bytes(b"uploaded from the CLI")
    from_cli = shared_cli.json("upload", str(local), "--owner", "alice")
    assert from_cli["size"] == len(b"uploaded from the CLI") and from_cli["owner"] == "alice"
    human = shared_cli.ok("upload", str(local), "--owner", "alice").stdout
    assert from_cli["digest"] in human and "files" in human

    spec = {"label": "http-uploads", "steps": [{
        "runner": "join", "files": {"web/out.txt": over_http, "cli/out.txt": from_cli["digest"]}}]}
    # Uploads belong to their owner: bob may not name alice's.
    refused = http.post("/api/v1/jobs", json=spec, headers=bearer(tokens["bob"]))
    assert refused.status_code == 400 and "not an upload of yours" in refused.json()["detail"]

    submitted = http.post("/api/v1/jobs", json=spec, headers=alice)
    assert submitted.status_code == 201, submitted.text
    status = wait_for_job(http, tokens["alice"], submitted.json()["job_id"])
    assert status["state"] == "succeeded", status
    [joined] = http.get(f"/api/v1/jobs/{status['job_id']}/outputs", headers=alice).json()
    text = httpx.get(joined["href"], timeout=30).text
    assert text == "cli/out.txt=uploaded from the CLI\nweb/out.txt=uploaded over http\n"


def test_upload_command_errors(shared_cli: Cli, tmp_path: Path) -> None:
    results = shared_cli.run_many({"missing": ["upload", str(tmp_path / "nope.bin")],
                                   "folder": ["upload", str(tmp_path)]})
    assert_clean_error(results["missing"], "does not exist")
    assert_clean_error(results["folder"], "is a directory")
    piped = shared_cli.run("upload", "-", "--json", "--owner", "alice", stdin="from stdin")
    assert piped.returncode == 0, str(piped)
    assert piped.json["size"] == len("from stdin")


def test_revoked_token_is_refused(http: httpx.Client, shared_cli: Cli) -> None:
    token = shared_cli.json("users", "add", "carol")["token"]
    assert http.get("/api/v1/me", headers=bearer(token)).status_code == 200
    shared_cli.json("users", "revoke", "carol")
    refused = http.get("/api/v1/me", headers=bearer(token))
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]


def test_behind_a_proxy(shared_cli: Cli, tokens: dict[str, str], finished_job: dict[str, Any],
                        tmp_path: Path) -> None:
    """What the README's reverse-proxy set-up relies on: with --proxy-headers and
    --root-path the signed links point at the proxy's https URL under the prefix."""
    served = start_server(shared_cli, tmp_path, "--no-worker", "--proxy-headers",
                          "--forwarded-allow-ips", "127.0.0.1", "--root-path", "/jobcell",
                          "--log-level", "warning")
    try:
        headers = {**bearer(tokens["alice"]), "Host": "jobs.example.org",
                   "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
        answer = httpx.get(f"{served.url}/api/v1/jobs/{finished_job['job_id']}/outputs",
                           headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        href = answer.json()[0]["href"]
        assert href.startswith("https://jobs.example.org/jobcell/api/v1/files/"), href
        # What the proxy forwards after stripping /jobcell is served and the signature holds.
        local = served.url + href.removeprefix("https://jobs.example.org/jobcell")
        assert httpx.get(local, timeout=30).content == b"hi hi "
    finally:
        assert served.stop(signal.SIGTERM) == 0, served.log()


def test_ctrl_c_stops_the_server_and_the_worker_goes_on(cli: Cli, tmp_path: Path) -> None:
    token = cli.json("users", "add", "dora")["token"]
    served = start_server(cli, tmp_path / "serve")
    gate = tmp_path / "gate"
    try:
        with httpx.Client(base_url=served.url, timeout=30) as http:
            answer = http.post("/api/v1/jobs", headers=bearer(token), json={
                "label": "gated", "steps": [{"runner": "gate", "params": {"gate": str(gate)}}]})
            assert answer.status_code == 201, answer.text
            job_id = answer.json()["job_id"]

            def running() -> bool:
                status = http.get(f"/api/v1/jobs/{job_id}", headers=bearer(token)).json()
                return bool(status["state"] == "running")

            poll(running, timeout=30, what="the gated job to run")
    except BaseException:
        served.stop()
        raise
    assert served.stop(signal.SIGINT) == 0, served.log()
    # stdout holds only the line saying where it listened; request logs went to stderr.
    lines = served.stdout.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["url"] == served.url, served.log()
    assert "GET /api/v1/jobs/" in served.stderr.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "/", timeout=5)

    # The worker outlives the server and finishes the job.
    assert cli.json("worker", "status")["alive"] is True
    gate.touch()
    waited = cli.run("wait", job_id, "--timeout", "60", "--json")
    assert waited.returncode == 0, str(waited)
    assert waited.json["state"] == "succeeded"


def test_human_output_and_sigterm(cli: Cli, tmp_path: Path) -> None:
    port = free_port()
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [str(JOBCELL), "serve", "--host", "0.0.0.0", "--port", str(port), "--no-worker",
             "--home", str(cli.home)], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            env=clean_env(cli.env))
    try:
        line = poll(lambda: out.read_text().strip(), timeout=30, what="the serve line")
        assert f"on http://0.0.0.0:{port}" in line and "no worker" in line, line
        # Not on loopback: a warning that TLS belongs to a reverse proxy.
        warning = err.read_text()
        assert "not a loopback address" in warning and "reverse proxy" in warning
        assert httpx.get(f"http://127.0.0.1:{port}/conformance", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, err.read_text()
    assert "server stopped" in err.read_text()
    assert not (cli.home / "worker.log").exists()   # --no-worker started none


def test_clear_errors_for_busy_port_and_bad_host(cli: Cli) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        results = cli.run_many({
            "busy": ["serve", "--port", port],
            "host": ["serve", "--host", "no-such-host.invalid"],
            "not_mine": ["serve", "--host", "192.0.2.1", "--port", "0"],
            "port_range": ["serve", "--port", "70000"],
            "root_path": ["serve", "--root-path", "jobcell/"],
            "forwarded": ["serve", "--forwarded-allow-ips", "10.0.0.1"],
        })
    assert_clean_error(results["busy"], f"port {port} on 127.0.0.1 is already in use")
    assert_clean_error(results["host"], "cannot listen on host 'no-such-host.invalid'")
    assert_clean_error(results["not_mine"], "192.0.2.1", "not an address of this machine")
    assert results["port_range"].returncode == 2 and "70000" in results["port_range"].stderr
    assert_clean_error(results["root_path"], "--root-path")
    assert_clean_error(results["forwarded"], "--proxy-headers")
    # Nothing started a worker for a server that never listened.
    assert not (cli.home / "worker.log").exists()


def test_spec_file_still_submits_next_to_the_server(server: Served, shared_cli: Cli,
                                                    tmp_path: Path,
                                                    tokens: dict[str, str]) -> None:
    """A job submitted with the CLI as alice shows up in her HTTP listing."""
    spec = write_spec(tmp_path, "spec.yaml", """\
        label: cli-side
        steps: [{runner: writer, params: {text: cli}}]
    """)
    job_id = shared_cli.submit(spec, "--owner", "alice")
    listed = httpx.get(f"{server.url}/api/v1/jobs", params={"label": "cli-side"},
                       headers=bearer(tokens["alice"]), timeout=30).json()
    assert [j["job_id"] for j in listed["jobs"]] == [job_id]


def test_several_server_processes(shared_cli: Cli, tokens: dict[str, str],
                                  finished_job: dict[str, Any], tmp_path: Path) -> None:
    """``serve --workers 2``: two server processes share the port and the cell; a job
    list with a token works through either, and SIGTERM stops them all."""
    served = start_server(shared_cli, tmp_path, "--workers", "2", "--no-worker",
                          "--log-level", "warning")
    try:
        assert served.info["workers"] == 2, served.info
        server = psutil.Process(served.process.pid)
        processes = poll(lambda: [p for p in server.children(recursive=True)
                                  if "spawn_main" in " ".join(p.cmdline())] or None,
                         timeout=30, what="the server processes")
        assert len(processes) == 2, processes

        def page(token: str) -> httpx.Response:
            # A new connection each time, so both processes get some of them.
            return httpx.get(f"{served.url}/api/v1/jobs",
                             params={"label": "http-acceptance", "limit": 10},
                             headers=bearer(token), timeout=30)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(page, [tokens["alice"]] * 24))
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            body = answer.json()
            assert [j["job_id"] for j in body["jobs"]] == [finished_job["job_id"]]
            assert body["jobs"][0]["state"] == "succeeded" and body["next_offset"] is None
        assert page(tokens["bob"]).json()["jobs"] == []    # owner-scoped in every process
        assert page("not-a-token").status_code == 401
    finally:
        code = served.stop(signal.SIGTERM)
    assert code == 0, served.log()
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "/", timeout=5)
