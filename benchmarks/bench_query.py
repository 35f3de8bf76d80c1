"""``status`` and ``list --label`` at 100,000 stored jobs.

Populates a fresh cell (no worker, so every job stays queued) with one-step
jobs spread over a few labels, then times, each repeated:

* the Python API on an open cell: ``Cell.status(job_id)``, ``Cell.list(label=L)``;
* the per-invocation API cost: open a Cell, run the call, close it (what the
  CLI pays besides interpreter start-up and imports);
* the CLI as a user runs it, in a subprocess:
  ``jobcell status ID --json --home H`` and ``jobcell list --label L --json --home H``,
  next to the bare interpreter start-up and ``import jobcell.cli`` for scale.

Target (issue 2): under 50 ms each.

    .venv/bin/python benchmarks/bench_query.py [--jobs 100000] [--repeat 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    NOOP_RUNNER,
    clean_env,
    emit,
    filesystem,
    machine,
    summary_ms,
    temp_home,
    timed,
)

from jobcell.service import Cell

TARGET_MS = 50.0
LABELS = ("genomics", "imaging", "climate", "chemistry", "physics")
RARE_LABEL = "rare"
RARE_COUNT = 50
BATCH = 10_000


def populate(cell: Cell, count: int) -> tuple[list[str], float]:
    """Store ``count`` queued jobs (plus a few under a rare label); return their ids.

    ``cache: false`` skips the per-job dedup lookup, which today scans every job of the
    owner (see bench_submit.py); with it, populating 100,000 jobs would take many minutes.
    """
    ids: list[str] = []
    begin = time.perf_counter()
    for start in range(0, count, BATCH):
        specs = [{"label": LABELS[i % len(LABELS)], "tags": [f"t{i % 10}", "bench"],
                  "cache": False,  # skip the dedup lookup: see bench_submit.py --preload
                  "steps": [{"runner": "noop", "params": {"n": i}}]}
                 for i in range(start, min(count, start + BATCH))]
        ids.extend(r.job_id for r in cell.submit_many(specs))
    rare = [{"label": RARE_LABEL, "cache": False,
             "steps": [{"runner": "noop", "params": {"n": -1 - i}}]} for i in range(RARE_COUNT)]
    ids.extend(r.job_id for r in cell.submit_many(rare))
    return ids, time.perf_counter() - begin


def query_plans(db_path: Path, label: str) -> dict[str, list[str]]:
    """SQLite's plans for the list and status queries (for the report)."""
    conn = sqlite3.connect(db_path)
    try:
        plans = {}
        for name, sql, args in (
            ("list --label", "SELECT * FROM jobs WHERE label = ? "
             "ORDER BY created_at DESC, job_id DESC LIMIT 100 OFFSET 0", (label,)),
            ("status (job)", "SELECT * FROM jobs WHERE job_id = ?", ("x",)),
            ("status (steps)", "SELECT * FROM steps WHERE job_id = ? ORDER BY idx", ("x",)),
        ):
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
            plans[name] = [r[-1] for r in rows]
        return plans
    finally:
        conn.close()


def cli_command() -> list[str]:
    """How to start the ``jobcell`` command with this interpreter."""
    script = Path(sys.executable).parent / "jobcell"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from jobcell.cli import main; main()"]


