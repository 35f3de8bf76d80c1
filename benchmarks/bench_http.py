"""The REST API under load: ``jobcell serve`` over a cell holding 100,000 jobs.

Fills a fresh cell with finished one-step jobs (rows written straight into the store
in batches, spread over 5 labels and 2 users), starts a real ``jobcell serve --no-worker``
on 127.0.0.1 in a subprocess, and drives it with 16 concurrent httpx clients (one
process, asyncio): after a warm-up, each endpoint gets ``--requests`` requests:

* ``GET /api/v1/jobs/{id}``: a random job of the requesting user;
* ``GET /api/v1/jobs?label=L``: the first page (limit 100) of a random label.

Each request carries a user's bearer token (so authentication is in the figure). Latency
is measured in the client, from sending the request to reading the whole response; the
client shares the machine with the server, as wrk would; the CPU milliseconds per request
of each (server process, load client) are printed beside the latencies, so a run on a
small machine shows where its cores went. Target (issue 5): p99 < 50 ms.

    .venv/bin/python benchmarks/bench_http.py [--jobs 100000] [--requests 4000] [--clients 16]
        [--load-client raw] [--server-workers 2] [--reuse DIR]

``--reuse DIR`` keeps the populated cell in DIR (with the job ids and tokens in
``DIR/bench.json``) and uses it again on the next run with the same ``--jobs``, so repeated
runs skip populating. ``--server-workers N`` runs ``jobcell serve --workers N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import psutil
from _common import NOOP_RUNNER, clean_env, emit, filesystem, machine, percentile, temp_home

from jobcell.model.spec import compile_spec
from jobcell.model.states import JobState, StepState
from jobcell.service import Cell, new_job_id
from jobcell.store import JobRow, NewEvent

TARGET_MS = 50.0
LABELS = ("genomics", "imaging", "climate", "chemistry", "physics")
USERS = ("alice", "bob")
BATCH = 10_000


def populate(cell: Cell, count: int) -> tuple[dict[str, list[str]], float]:
    """Store ``count`` succeeded one-step jobs straight through ``Store.insert_jobs``.

    The rows are what ``Cell.submit`` would store for a ``noop`` step (compiled once per
    label), marked succeeded, with creation times spread over the last day. Answers
    each user's job ids and the seconds it took.
    """
    runners = cell.runners()
    templates = {label: compile_spec({"label": label, "steps": [{"runner": "noop"}]}, runners)
                 for label in LABELS}
    rows_of = {label: Cell._job_row(job, USERS[0], 0.0) for label, job in templates.items()}
    ids: dict[str, list[str]] = {user: [] for user in USERS}
    start = time.time() - 86_400
    begin = time.perf_counter()
    for first in range(0, count, BATCH):
        jobs: list[JobRow] = []
        events: list[NewEvent] = []
        for i in range(first, min(count, first + BATCH)):
            label, owner = LABELS[i % len(LABELS)], USERS[(i // len(LABELS)) % len(USERS)]
            created = start + i * 86_400 / count
            job_id = new_job_id(created)
            template = rows_of[label]
            step = dataclasses.replace(template.steps[0], job_id=job_id, params={"n": i},
                                       state=StepState.SUCCEEDED, attempt=1, owner=owner)
            jobs.append(dataclasses.replace(
                template, job_id=job_id, owner=owner, tags=[f"t{i % 10}", "bench"],
                state=JobState.SUCCEEDED, spec_hash=f"{i:064x}", created_at=created,
                updated_at=created + 0.5, finished_at=created + 0.5, steps=[step]))
            events.append(NewEvent(job_id, "submitted", created, None,
                                   {"owner": owner, "steps": 1}))
            ids[owner].append(job_id)
        cell.store.insert_jobs(jobs, events)
    return ids, time.perf_counter() - begin


def cli_command() -> list[str]:
    """How to start the ``jobcell`` command with this interpreter."""
    script = Path(sys.executable).parent / "jobcell"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from jobcell.cli import main; main()"]


def start_server(home: Path, log: Path,
                 workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """``jobcell serve --no-worker`` on a free loopback port; answers the process and URL."""
    argv = [*cli_command(), "serve", "--home", str(home), "--port", "0", "--no-worker",
            "--log-level", "warning", "--json"]
    if workers != 1:
        argv += ["--workers", str(workers)]
    with log.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=err)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(f"jobcell serve exited {process.returncode}: {log.read_text()[-2000:]}")
    return process, str(json.loads(line)["url"])


def _cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` and its live children so far (the worker
    processes of ``--workers N``; they live as long as the server)."""
    total = 0.0
    for one in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = one.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def bench_cell(args: argparse.Namespace) -> Iterator[tuple[Path, dict[str, list[str]],
                                                           dict[str, str], int, float | None]]:
    """The populated cell: home, each user's job ids, tokens, job count, populate seconds
    (None when reused).

    Fresh in a temporary directory, or kept in (and taken again from) ``--reuse DIR``.
    """
    if args.reuse:
        root = Path(args.reuse)
        saved = root / "bench.json"
        home = root / "home"
        if saved.exists():
            data = json.loads(saved.read_text())
            if data["jobs"] == args.jobs:
                print(f"reusing the cell in {root} ({data['jobs']} jobs)")
                yield home, data["ids"], data["tokens"], data["jobs"], None
                return
            saved.unlink()                  # another --jobs: populate again
        shutil.rmtree(home, ignore_errors=True)     # (or what an interrupted run left)
        root.mkdir(parents=True, exist_ok=True)
        home, ids, tokens, stored, populate_s = _fill(home, args.jobs)
        saved.write_text(json.dumps({"jobs": stored, "ids": ids, "tokens": tokens}))
        yield home, ids, tokens, stored, populate_s
        return
    with temp_home(base=args.base) as home:
        yield _fill(home, args.jobs)


