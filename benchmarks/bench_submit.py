"""Batched submission through the Python API (``Cell.submit_many``).

Each measurement submits one batch of distinct one-step jobs (validation,
compilation, dedup lookup, one transaction) into a fresh cell with no worker.

Target (issue 2): at least 5,000 jobs/s.

    .venv/bin/python benchmarks/bench_submit.py [--batches 1000 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from _common import NOOP_RUNNER, clean_env, emit, filesystem, machine, temp_home

from jobcell.service import Cell

TARGET_JOBS_PER_S = 5000.0


def specs(count: int, start: int = 0, cache: bool = True) -> list[dict[str, Any]]:
    """``count`` distinct one-step job specs (distinct params, so nothing is deduplicated;
    with ``cache=False`` the dedup lookup is skipped altogether)."""
    return [{"label": f"bench-{i % 4}", "tags": ["bench", f"batch-{start}"],
             **({} if cache else {"cache": False}),
             "steps": [{"runner": "noop", "params": {"n": i}}]}
            for i in range(start, start + count)]


def one_batch(batch: int, preload: int, base: str | None, cache: bool = True,
              profile: str | None = None) -> dict[str, Any]:
    """Submit ``batch`` jobs into a fresh cell that already holds ``preload`` jobs.

    The preload is stored with ``cache: false`` (no dedup lookups), so it is quick.
    """
    with temp_home(base=base) as home, Cell(home, auto_worker=False) as cell:
        cell.register_runner(dict(NOOP_RUNNER))
        for start in range(0, preload, 10_000):
            cell.submit_many(specs(min(10_000, preload - start), 1_000_000 + start, False))
        batch_specs = specs(batch, cache=cache)
        begin = time.perf_counter()
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            results = profiler.runcall(cell.submit_many, batch_specs)
            profiler.dump_stats(profile)
        else:
            results = cell.submit_many(batch_specs)
        elapsed = time.perf_counter() - begin
        fresh = sum(not r.deduplicated for r in results)
        stored = cell.store.count_jobs()
        fs = filesystem(home)
    if fresh != batch or stored != batch + preload:
        raise SystemExit(f"expected {batch} new jobs, got {fresh} (stored {stored})")
    return {"batch": batch, "preload": preload, "cache": cache, "seconds": elapsed,
            "per_s": batch / elapsed, "filesystem": fs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--preload", type=int, default=20_000,
                        help="also time a batch of 1,000 into a cell already holding this many "
                             "jobs, with and without the dedup lookup (0: skip)")
    parser.add_argument("--base", help="directory for the temporary cell homes")
    parser.add_argument("--profile", help="write a cProfile of one batch (the largest) here")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    print(f"{'batch':>7}  {'preload':>7}  {'dedup':>5}  {'median jobs/s':>13}  {'min':>8}  "
          f"{'max':>8}  {'median s':>8}  n")
    plan = [(batch, 0, True, args.repeat) for batch in args.batches]
    if args.preload:
        plan += [(1000, args.preload, True, 1), (1000, args.preload, False, 1)]
    rows = []
    for batch, preload, cache, repeat in plan:
        runs = [one_batch(batch, preload, args.base, cache) for _ in range(repeat)]
        rates = [r["per_s"] for r in runs]
        row = {"batch": batch, "preload": preload, "dedup": cache,
               "filesystem": runs[0]["filesystem"], "repeat": repeat,
               "per_s_median": statistics.median(rates), "per_s_min": min(rates),
               "per_s_max": max(rates),
               "seconds_median": statistics.median(r["seconds"] for r in runs)}
        rows.append(row)
        print(f"{batch:>7}  {preload:>7}  {'on' if cache else 'off':>5}  "
              f"{row['per_s_median']:>13.0f}  {row['per_s_min']:>8.0f}  {row['per_s_max']:>8.0f}  "
              f"{row['seconds_median']:>8.3f}  {repeat}", flush=True)
    if args.profile:
        one_batch(max(args.batches), 0, args.base, profile=args.profile)
        print(f"profile written to {args.profile}")
    targets = []
    for r in rows:
        if not r["dedup"]:
            continue  # cache: false skips the dedup lookup; shown for diagnosis only
        where = "empty cell" if r["preload"] == 0 else f"cell holding {r['preload']:,} jobs"
        targets.append({"name": f"submit_many jobs/s (batch {r['batch']:,}, {where})",
                        "value": r["per_s_median"], "unit": "jobs/s",
                        "target": f">= {TARGET_JOBS_PER_S:g} jobs/s",
                        "passed": r["per_s_median"] >= TARGET_JOBS_PER_S})
    emit({"benchmark": "submit", "machine": machine(), "rows": rows, "targets": targets},
         args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