def run_quiet(argv: list[str]) -> Callable[[], None]:
    def call() -> None:
        done = subprocess.run(argv, capture_output=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200, help="calls per API measurement")
    parser.add_argument("--cli-repeat", type=int, default=20, help="calls per CLI measurement")
    parser.add_argument("--base", help="directory for the temporary cell home")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    rng = random.Random(7)
    print(f"machine: {machine()}")
    measures: dict[str, dict[str, float]] = {}

    def record(name: str, times: list[float]) -> None:
        measures[name] = summary_ms(times)
        s = measures[name]
        print(f"  {name:<44} median {s['median_ms']:8.2f} ms   p95 {s['p95_ms']:8.2f} ms   "
              f"(n={s['n']})", flush=True)

    with temp_home(base=args.base) as home:
        with Cell(home, auto_worker=False) as cell:
            cell.register_runner(dict(NOOP_RUNNER))
            ids, populate_s = populate(cell, args.jobs)
            stored = cell.store.count_jobs()
            print(f"populated {stored} jobs in {populate_s:.1f} s "
                  f"({args.jobs / populate_s:.0f} jobs/s) on {filesystem(home)}; "
                  f"db {home.joinpath('state.db').stat().st_size / 1e6:.0f} MB")
            label = LABELS[0]
            sample = [rng.choice(ids) for _ in range(args.repeat)]
            it = iter(sample)
            for call in (lambda: cell.status(ids[0]), lambda: cell.list(label=label)):
                call()  # warm the connection and page cache
            print("Python API, open cell:")
            record("Cell.status(random id)", timed(lambda: cell.status(next(it)), args.repeat))
            record(f"Cell.list(label={label!r})  [100 of ~{args.jobs // len(LABELS)}]",
                   timed(lambda: cell.list(label=label), args.repeat))
            record(f"Cell.list(label={RARE_LABEL!r})  [{RARE_COUNT}]",
                   timed(lambda: cell.list(label=RARE_LABEL), args.repeat))
            record(f"Cell.list(label={label!r}, state='queued')",
                   timed(lambda: cell.list(label=label, state="queued"), args.repeat))
            record("Cell.list(tag='t3')", timed(lambda: cell.list(tag="t3"), args.repeat))
            record(f"Cell.list(label={label!r}, limit=1000)",
                   timed(lambda: cell.list(label=label, limit=1000), max(10, args.repeat // 10)))
        plans = query_plans(home / "state.db", label)

        def fresh_status() -> None:
            with Cell(home, auto_worker=False) as opened:
                opened.status(rng.choice(ids))

        def fresh_list() -> None:
            with Cell(home, auto_worker=False) as opened:
                opened.list(label=label)

        print("Python API, a new Cell per call (open + call + close):")
        per_call = max(20, args.repeat // 4)
        record("Cell(home) + status + close", timed(fresh_status, per_call))
        record("Cell(home) + list(label) + close", timed(fresh_list, per_call))

        have_cli = importlib.util.find_spec("jobcell.cli") is not None
        if have_cli:
            print("CLI in a subprocess (interpreter start-up + imports + call):")
            cli = cli_command()
            n = args.cli_repeat
            record("python -c pass", timed(run_quiet([sys.executable, "-c", "pass"]), n))
            record("python -c 'import jobcell.cli, jobcell.service'",
                   timed(run_quiet([sys.executable, "-c",
                                    "import jobcell.cli, jobcell.service"]), n))
            record("jobcell --version", timed(run_quiet([*cli, "--version"]), n))
            status_argv = [*cli, "status", ids[len(ids) // 2], "--json", "--home", str(home)]
            list_argv = [*cli, "list", "--label", label, "--json", "--home", str(home)]
            floor = ("import sys, click; from jobcell.store.sqlite import SQLiteStore; "
                     "print(SQLiteStore(sys.argv[1]).get_job(sys.argv[2]).state)")
            record("floor: python + click + SQLiteStore.get_job",
                   timed(run_quiet([sys.executable, "-c", floor, str(home / "state.db"),
                                    ids[len(ids) // 2]]), n))
            record("jobcell status ID --json", timed(run_quiet(status_argv), n))
            record(f"jobcell list --label {label} --json", timed(run_quiet(list_argv), n))
        else:
            print("CLI: src/jobcell/cli.py is not there; only the Python API was measured")

    print("query plans:")
    for name, steps in plans.items():
        print(f"  {name}: {' | '.join(steps)}")
    targets: list[dict[str, Any]] = []
    for name, key in (("status (Python API)", "Cell.status(random id)"),
                      ("list --label (Python API)",
                       next(k for k in measures if k.startswith(f"Cell.list(label={label!r})"))),
                      ("status (CLI subprocess)", "jobcell status ID --json"),
                      ("list --label (CLI subprocess)", f"jobcell list --label {label} --json")):
        if key in measures:
            value = measures[key]["median_ms"]
            targets.append({"name": f"{name}, median", "value": value, "unit": "ms",
                            "target": f"< {TARGET_MS:g} ms", "passed": value < TARGET_MS,
                            "p95_ms": measures[key]["p95_ms"]})
    emit({"benchmark": "query", "machine": machine(), "jobs": stored, "measures": measures,
          "plans": plans, "populate_s": populate_s, "cli": have_cli, "targets": targets},
         args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
