"""End-to-end throughput of one-step no-op jobs on the embedded executor.

Next to it, in the same process run, the raw spawn rate of the very same
wrapper script (``/bin/bash wrapper.sh ATTEMPT_DIR /bin/true``, each in its own
session, at the same concurrency as the cell's ``cpu_slots``): the ceiling that
the worker's own bookkeeping (SQLite, attempt directories, polling) eats into.

Targets (issue 2, on a 2-core machine): at least 200 jobs/s end to end, and at
least 50% of the raw spawn rate.

    .venv/bin/python benchmarks/bench_throughput.py [--jobs 1000] [--slots 8 16] [--repeat 3]
        [--base /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import NOOP_RUNNER, clean_env, emit, filesystem, machine, temp_home

from jobcell.executors.wrapper import wrapper_script
from jobcell.model.states import JobState
from jobcell.service import Cell
from jobcell.worker import Worker

TARGET_JOBS_PER_S = 200.0
TARGET_FRACTION_OF_RAW = 0.5


def raw_spawn_rate(root: Path, count: int, concurrency: int,
                   shell: str = "/bin/bash") -> dict[str, Any]:
    """Start the wrapper ``count`` times, at most ``concurrency`` at once; wait for all."""
    wrapper = root / "wrapper.sh"
    wrapper.write_text(wrapper_script(shell))
    wrapper.chmod(0o755)
    attempts = root / "raw"
    attempts.mkdir()
    true = "/bin/true"
    running: dict[int, subprocess.Popen[bytes]] = {}
    started = failed = 0
    begin = time.perf_counter()
    while started < count or running:
        while started < count and len(running) < concurrency:
            attempt_dir = attempts / f"a{started}"
            attempt_dir.mkdir()
            process = subprocess.Popen(
                [shell, str(wrapper), str(attempt_dir), true], cwd=attempt_dir,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True)
            running[process.pid] = process
            started += 1
        pid, status = os.wait()
        process = running.pop(pid, None)
        if process is not None:
            process.returncode = os.waitstatus_to_exitcode(status)
            failed += process.returncode != 0
    elapsed = time.perf_counter() - begin
    bad = sum((attempts / f"a{i}" / "exit_code").read_text().strip() != "0"
              for i in range(count))
    return {"count": count, "concurrency": concurrency, "seconds": elapsed,
            "per_s": count / elapsed, "failed": failed + bad}


def cell_throughput(home: Path, count: int, slots: int, profile: str | None) -> dict[str, Any]:
    """Submit ``count`` distinct one-step no-op jobs, run an in-process worker until idle."""
    settings = {"cpu_slots": slots, "node_memory_mb": 65536, "memory_reserve_mb": 0,
                "runner_registry_autosync": False, "worker_idle_exit_s": 0}
    with Cell(home, auto_worker=False, settings=settings) as cell:
        cell.register_runner(dict(NOOP_RUNNER))
        specs = [{"label": "bench", "steps": [{"runner": "noop", "params": {"n": i}}]}
                 for i in range(count)]
        worker = Worker(cell.home, cell.settings, cell.store)
        begin = time.perf_counter()
        results = cell.submit_many(specs)
        submitted = time.perf_counter()
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(worker.run, until_idle=True)
            profiler.dump_stats(profile)
        else:
            worker.run(until_idle=True)
        elapsed = time.perf_counter() - begin
        fresh = sum(not r.deduplicated for r in results)
        succeeded = cell.store.count_jobs(states=[JobState.SUCCEEDED])
        not_ok = cell.store.count_jobs(states=[s for s in JobState if s != JobState.SUCCEEDED])
    return {"count": count, "slots": slots, "seconds": elapsed,
            "submit_seconds": submitted - begin, "run_seconds": elapsed - (submitted - begin),
            "per_s": count / elapsed, "fresh": fresh, "succeeded": succeeded,
            "not_succeeded": not_ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16],
                        help="cell cpu_slots values to measure (the first is the headline)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="raw/cell pairs per slots value (medians are reported)")
    parser.add_argument("--base", help="directory for the temporary cell homes "
                                       "(default: the temp dir; try /dev/shm)")
    parser.add_argument("--profile", help="write a cProfile of the worker run to this file "
                                          "(first run only)")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    with temp_home(base=args.base) as probe:
        where = filesystem(probe.parent)
    print(f"homes on: {where}; {args.jobs} jobs per run; {args.repeat} run(s) per row")
    print(f"{'slots':>5}  {'raw spawn/s':>11}  {'cell jobs/s':>11}  {'ratio':>6}  "
          f"{'submit s':>8}  {'run s':>7}  {'ok':>5}")
    rows = []
    profile = args.profile
    for slots in args.slots:
        runs = []
        for _ in range(args.repeat):
            with temp_home(base=args.base) as home:
                home.parent.joinpath("spawn").mkdir()
                raw = raw_spawn_rate(home.parent / "spawn", args.jobs, slots)
                cell = cell_throughput(home, args.jobs, slots, profile)
            profile = None
            ok = (cell["succeeded"] == args.jobs and cell["not_succeeded"] == 0
                  and raw["failed"] == 0 and cell["fresh"] == args.jobs)
            runs.append({"raw": raw, "cell": cell, "ratio": cell["per_s"] / raw["per_s"],
                         "ok": ok})
            print(f"{slots:>5}  {raw['per_s']:>11.1f}  {cell['per_s']:>11.1f}  "
                  f"{runs[-1]['ratio']:>6.1%}  {cell['submit_seconds']:>8.3f}  "
                  f"{cell['run_seconds']:>7.2f}  {cell['succeeded']:>5}", flush=True)
        row = {"slots": slots, "runs": runs, "ok": all(r["ok"] for r in runs),
               "raw_per_s": statistics.median(r["raw"]["per_s"] for r in runs),
               "cell_per_s": statistics.median(r["cell"]["per_s"] for r in runs),
               "ratio": statistics.median(r["ratio"] for r in runs)}
        rows.append(row)
        if args.repeat > 1:
            print(f"{slots:>5}  {row['raw_per_s']:>11.1f}  {row['cell_per_s']:>11.1f}  "
                  f"{row['ratio']:>6.1%}  (median of {args.repeat})", flush=True)
    head = rows[0]
    result = {
        "benchmark": "throughput", "machine": machine(), "filesystem": where,
        "jobs": args.jobs, "rows": rows,
        "targets": [
            {"name": f"end-to-end jobs/s (cpu_slots={head['slots']}, {where})",
             "value": head["cell_per_s"], "unit": "jobs/s",
             "target": f">= {TARGET_JOBS_PER_S:g} jobs/s",
             "passed": head["cell_per_s"] >= TARGET_JOBS_PER_S and head["ok"]},
            {"name": f"share of raw spawn rate (cpu_slots={head['slots']}, {where})",
             "value": head["ratio"], "unit": "%",
             "target": f">= {TARGET_FRACTION_OF_RAW:.0%}",
             "passed": head["ratio"] >= TARGET_FRACTION_OF_RAW and head["ok"]},
        ],
    }
    if not all(r["ok"] for r in rows):
        print("ERROR: not every job succeeded / not every raw spawn exited 0", file=sys.stderr)
    emit(result, args.json_out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
