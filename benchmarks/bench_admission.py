"""The worker's admission decision with 100,000 queued steps.

Populates a fresh cell (no worker, so every job stays queued) with one-step
jobs over several runners and owners (one owner holds 90% of the backlog, 20
others share the rest), then builds a ``Worker`` with ``cpu_slots=64`` and
times the decision part of ``Worker._admit`` without starting anything (no
attempt is committed, no process is spawned), over ``--rounds`` rounds:

* (a) ``admit()`` alone, on the requests of one fair queue;
* (b) the full decision: ``oom.group_limits`` + ``Worker._fair_queue`` (the
  per-owner queue reads and the fair order) + ``Worker._request`` per step + ``admit()``;
* (c) (b) plus ``Worker._resolve_cache`` on the fair queue (step keys and the
  done/running twin look-ups; no step has a twin, so nothing is committed), with
  the keys remembered from earlier rounds as a running worker has them;
* (c') the same with every key computed afresh (the first round after a start).

The queue read and the cache look-ups are also timed on their own. Every round
must admit 64 steps (one per free CPU slot); the script fails otherwise.

Target (issue 2): under 5 ms per scheduling round that admits up to 64 steps,
for (b) and (c).

    .venv/bin/python benchmarks/bench_admission.py [--jobs 100000] [--rounds 50]
        [--profile admission.prof]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from _common import NOOP_RUNNER, clean_env, emit, filesystem, machine, summary_ms, temp_home

from jobcell.scheduler import oom
from jobcell.scheduler.admission import Decision, Lease, admit
from jobcell.service import Cell
from jobcell.settings import load_settings
from jobcell.store import StepRow
from jobcell.worker import Worker, step_key

TARGET_MS = 5.0
SLOTS = 64
RUNNERS = ("noop-a", "noop-b", "noop-c", "noop-d")
SMALL_OWNERS = 20
BATCH = 10_000
SETTINGS = {"cpu_slots": SLOTS, "node_memory_mb": 65536, "memory_reserve_mb": 0,
            "gpu_count": 0, "runner_registry_autosync": False}


def owner_plan(count: int) -> list[tuple[str, int]]:
    """(owner, jobs): ``SMALL_OWNERS`` owners share 10% of ``count``, one owns the rest."""
    small = count // 10 // SMALL_OWNERS
    return [("bulk", count - small * SMALL_OWNERS),
            *((f"user{i:02d}", small) for i in range(SMALL_OWNERS))]


def populate(cell: Cell, count: int) -> float:
    """Store ``count`` queued one-step jobs; every step's params differ, so no two steps
    share a step key (no cache twins, no followers). Returns the seconds it took."""
    for name in RUNNERS:
        cell.register_runner({**NOOP_RUNNER, "name": name})
    begin = time.perf_counter()
    n = 0
    for owner, jobs in owner_plan(count):
        for start in range(0, jobs, BATCH):
            size = min(BATCH, jobs - start)
            specs = [{"label": "bench",
                      "steps": [{"runner": RUNNERS[(n + i) % len(RUNNERS)],
                                 "params": {"n": n + i}}]} for i in range(size)]
            cell.submit_many(specs, owner=owner)
            n += size
    return time.perf_counter() - begin


class Rounds:
    """The decision part of ``Worker._admit``, with the worker's own methods."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.admitted: list[int] = []
        self.owners: Counter[str] = Counter()
        self.changed = False

    def decide(self, queue: list[StepRow], limits: dict[str, Any]) -> Decision:
        w = self.worker
        by_key = {step_key(s.job_id, s.step_id): s for s in queue}
        requests = [w._request(k, s) for k, s in by_key.items()]
        leases = [Lease(k, s.cpu_slots, s.memory_mb, w._runner(s).group, tuple(s.gpus or ()))
                  for k, s in w._running.items()]
        decision = admit(w.capacity, leases, requests, limits)
        self.admitted.append(len(decision.admit))
        self.owners = Counter(by_key[k].owner for k in decision.admit)
        return decision

    def full(self) -> Decision:
        """(b): limits, fair queue, requests, admit."""
        now = time.time()
        limits = oom.group_limits(self.worker._cooldowns.values(), now)
        return self.decide(self.worker._fair_queue(now, limits), limits)

    def with_cache(self, fresh_keys: bool) -> Decision:
        """(c): (b) with the step-cache look-ups in between, as ``_admit`` does them."""
        if fresh_keys:
            self.worker.cache._keys.clear()
        now = time.time()
        limits = oom.group_limits(self.worker._cooldowns.values(), now)
        queue = self.worker._fair_queue(now, limits)
        queue, followers, changed = self.worker._resolve_cache(queue, now)
        self.changed |= changed or bool(followers)
        return self.decide(queue, limits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="queued one-step jobs")
    parser.add_argument("--rounds", type=int, default=50, help="timed rounds per measure")
    parser.add_argument("--base", help="directory for the temporary cell home")
    parser.add_argument("--profile", help="write a cProfile of the (c) rounds to this file")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    measures: dict[str, dict[str, float]] = {}

    def record(name: str, fn: Callable[[], Any]) -> None:
        fn()  # warm-up, discarded
        times = []
        for _ in range(args.rounds):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        measures[name] = summary_ms(times)
        s = measures[name]
        print(f"  {name:<52} median {s['median_ms']:7.2f} ms   p95 {s['p95_ms']:7.2f} ms   "
              f"(n={s['n']})", flush=True)

    with temp_home(base=args.base) as home, \
            Cell(home, auto_worker=False, settings=SETTINGS) as cell:
        build_s = populate(cell, args.jobs)
        queued = cell.store.count_jobs()
        plan = owner_plan(args.jobs)
        print(f"built {queued} queued jobs ({len(RUNNERS)} runners; owner {plan[0][0]!r} "
              f"{plan[0][1]}, {SMALL_OWNERS} owners {plan[1][1]} each) in {build_s:.1f} s "
              f"({args.jobs / build_s:.0f} jobs/s) on {filesystem(home)}")
        settings = load_settings(None, env={}, overrides=SETTINGS)
        worker = Worker(cell.home, settings, cell.store)
        worker.acquire()  # _resolve_cache commits fenced by the lock (it has nothing to commit)
        try:
            rounds = Rounds(worker)
            now = time.time()
            limits = oom.group_limits(worker._cooldowns.values(), now)
            queue = worker._fair_queue(now, limits)
            requests = [worker._request(step_key(s.job_id, s.step_id), s) for s in queue]
            print(f"one round reads {len(queue)} queued steps "
                  f"(window {worker._admission_window()}, {len({s.owner for s in queue})} "
                  f"owners) for {worker.capacity.cpu_slots} free cpu slots")
            record("(a) admit() alone", lambda: admit(worker.capacity, [], requests, limits))
            record("    queue read alone (_fair_queue)", lambda: worker._fair_queue(
                time.time(), limits))
            # Rows as read from the store (no step_key yet), one list per call.
            copies = [[replace(s) for s in queue] for _ in range(2 * args.rounds + 2)]
            worker.cache._keys.clear()
            record("    cache look-ups alone (_resolve_cache, keys kept)",
                   lambda: worker._resolve_cache(copies.pop(), time.time()))

            def cold_resolve() -> None:
                worker.cache._keys.clear()
                worker._resolve_cache(copies.pop(), time.time())

            record("    cache look-ups alone (keys computed afresh)", cold_resolve)
            copies.clear()  # 100 copies of the queue would make every later GC pass slower
            record("(b) full decision (queue + fair order + admit)", rounds.full)
            worker.cache._keys.clear()
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            record("(c) full decision + step-cache look-ups", lambda: rounds.with_cache(False))
            if args.profile:
                profiler.disable()
                profiler.dump_stats(args.profile)
            record("(c') full decision + cache, keys computed afresh",
                   lambda: rounds.with_cache(True))
            admitted = rounds.admitted
            owners = rounds.owners
            changed = rounds.changed
        finally:
            worker.release()
        still_queued = sum(count for _, _, count in cell.store.queue_depth())
    ok = set(admitted) == {SLOTS} and not changed and still_queued == queued == args.jobs
    print(f"admitted per round: {sorted(Counter(admitted).items())} (want {SLOTS} every "
          f"round); last round's owners: {len(owners)} ({owners.most_common(3)}...)")
    if not ok:
        print(f"ERROR: a round did not admit {SLOTS} steps, or the cache resolution changed "
              f"the cell (queued after: {still_queued} of {queued})", file=sys.stderr)
    targets = []
    for name, key in (("admission round, queue + fair order + admit",
                       "(b) full decision (queue + fair order + admit)"),
                      ("admission round, + step-cache look-ups",
                       "(c) full decision + step-cache look-ups"),
                      ("admission round, + cache, keys afresh",
                       "(c') full decision + cache, keys computed afresh")):
        value = measures[key]["median_ms"]
        targets.append({"name": f"{name} ({queued:,} queued), median", "value": value,
                        "unit": "ms", "target": f"< {TARGET_MS:g} ms",
                        "passed": value < TARGET_MS and ok, "p95_ms": measures[key]["p95_ms"]})
    emit({"benchmark": "admission", "machine": machine(), "jobs": queued, "slots": SLOTS,
          "build_s": build_s, "queue_rows": len(queue), "measures": measures,
          "admitted": sorted(set(admitted)), "ok": ok, "targets": targets},
         args.json_out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
