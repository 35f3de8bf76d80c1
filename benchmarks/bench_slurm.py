"""jobcell's Slurm executor against submitit, on the same local Slurm cluster.

A real Slurm 22.05 cluster is started on this host (``tests/services/slurm_cluster.py``:
one slurmctld, nodes jc1-jc3 with 2 CPUs each, accounting disabled). ``--steps`` short
steps (``sleep 0.2``, 1 CPU, 100 MB) are run four ways, each from submit until all have
succeeded:

* jobcell, one job per step: a cell with ``executor_backend = "slurm"`` and
  ``slurm_max_array_size = 1`` gets ``--steps`` one-step jobs in one
  ``Cell.submit_many`` call; an in-process ``Worker(...).run(until_idle=True)`` runs them.
* jobcell, array batching: the same with the default ``slurm_max_array_size``.
* submitit, one job per step: ``AutoExecutor(cluster="slurm")``, ``executor.submit(time.sleep,
  0.2)`` per step, then ``helpers.as_completed`` and ``job.result()`` for each.
* submitit, array batching: ``executor.map_array(time.sleep, [0.2] * steps)``.

Every Slurm command is counted: each run gets a directory of wrapper scripts (``sbatch``,
``squeue``, ``sacct``, ``scontrol``, ``scancel``, ``sinfo``, ``srun``) that append a line to
a log and ``exec`` the real program. jobcell's cell options ``slurm_sbatch`` ... point at
them; for submitit (which calls the commands by name) that directory goes first on PATH.
For jobcell a polling round is one ``SlurmExecutor.poll()`` call of the worker that ran a
Slurm command; the benchmark wraps that method (in this process only) to find the most
``squeue`` calls any round made.

By default every run gets a fresh cluster (``--shared-cluster``: one for all four), so jobs
left in the controller by one run (``MinJobAge`` is 300 s) do not slow the next one.

Targets (issue text): at most one ``squeue`` per polling round; at most 5 ``sbatch`` calls
with array batching; wall time no worse than submitit's (per mode).

    .venv/bin/python benchmarks/bench_slurm.py [--steps 300] [--timeout 240]
        [--only jobcell-single jobcell-array submitit-single submitit-array] [--base DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import clean_env, emit, machine

from jobcell.executors.slurm import SlurmExecutor
from jobcell.model.states import JobState
from jobcell.service import Cell
from jobcell.worker import Worker

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo", "srun")
RUNS = ("jobcell-single", "jobcell-array", "submitit-single", "submitit-array")
TARGET_SQUEUE_PER_ROUND = 1
TARGET_SBATCH_ARRAY = 5
SLEEP_S = 0.2
RUNNER = {
    "name": "sleep02",
    "version": "1",
    "command": "/bin/sleep",
    "args_template": [str(SLEEP_S)],
    "params": {"n": {"type": "integer", "default": 0}},
    "resources": {"cpu_slots": 1, "memory_mb": 100, "timeout_s": 300},
}


# --- the cluster and the counting wrappers ----------------------------------------------

@contextlib.contextmanager
def slurm_cluster(keep: bool) -> Iterator[Any]:
    """A started test cluster under a short /tmp path (slurmd's unix sockets need one)."""
    sys.path.insert(0, str(REPO / "tests"))
    from services.slurm_cluster import SlurmCluster

    root = Path(tempfile.mkdtemp(prefix="jc-bslurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    begin = time.perf_counter()
    cluster.start()
    print(f"  (cluster started in {time.perf_counter() - begin:.1f} s under {root})", flush=True)
    try:
        yield cluster
    finally:
        cluster.stop()
        if keep:
            print(f"(kept {root})", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def counting_wrappers(directory: Path, cluster: Any) -> Path:
    """One wrapper per Slurm command in ``directory``: log a line, exec the real one.

    Returns the log file (``<time> <command> <args>`` per call; appends of one short
    line are atomic, so concurrent callers do not mix)."""
    directory.mkdir(parents=True)
    log = directory / "calls.log"
    log.touch()
    for name in COMMANDS:
        wrapper = directory / name
        wrapper.write_text(
            "#!/bin/bash\n"
            f"printf '%s %s %s\\n' \"$EPOCHREALTIME\" {name} \"$*\" >> '{log}'\n"
            f"exec '{cluster.bin(name)}' \"$@\"\n")
        wrapper.chmod(0o755)
    return log


def read_calls(log: Path) -> list[tuple[float, str, str]]:
    calls = []
    for line in log.read_text().splitlines():
        stamp, _, rest = line.partition(" ")
        name, _, args = rest.partition(" ")
        calls.append((float(stamp), name, args))
    return calls


def call_counts(log: Path) -> dict[str, int]:
    """Calls per command (each run has its own wrappers and log: all of them are its own)."""
    counts = Counter(name for _, name, _ in read_calls(log))
    return {name: counts.get(name, 0) for name in COMMANDS}


# --- jobcell ---------------------------------------------------------------------------

class RoundCounter:
    """Wraps ``SlurmExecutor.poll`` and ``_run`` (class-wide, this process only): how many
    polls ran a Slurm command, and the most ``squeue`` calls within one poll."""

    def __init__(self) -> None:
        self.polls = 0
        self.rounds = 0
        self.max_squeue_per_round = 0
        self.squeue_outside_poll = 0
        self._in_poll = False
        self._calls: Counter[str] = Counter()

    @contextlib.contextmanager
    def installed(self) -> Iterator[RoundCounter]:
        original_poll, original_run = SlurmExecutor.poll, SlurmExecutor._run
        counter = self

        def poll(executor: SlurmExecutor) -> Any:
            counter._calls.clear()
            counter._in_poll = True
            try:
                return original_poll(executor)
            finally:
                counter._in_poll = False
                counter.polls += 1
                if counter._calls:
                    counter.rounds += 1
                    counter.max_squeue_per_round = max(counter.max_squeue_per_round,
                                                       counter._calls["squeue"])

        def run(executor: SlurmExecutor, argv: Any, *args: Any, **kwargs: Any) -> Any:
            name = os.path.basename(str(argv[0]))
            if counter._in_poll:
                counter._calls[name] += 1
            elif name == "squeue":
                counter.squeue_outside_poll += 1
            return original_run(executor, argv, *args, **kwargs)

        SlurmExecutor.poll = poll  # type: ignore[method-assign]
        SlurmExecutor._run = run  # type: ignore[method-assign]
        try:
            yield self
        finally:
            SlurmExecutor.poll = original_poll  # type: ignore[method-assign]
            SlurmExecutor._run = original_run  # type: ignore[method-assign]


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def jobcell_run(root: Path, cluster: Any, steps: int, array: bool, poll_s: float,
                poll_max_s: float, timeout: float, extra: list[str]) -> dict[str, Any]:
    log = counting_wrappers(root / "bin", cluster)
    home = root / "home"
    home.mkdir(parents=True)
    options: dict[str, Any] = {
        "executor_backend": "slurm",
        "slurm_env": cluster.env,
        **{f"slurm_{name}": str(root / "bin" / name) for name in COMMANDS if name != "srun"},
        "backend_poll_interval_s": poll_s,
        "backend_poll_max_interval_s": poll_max_s,
        "runner_registry_autosync": False,
        "worker_idle_exit_s": 0,
    }
    if not array:
        options["slurm_max_array_size"] = 1
    (home / "jobcell.toml").write_text(
        "".join(f"{key} = {toml_value(value)}\n" for key, value in options.items())
        + "".join(f"{line}\n" for line in extra))
    rounds = RoundCounter()
    with Cell(home, auto_worker=False) as cell, rounds.installed():
        cell.register_runner(dict(RUNNER))
        specs = [{"label": "bench", "steps": [{"runner": RUNNER["name"], "params": {"n": i}}]}
                 for i in range(steps)]
        worker = Worker(cell.home, cell.settings, cell.store)
        stop_at = time.monotonic() + timeout
        original_once = worker.run_once

        def run_once() -> bool:  # --timeout: stop the worker rather than wait forever
            if time.monotonic() > stop_at:
                worker._stop = True
            return original_once()

        worker.run_once = run_once  # type: ignore[method-assign]
        wall_begin = time.time()
        begin = time.perf_counter()
        results = cell.submit_many(specs)
        submitted = time.perf_counter()
        worker.run(until_idle=True)
        elapsed = time.perf_counter() - begin
        succeeded = cell.store.count_jobs(states=[JobState.SUCCEEDED])
        states = {state.value: n for state in JobState
                  if (n := cell.store.count_jobs(states=[state])) and state != JobState.SUCCEEDED}
        failures = [] if not states else failure_samples(cell)
    counts = call_counts(log)
    last = last_written(home.glob("artifacts/*/*/attempt-*/exit_code"), wall_begin)
    return {"seconds": elapsed, "submit_seconds": submitted - begin, "steps": steps,
            "fresh": sum(not r.deduplicated for r in results), "succeeded": succeeded,
            "not_succeeded": states, "failures": failures, "timed_out": elapsed >= timeout,
            "calls": counts, "last_result_s": last, "polls": rounds.polls, "rounds": rounds.rounds,
            "max_squeue_per_round": rounds.max_squeue_per_round,
            "squeue_outside_poll": rounds.squeue_outside_poll,
            "array_sizes": array_sizes(log)}


def last_written(files: Iterator[Path], since: float) -> float | None:
    """Seconds from ``since`` (wall clock) to the newest of ``files``: when the last step's
    result landed, i.e. when Slurm was done with the work."""
    stamps = [f.stat().st_mtime for f in files]
    return max(stamps) - since if stamps else None


def array_sizes(log: Path) -> list[int]:
    """Launches per sbatch call of jobcell (``--array=0-N`` on its command line; 1 without)."""
    sizes = []
    for _, name, args in read_calls(log):
        if name == "sbatch":
            found = re.search(r"--array=0-(\d+)", args)
            sizes.append(int(found.group(1)) + 1 if found else 1)
    return sizes


def failure_samples(cell: Cell, limit: int = 5) -> list[str]:
    """A few not-succeeded jobs with their steps (state, exit code, reason), for the report."""
    out = []
    for job in cell.list(limit=limit * 20):
        if job.get("state") == JobState.SUCCEEDED.value:
            continue
        out.append(json.dumps(cell.status(job["job_id"]), default=str)[:800])
        if len(out) >= limit:
            break
    return out


# --- submitit --------------------------------------------------------------------------

class WarningCounter(logging.Handler):
    """Stands in for submitit's log handlers during a run: counts its warnings and keeps
    the first one (each failed sacct call logs one, twice over with its own handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = record.getMessage()[:300]


def submitit_run(root: Path, cluster: Any, steps: int, array: bool, poll_s: float,
                 timeout: float) -> dict[str, Any]:
    import submitit
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    # The watcher is a class attribute shared by every job of the process: a fresh one per
    # run, as a new process would have (job ids restart at 1 on each fresh cluster).
    SlurmJob.watcher = SlurmInfoWatcher(delay_s=600)
    log = counting_wrappers(root / "bin", cluster)
    # The real sinfo (before PATH gets the wrappers): this look-up is not submitit's call.
    partition = cluster.run("sinfo", "-h", "-o", "%P").stdout.split()[0].rstrip("*")
    saved = {key: os.environ.get(key) for key in ("PATH", "SLURM_CONF")}
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.update(cluster.env)
    outcome: dict[str, Any] = {"steps": steps, "partition": partition}
    jobs: list[Any] = []
    done = failed = 0
    errors: list[str] = []
    logger = logging.getLogger("submitit")
    saved_handlers, warnings = logger.handlers[:], WarningCounter()
    logger.handlers = [warnings]
    wall_begin = time.time()
    begin = time.perf_counter()
    try:
        executor = submitit.AutoExecutor(folder=root / "submitit", cluster="slurm")
        executor.update_parameters(slurm_partition=partition, timeout_min=5, mem_gb=0.1,
                                   cpus_per_task=1)
        if array:
            jobs = executor.map_array(time.sleep, [SLEEP_S] * steps)
        else:
            jobs = [executor.submit(time.sleep, SLEEP_S) for _ in range(steps)]
        outcome["submit_seconds"] = time.perf_counter() - begin
        try:
            for job in submitit.helpers.as_completed(jobs, timeout=timeout,
                                                     poll_frequency=poll_s):
                try:
                    job.result()
                    done += 1
                except Exception as exc:  # report it, do not stop
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{job.job_id}: {type(exc).__name__}: {exc}"[:600])
        except TimeoutError:
            outcome["timed_out"] = True
    except Exception as exc:  # submitit could not run at all: say so
        errors.append(f"{type(exc).__name__}: {exc}"[:1000])
        outcome["crashed"] = True
    finally:
        elapsed = time.perf_counter() - begin
        logger.handlers = saved_handlers
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    watcher_calls = SlurmJob.watcher.num_calls
    last = last_written((root / "submitit").glob("*_result.pkl"), wall_begin)
    outcome.update({"seconds": elapsed, "succeeded": done, "failed": failed,
                    "not_succeeded": {} if done == steps else {"not done": steps - done},
                    "failures": errors, "calls": call_counts(log),
                    "rounds": watcher_calls, "last_result_s": last,
                    "warnings": warnings.count,
                    "first_warning": warnings.first,
                    "timed_out": outcome.get("timed_out", False)})
    return outcome


# --- report ----------------------------------------------------------------------------

def one_run(name: str, cluster: Any, base: str | None, args: argparse.Namespace
            ) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"jobcell-bench-slurm-{name}-", dir=base))
    try:
        tool, mode = name.split("-")
        if tool == "jobcell":
            result = jobcell_run(root, cluster, args.steps, mode == "array", args.poll,
                                 args.poll_max, args.timeout, args.set)
        else:
            result = submitit_run(root, cluster, args.steps, mode == "array", args.poll,
                                  args.timeout)
    finally:
        if os.environ.get("KEEP_HOME") == "1":
            print(f"(kept {root})", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    result.update({"run": name, "tool": tool, "mode": mode,
                   "ok": result["succeeded"] == args.steps and not result["not_succeeded"]})
    return result


def print_row(r: dict[str, Any]) -> None:
    c = r["calls"]
    other = c["scancel"] + c["sinfo"] + c["srun"]
    rounds = r.get("rounds", 0)
    per_round = (f"{r['max_squeue_per_round']}" if r["tool"] == "jobcell" else "-")
    last = r.get("last_result_s")
    lag = "-" if last is None else f"{r['seconds'] - last:.1f}"
    print(f"{r['mode']:<7} {r['tool']:<9} {r['seconds']:>8.1f} {lag:>5} {r['succeeded']:>5} "
          f"{c['sbatch']:>6} {c['squeue']:>6} {c['sacct']:>5} {c['scontrol']:>8} "
          f"{other:>5} {rounds:>6} {per_round:>9}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="+", choices=RUNS, default=list(RUNS),
                        help="which runs (default: all four)")
    parser.add_argument("--poll", type=float, default=0.5,
                        help="jobcell backend_poll_interval_s and submitit's as_completed "
                             "poll_frequency (s)")
    parser.add_argument("--poll-max", type=float, default=2.0,
                        help="jobcell backend_poll_max_interval_s (s)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="give up on a run after this many seconds")
    parser.add_argument("--shared-cluster", action="store_true",
                        help="one cluster for every run (default: a fresh one per run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=TOML",
                        help="one more line for the jobcell cells' jobcell.toml, e.g. "
                             "'cpu_slots = 64' (may be repeated)")
    parser.add_argument("--base", help="directory for the cell homes and submitit folders")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    print(f"{args.steps} steps of sleep {SLEEP_S} s (1 cpu, 100 MB) on 3 Slurm nodes x 2 CPUs; "
          f"poll {args.poll} s (jobcell max {args.poll_max} s)")
    header = (f"{'mode':<7} {'tool':<9} {'wall s':>8} {'lag s':>5} {'ok':>5} {'sbatch':>6} "
              f"{'squeue':>6} "
              f"{'sacct':>5} {'scontrol':>8} {'other':>5} {'rounds':>6} {'sq/round':>9}")
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(slurm_cluster(False)) if args.shared_cluster else None
        for name in args.only:
            print(f"-- {name}", flush=True)
            with (contextlib.nullcontext(shared) if shared is not None
                  else slurm_cluster(False)) as cluster:
                rows.append(one_run(name, cluster, args.base, args))
            r = rows[-1]
            print(header)
            print_row(r)
            if r["tool"] == "jobcell":
                sizes = Counter(r["array_sizes"])
                print("  launches per sbatch: " + ", ".join(
                    f"{size} x{count}" for size, count in sorted(sizes.items())))
            elif r.get("warnings"):
                print(f"  submitit logged {r['warnings']} warning(s); the first: "
                      f"{r['first_warning']}")
            if r["failures"] or not r["ok"]:
                print(f"  NOT ALL SUCCEEDED: {r['not_succeeded']}", flush=True)
                for line in r["failures"]:
                    print(f"  {line}")
    print("\n" + header)
    for r in sorted(rows, key=lambda r: (r["mode"] != "single", r["tool"])):
        print_row(r)
    print("(lag = wall time after the last result file was written; other = scancel + sinfo "
          "+ srun;\n rounds = jobcell: executor polls that ran a Slurm command, submitit: sacct "
          "watcher updates;\n sq/round = most squeue calls in one jobcell round)")
    by = {r["run"]: r for r in rows}
    targets = []
    squeue_rounds = [by[n] for n in ("jobcell-single", "jobcell-array") if n in by]
    if squeue_rounds:
        worst = max(r["max_squeue_per_round"] for r in squeue_rounds)
        targets.append({"name": "jobcell: most squeue calls in one polling round",
                        "value": worst, "unit": "calls",
                        "target": f"<= {TARGET_SQUEUE_PER_ROUND}",
                        "passed": worst <= TARGET_SQUEUE_PER_ROUND
                        and all(r["squeue_outside_poll"] == 0 for r in squeue_rounds)})
    if "jobcell-array" in by:
        r = by["jobcell-array"]
        targets.append({"name": f"jobcell: sbatch calls, {args.steps} steps, array batching",
                        "value": r["calls"]["sbatch"], "unit": "calls",
                        "target": f"<= {TARGET_SBATCH_ARRAY}",
                        "passed": r["calls"]["sbatch"] <= TARGET_SBATCH_ARRAY and r["ok"]})
    for mode in ("single", "array"):
        ours, theirs = by.get(f"jobcell-{mode}"), by.get(f"submitit-{mode}")
        if ours is None or theirs is None:
            continue
        ratio = ours["seconds"] / theirs["seconds"]
        note = "" if theirs["ok"] else " (submitit did not finish every job)"
        targets.append({"name": f"wall time jobcell / submitit, {mode}{note}", "value": ratio,
                        "unit": "x", "target": "<= 1.0x (no worse than submitit)",
                        "passed": ratio <= 1.0 and ours["ok"]})
    print("\ntargets:")
    for t in targets:
        value = f"{t['value']:.2f}x" if t["unit"] == "x" else f"{t['value']} {t['unit']}"
        print(f"  {'PASS' if t['passed'] else 'MISS'}  {t['name']}: {value} "
              f"(target {t['target']})")
    for t in targets:  # run_all.py's fmt() knows "%" and plain units
        if t["unit"] == "x":
            t["unit"] = "x submitit"
    emit({"benchmark": "slurm", "machine": machine(), "steps": args.steps, "runs": rows,
          "targets": targets}, args.json_out)
    return 0 if all(r["ok"] for r in rows if r["tool"] == "jobcell") else 1


if __name__ == "__main__":
    sys.exit(main())