def _fill(home: Path, count: int) -> tuple[Path, dict[str, list[str]], dict[str, str], int,
                                           float]:
    with Cell(home, auto_worker=False) as cell:
        cell.register_runner(dict(NOOP_RUNNER))
        ids, populate_s = populate(cell, count)
        tokens = {user: cell.add_user(user)["token"] for user in USERS}
        stored = cell.store.count_jobs()
    return home, ids, tokens, stored, populate_s


# A request: the path with its query, and the headers.
Request = Callable[[random.Random], tuple[str, dict[str, str]]]
Fetch = Callable[[str, dict[str, str]], Awaitable[int]]


@contextlib.asynccontextmanager
async def httpx_fetchers(url: str, clients: int) -> AsyncIterator[list[Fetch]]:
    """One ``httpx.AsyncClient`` with a keep-alive connection per concurrent client."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def fetch(target: str, headers: dict[str, str]) -> int:
            answer = await client.get(target, headers=headers)
            await answer.aread()
            return answer.status_code

        yield [fetch] * clients


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a request line, headers,
    then the ``Content-Length`` body. It spends far less CPU per request than httpx, so
    on a small machine the load generator takes less of the server's cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str, headers: dict[str, str]) -> int:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        self.writer.write("\r\n".join(lines).encode("latin-1"))
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *fields = head.split("\r\n")
        length, close = None, False
        for field in fields:
            name, _, value = field.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise RuntimeError(f"{target}: a chunked answer (not expected here)")
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length is None:
            raise RuntimeError(f"{target}: an answer without Content-Length")
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split(" ", 2)[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


@contextlib.asynccontextmanager
async def raw_fetchers(url: str, clients: int) -> AsyncIterator[list[Fetch]]:
    """One :class:`RawConnection` per concurrent client."""
    where = urlsplit(url)
    connections = [RawConnection(where.hostname or "127.0.0.1", where.port or 80)
                   for _ in range(clients)]
    try:
        yield [c.get for c in connections]
    finally:
        for connection in connections:
            await connection.close()


CLIENTS = {"httpx": httpx_fetchers, "raw": raw_fetchers}


async def drive(url: str, client: str, make: Request, clients: int, warmup: int, count: int,
                seed: int) -> dict[str, Any]:
    """``count`` requests from ``clients`` concurrent tasks (after ``warmup`` unmeasured)."""
    async with CLIENTS[client](url, clients) as fetchers:

        async def phase(total: int, latencies: list[float] | None) -> int:
            remaining = [total]
            failures = [0]

            async def one_client(number: int) -> None:
                rng = random.Random(seed * 1000 + number)
                fetch = fetchers[number]
                while remaining[0] > 0:
                    remaining[0] -= 1
                    target, headers = make(rng)
                    begin = time.perf_counter()
                    status = await fetch(target, headers)
                    elapsed = time.perf_counter() - begin
                    if status != 200:
                        failures[0] += 1
                    if latencies is not None:
                        latencies.append(elapsed)

            await asyncio.gather(*(one_client(n) for n in range(clients)))
            return failures[0]

        await phase(warmup, None)
        latencies: list[float] = []
        begin = time.perf_counter()
        failures = await phase(count, latencies)
        wall = time.perf_counter() - begin
    return {"n": len(latencies), "failures": failures, "wall_s": wall,
            "requests_per_s": len(latencies) / wall,
            "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=4000, help="measured, per endpoint")
    parser.add_argument("--warmup", type=int, default=400, help="unmeasured, per endpoint")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--load-client", nargs="+", choices=sorted(CLIENTS),
                        default=["httpx", "raw"], help="which load generators to run")
    parser.add_argument("--base", help="directory for the temporary cell home")
    parser.add_argument("--reuse", metavar="DIR",
                        help="keep the populated cell in DIR and reuse it on later runs")
    parser.add_argument("--server-workers", type=int, default=1, metavar="N",
                        help="server worker processes (jobcell serve --workers N)")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    measures: dict[str, dict[str, Any]] = {}
    with bench_cell(args) as (home, ids, tokens, stored, populate_s):
        filled = "reused" if populate_s is None else f"populated in {populate_s:.1f} s"
        print(f"{stored} jobs ({filled}) on {filesystem(home)}; "
              f"db {home.joinpath('state.db').stat().st_size / 1e6:.0f} MB", flush=True)
        process, url = start_server(home, home.parent / "serve.log", args.server_workers)
        try:
            auth = {user: {"Authorization": f"Bearer {tokens[user]}"} for user in USERS}

            def status(rng: random.Random) -> tuple[str, dict[str, str]]:
                user = rng.choice(USERS)
                return f"/api/v1/jobs/{rng.choice(ids[user])}", auth[user]

            def first_page(rng: random.Random) -> tuple[str, dict[str, str]]:
                user = rng.choice(USERS)
                query = urlencode({"label": rng.choice(LABELS), "limit": 100})
                return f"/api/v1/jobs?{query}", auth[user]

            check_answers(url, ids, auth)
            print(f"server: {args.server_workers} process(es); "
                  f"{args.clients} concurrent clients, {args.warmup} warm-up + "
                  f"{args.requests} measured requests per endpoint against {url}; CPU ms per "
                  "request of the server process and of the load client")
            print(f"  {'endpoint':<36} {'client':<6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
                  f"{'p99 ms':>7} {'max ms':>7} {'errors':>6} {'srv cpu':>7} {'cli cpu':>7}")
            server_cpu = psutil.Process(process.pid)
            for client in args.load_client:
                for endpoint, make in (("GET /api/v1/jobs/{id}", status),
                                       ("GET /api/v1/jobs?label=L (limit 100)", first_page)):
                    before = (_cpu_s(server_cpu), time.process_time())
                    m = asyncio.run(drive(url, client, make, args.clients, args.warmup,
                                          args.requests, seed=len(measures)))
                    total = args.warmup + args.requests   # CPU of the warm-up included
                    m["server_cpu_ms"] = (_cpu_s(server_cpu) - before[0]) / total * 1000
                    m["client_cpu_ms"] = (time.process_time() - before[1]) / total * 1000
                    m.update(endpoint=endpoint, client=client)
                    measures[f"{endpoint} [{client}]"] = m
                    print(f"  {endpoint:<36} {client:<6} {m['requests_per_s']:7.0f} "
                          f"{m['p50_ms']:7.2f} {m['p90_ms']:7.2f} {m['p99_ms']:7.2f} "
                          f"{m['max_ms']:7.2f} {m['failures']:6d} {m['server_cpu_ms']:7.2f} "
                          f"{m['client_cpu_ms']:7.2f}", flush=True)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    targets = [{"name": f"{m['endpoint']} p99, {args.clients} {m['client']} clients "
                        f"({m['requests_per_s']:,.0f} req/s)",
                "value": m["p99_ms"], "unit": "ms", "target": f"< {TARGET_MS:g} ms",
                "passed": m["p99_ms"] < TARGET_MS and m["failures"] == 0,
                "p50_ms": m["p50_ms"], "requests_per_s": m["requests_per_s"]}
               for m in measures.values()]
    emit({"benchmark": "http", "machine": machine(), "jobs": stored, "clients": args.clients,
          "server_workers": args.server_workers,
          "measures": measures, "populate_s": populate_s, "targets": targets}, args.json_out)
    print(json.dumps({"benchmark": "http", "jobs": stored, "clients": args.clients,
                      "measures": {name: {k: round(v, 2) if isinstance(v, float) else v
                                          for k, v in m.items()}
                                   for name, m in measures.items()}}))
    return 0 if all(m["failures"] == 0 for m in measures.values()) else 1


def check_answers(url: str, ids: dict[str, list[str]], auth: dict[str, dict[str, str]]) -> None:
    """The answers are what the benchmark says it measures."""
    with httpx.Client(base_url=url, timeout=60) as check:
        page = check.get("/api/v1/jobs", params={"label": LABELS[0], "limit": 100},
                         headers=auth[USERS[0]]).json()
        assert len(page["jobs"]) == 100 and page["next_offset"] == 100, page
        assert {j["owner"] for j in page["jobs"]} == {USERS[0]}
        assert {j["label"] for j in page["jobs"]} == {LABELS[0]}
        one = check.get(f"/api/v1/jobs/{ids[USERS[1]][0]}", headers=auth[USERS[1]])
        assert one.json()["state"] == "succeeded", one.text
        other = check.get(f"/api/v1/jobs/{ids[USERS[1]][0]}", headers=auth[USERS[0]])
        assert other.status_code == 404, other.text


if __name__ == "__main__":
    sys.exit(main())
