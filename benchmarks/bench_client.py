"""Task client overhead: a client-cache hit per awaited call, and many concurrent tasks.

1. Per-call overhead of ``await task(...)`` when the execution is a client-cache hit
   (the execution is looked up in the cache file, its status and result are read
   from the cell): N sequential awaits of the same call, in one event loop.
2. ``asyncio.gather`` of N distinct no-op tasks through ``LocalBackend`` (the
   cell's worker daemon runs them), from the first call until all returned, for
   - ``task_client("noop")`` over the YAML ``true`` runner of ``bench_throughput``;
   - a ``@task`` Python function (each execution starts a Python interpreter);
   next to the embedded figure of ``bench_throughput`` (the same N ``true`` jobs by
   ``Cell.submit_many`` and an in-process worker), measured in the same run.

Targets (issue 6): cache-hit overhead < 1 ms per call; the gather figures are
reported, not targeted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    NOOP_RUNNER,
    clean_env,
    emit,
    filesystem,
    machine,
    percentile,
    temp_home,
)
from bench_throughput import cell_throughput

TASKS = '''
from jobcell.client import task


@task(version="1", memory_mb=1)
def pynoop(n: int) -> int:
    return n
'''


def settings_text(slots: int) -> str:
    return (f"cpu_slots = {slots}\nnode_memory_mb = 65536\nmemory_reserve_mb = 0\n"
            "worker_idle_exit_s = 30\n")


def client_run(home: Path, count: int, hits: int, slots: int) -> dict[str, Any]:
    """Gather ``count`` distinct tasks (YAML no-op, then Python no-op), then time
    ``hits`` sequential cache-hit awaits of each."""
    from jobcell.client import (
        CacheConfigurationSQLite,
        LocalBackend,
        cache,
        scoped_config,
        task_client,
    )
    from jobcell.service import Cell

    home.mkdir(parents=True)
    (home / "jobcell.toml").write_text(settings_text(slots))
    tasks_dir = home.parent / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "bench_tasks.py").write_text(textwrap.dedent(TASKS))
    sys.path.insert(0, str(tasks_dir))
    import bench_tasks

    with Cell(home, auto_worker=False) as cell:
        cell.register_runner(dict(NOOP_RUNNER))
    noop = task_client("noop", version="1", label="bench")
    backend = LocalBackend(home, poll_interval_s=0.02, max_poll_interval_s=0.2)
    result: dict[str, Any] = {}
    try:
        with scoped_config() as config:
            config.backend = backend
            config.cache = CacheConfigurationSQLite(file=home.parent / "client-cache.sqlite")

            async def gather(kind: str) -> float:
                begin = time.perf_counter()
                if kind == "yaml":
                    values = await asyncio.gather(*(noop(n=i) for i in range(count)))
                else:
                    values = await asyncio.gather(*(bench_tasks.pynoop(i)
                                                    for i in range(count)))
                elapsed = time.perf_counter() - begin
                if kind == "python":
                    assert values == list(range(count)), values[:5]
                return elapsed

            async def hit_times(kind: str) -> list[float]:
                call = (lambda: noop(n=0)) if kind == "yaml" else (lambda: bench_tasks.pynoop(0))
                for _ in range(20):                      # warm up
                    await call()
                times = []
                for _ in range(hits):
                    begin = time.perf_counter()
                    await call()
                    times.append(time.perf_counter() - begin)
                return times

            for kind in ("yaml", "python"):
                elapsed = asyncio.run(gather(kind))
                times = asyncio.run(hit_times(kind))
                result[kind] = {
                    "gather_seconds": elapsed, "gather_per_s": count / elapsed,
                    "hit_median_ms": statistics.median(times) * 1000,
                    "hit_p99_ms": percentile(times, 99) * 1000,
                    "hit_max_ms": max(times) * 1000}
        with Cell(home, auto_worker=False) as cell:
            result["jobs"] = len(cell.list(limit=10 * count))
    finally:
        backend.close()
        cache.close_all()
        with Cell(home, auto_worker=False) as cell, contextlib.suppress(Exception):
            cell.stop_worker(timeout_s=10)
        sys.path.remove(str(tasks_dir))
        sys.modules.pop("bench_tasks", None)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per gather")
    parser.add_argument("--hits", type=int, default=2000, help="cache-hit awaits timed")
    parser.add_argument("--slots", type=int, default=8, help="the cell's cpu_slots")
    parser.add_argument("--base", help="directory for the temporary cell homes")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    with temp_home(base=args.base) as home:
        print(f"homes on {filesystem(home.parent)}; cpu_slots = {args.slots}; "
              f"{args.tasks} tasks per gather; {args.hits} cache-hit awaits timed")
        embedded = cell_throughput(home, args.tasks, args.slots, None)
    with temp_home(base=args.base) as home:
        client = client_run(home, args.tasks, args.hits, args.slots)
    print(f"{'path':<44} {'tasks/s':>8} {'seconds':>8}")
    print(f"{'embedded: Cell.submit_many + in-process Worker':<44} "
          f"{embedded['per_s']:>8.1f} {embedded['seconds']:>8.2f}")
    for kind, label in (("yaml", "client: gather of task_client('noop') (true)"),
                        ("python", "client: gather of a @task Python no-op")):
        row = client[kind]
        print(f"{label:<44} {row['gather_per_s']:>8.1f} {row['gather_seconds']:>8.2f}")
    print(f"{'cache hit per await':<44} {'median ms':>9} {'p99 ms':>8} {'max ms':>8}  < 1 ms")
    ok = True
    for kind in ("yaml", "python"):
        row = client[kind]
        verdict = "PASS" if row["hit_median_ms"] < 1.0 else "MISS"
        ok = ok and verdict == "PASS"
        print(f"{kind:<44} {row['hit_median_ms']:>9.3f} {row['hit_p99_ms']:>8.3f} "
              f"{row['hit_max_ms']:>8.3f}  {verdict}")
    print(f"jobs in the client's cell: {client['jobs']} (want {2 * args.tasks}: no resubmits)")
    ok = ok and client["jobs"] == 2 * args.tasks
    targets = [{"name": f"task client cache hit per await ({kind}), median",
                "value": client[kind]["hit_median_ms"], "unit": "ms", "target": "< 1 ms",
                "passed": client[kind]["hit_median_ms"] < 1.0} for kind in ("yaml", "python")]
    targets += [{"name": f"task client gather of {args.tasks} no-op tasks ({kind})",
                 "value": client[kind]["gather_per_s"], "unit": "tasks/s",
                 "target": f"reported (embedded: {embedded['per_s']:.0f} jobs/s)",
                 "passed": client["jobs"] == 2 * args.tasks} for kind in ("yaml", "python")]
    emit({"benchmark": "client", "machine": machine(), "embedded": embedded,
          "client": client, "targets": targets}, args.json_out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
