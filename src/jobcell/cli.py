"""The ``jobcell`` command: parse, call the service, print. Thin by design."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from jobcell import __version__
from jobcell.errors import JobcellError, SpecError, describe_yaml_error

EXIT_FAILED = 1
EXIT_TIMEOUT = 124




def _out() -> Any:
    """The rich-based renderer, imported only for output meant for people."""
    from jobcell import cli_output

    return cli_output


def print_json(value: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_error(message: str) -> None:
    """One sentence on stderr."""
    sys.stderr.write(f"jobcell: {message}\n")


class _CtrlC:
    """Remembers a Ctrl-C even when Python swallows its ``KeyboardInterrupt``.

    A SIGINT that lands inside a weakref or ``__del__`` callback (an import lock
    being released, say) is printed as "Exception ignored" and lost; long waits
    check this flag on every round so the interrupt still ends them.
    """

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.seen:
            raise KeyboardInterrupt


class JobcellGroup(click.Group):
    """Turns every error into one clear sentence on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _CtrlC.handler)
        try:
            return super().invoke(ctx)
        except JobcellError as exc:
            print_error(str(exc))
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            print_error("interrupted")
            sys.exit(130)
        except Exception as exc:  # a bug: still no bare traceback unless asked for
            if os.environ.get("JOBCELL_DEBUG"):
                traceback.print_exc()
            print_error(f"internal error: {type(exc).__name__}: {exc} "
                        "(set JOBCELL_DEBUG=1 to see the traceback)")
            sys.exit(EXIT_FAILED)


def common(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--home`` and ``--json`` to a command."""

    @click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Cell home (default: $JOBCELL_HOME, else the user data dir).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


def open_cell(home: Path | None, auto_worker: bool = True) -> Any:
    from jobcell.service import Cell

    return Cell(home, auto_worker=auto_worker)


def load_spec_file(path: str) -> Any:
    """Read a job spec from a YAML or JSON file, or from stdin when ``path`` is ``-``."""
    import yaml

    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            file = Path(path)
            if file.is_dir():
                raise SpecError(f"spec file {path!r} is a directory")
            if not file.is_file():
                raise SpecError(f"spec file {path!r} does not exist")
            text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{name}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"spec file {name!r} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{name}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{name}: {describe_yaml_error(exc)}") from None
    if data is None:
        raise SpecError(f"{name}: the job spec is empty")
    return data


@click.group(cls=JobcellGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobcell")
def main() -> None:
    """jobcell: a durable job runtime for scientific computing."""


# -- jobs -------------------------------------------------------------------------------
@main.command()
@click.argument("spec")
@click.option("--label", help="Set the job's label (the submitting domain).")
@click.option("--tag", "tags", multiple=True, help="Add a tag (repeatable).")
@click.option("--owner", help="Submit on behalf of this owner (default: the OS user).")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after S seconds.")
@common
def submit(spec: str, label: str | None, tags: tuple[str, ...], owner: str | None, wait_: bool,
           timeout: float | None, home: Path | None, as_json: bool) -> None:
    """Submit the job spec in SPEC (a YAML or JSON file, or - for stdin)."""
    data = load_spec_file(spec)
    with open_cell(home) as cell:
        result = cell.submit(data, owner=owner, label=label, tags=tags)
        if not wait_:
            if as_json:
                print_json(result.to_dict())
            elif result.deduplicated:
                _out().console.print(f"job {result.job_id} (identical to an existing job: "
                              "deduplicated, nothing new was queued)")
            else:
                _out().console.print(f"submitted job {result.job_id}")
            return
        if not as_json:
            note = " (deduplicated)" if result.deduplicated else ""
            _out().console.print(f"submitted job {result.job_id}{note}")
        _wait_and_report(cell, result.job_id, timeout, as_json,
                         extra={"deduplicated": result.deduplicated})


def _wait_and_report(cell: Any, job_id: str, timeout: float | None, as_json: bool,
                     extra: dict[str, Any] | None = None) -> None:
    with _out().progress_bar(enabled=not as_json and sys.stderr.isatty()) as update:

        def each_round(status: dict[str, Any]) -> None:
            _CtrlC.check()
            update(status)

        status = cell.wait(job_id, timeout_s=timeout, on_progress=each_round)
    if as_json:
        print_json({**status, **(extra or {})})
    else:
        _out().show_status(status)
    if status["state"] == "succeeded":
        return
    if status["state"] in ("queued", "running"):
        print_error(f"job {job_id} is still {status['state']} after {timeout:g} s")
        sys.exit(EXIT_TIMEOUT)
    sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_id")
@common
def status(job_id: str, home: Path | None, as_json: bool) -> None:
    """Show a job's state and its steps."""
    with open_cell(home, auto_worker=False) as cell:
        result = cell.status(job_id)
    print_json(result) if as_json else _out().show_status(result)


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="Give up after S seconds (exit 124).")
@common
def wait(job_id: str, timeout: float | None, home: Path | None, as_json: bool) -> None:
    """Wait for a job to end; exit 0 only if it succeeded."""
    with open_cell(home) as cell:
        _wait_and_report(cell, job_id, timeout, as_json)


@main.command()
@click.argument("job_id")
@click.option("--step", default=None, help="Only this step.")
@click.option("--last", "last_n", type=click.IntRange(min=0), default=50, show_default=True,
              help="Lines per stream.")
@common
def logs(job_id: str, step: str | None, last_n: int, home: Path | None, as_json: bool) -> None:
    """Show the last lines of each step's stdout and stderr."""
    with open_cell(home, auto_worker=False) as cell:
        result = cell.logs(job_id, step=step, last_n=last_n)
    print_json(result) if as_json else _out().show_logs(result)


@main.command()
@click.argument("job_id")
@common
def outputs(job_id: str, home: Path | None, as_json: bool) -> None:
    """List a job's output files with size and BLAKE3 digest."""
    with open_cell(home, auto_worker=False) as cell:
        result = cell.outputs(job_id)
    print_json(result) if as_json else _out().show_outputs(result)


@main.command()
@click.argument("job_id")
@common
def result(job_id: str, home: Path | None, as_json: bool) -> None:
    """Show a job's result: each step's JSON value and the final value."""
    with open_cell(home, auto_worker=False) as cell:
        value = cell.result(job_id)
    if as_json:
        print_json(value)
        return
    _out().console.print(f"job {value['job_id']}  {_out().styled_state(value['state'])}")
    if value["error"]:
        _out().console.print(f"[red]error:[/red] {value['error']}")
    _out().console.print_json(json.dumps(value["result"], default=str))


@main.command(name="list")
@click.option("--label", default=None)
@click.option("--state", default=None, help="queued, running, succeeded, failed or cancelled.")
@click.option("--tag", default=None)
@click.option("--owner", default=None)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@common
def list_jobs(label: str | None, state: str | None, tag: str | None, owner: str | None,
              limit: int, offset: int, home: Path | None, as_json: bool) -> None:
    """List jobs, newest first."""
    with open_cell(home, auto_worker=False) as cell:
        jobs = cell.list(label=label, state=state, tag=tag, owner=owner, limit=limit,
                         offset=offset)
    print_json(jobs) if as_json else _out().show_jobs(jobs)


@main.command()
@click.argument("job_id")
@common
def cancel(job_id: str, home: Path | None, as_json: bool) -> None:
    """Cancel a job: its running steps are stopped, the rest never start."""
    with open_cell(home) as cell:
        answer = cell.cancel(job_id)
    if as_json:
        print_json(answer)
    elif answer["cancelled"]:
        _out().console.print(f"job {job_id} cancelled")
    else:
        _out().console.print(f"job {job_id} is {answer['state']}"
                      + (f": {answer['reason']}" if answer.get("reason") else ""))


@main.command()
@click.argument("job_id")
@common
def events(job_id: str, home: Path | None, as_json: bool) -> None:
    """Show a job's events, oldest first."""
    with open_cell(home, auto_worker=False) as cell:
        rows = cell.events(job_id)
    if as_json:
        print_json(rows)
        return
    skip = {"seq", "kind", "step", "at"}
    _out().table(None, ["at", "event", "step", "details"],
          [[e["at"], e["kind"], e["step"] or "",
            " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)] for e in rows])


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON is taken as JSON, else as text."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--param {pair!r} must look like key=value")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


@main.command()
@click.argument("runner")
@click.option("--param", "-p", "pairs", multiple=True,
              help="A param as key=value (JSON values allowed; repeatable).")
@click.option("--timeout", type=float, default=None,
              help="Seconds before the run is stopped (default: the runner's timeout_s).")
@common
def run(runner: str, pairs: tuple[str, ...], timeout: float | None, home: Path | None,
        as_json: bool) -> None:
    """Run a session-plane RUNNER inline and print its value (nothing is queued)."""
    with open_cell(home, auto_worker=False) as cell:
        answer = cell.run_session(runner, _parse_params(pairs), timeout_s=timeout)
    if as_json:
        print_json(answer)
    elif answer["succeeded"]:
        _out().console.print_json(json.dumps(answer["value"], default=str))
    else:
        print_error(f"runner {runner!r} failed: {answer['error']}")
        for line in answer["stderr"][-10:]:
            sys.stderr.write(f"  {line}\n")
    if not answer["succeeded"]:
        sys.exit(EXIT_FAILED)


# -- the cell ---------------------------------------------------------------------------
@main.command()
@common
def capabilities(home: Path | None, as_json: bool) -> None:
    """Show what this cell offers and where each figure came from."""
    with open_cell(home, auto_worker=False) as cell:
        caps = cell.capabilities()
    print_json(caps) if as_json else _out().show_mapping("capabilities", caps)


@main.group()
def scheduler() -> None:
    """Inspect the scheduler."""


@scheduler.command(name="status")
@common
def scheduler_status(home: Path | None, as_json: bool) -> None:
    """Capacity, used, free, leases, queue depth and the worker."""
    with open_cell(home, auto_worker=False) as cell:
        state = cell.scheduler_status()
    if as_json:
        print_json(state)
        return
    out = _out()
    rows = [[name, state[name]["cpu_slots"], state[name]["memory_mb"],
             ",".join(state[name]["gpus"]) or "-"] for name in ("capacity", "used", "free")]
    out.table("resources", ["", "cpu slots", "memory MB", "GPUs"], rows)
    if state["leases"]:
        out.table("leases", ["job", "step", "runner", "owner", "cpu", "MB", "GPUs", "since"],
                  [[x["job_id"], x["step"], x["runner"], x["owner"], x["cpu_slots"],
                    x["memory_mb"], ",".join(x["gpus"]) or "-", x["started_at"]]
                   for x in state["leases"]])
    queue = state["queue"]
    out.console.print(f"queue depth: {queue['depth']}  by runner: {queue['by_runner']}  "
                      f"by owner: {queue['by_owner']}  waiting on a cache twin: "
                      f"{queue['waiting_cache']}")
    if state["cooldowns"]:
        out.table("cooldowns and throttles", ["group", "phase", "cooldown until",
                                              "throttled until", "max", "reason"],
                  [[c["group"], c["phase"], c["cooldown_until"], c["throttle_until"],
                    c["throttle_max"], c["reason"]] for c in state["cooldowns"]])
    else:
        out.console.print("cooldowns: none")
    _print_worker(state["worker"])


@main.command()
@click.option("--older-than", "older_than", type=float, default=None, metavar="DAYS",
              help="Remove terminal jobs that finished more than DAYS ago "
                   "(default: the cell's gc_max_age_days).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@common
def gc(home: Path | None, as_json: bool, older_than: float | None, dry_run: bool) -> None:
    """Remove old finished jobs and their artifacts (the worker also does this hourly)."""
    with open_cell(home, auto_worker=False) as cell:
        report = cell.gc(older_than_days=older_than, dry_run=dry_run)
    if as_json:
        print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    age = report["older_than_days"]
    jobs = (f"{report['jobs_removed']} job(s) finished more than {age:g} day(s) ago"
            if age is not None else "no jobs (gc_max_age_days is 0: keep forever)")
    _out().console.print(f"{verb} {jobs} and {report['orphan_dirs_removed']} orphaned "
                         f"artifact folder(s); {report['bytes_freed']:,} bytes")


@main.group()
def worker() -> None:
    """Start, stop or inspect the cell's worker."""


def _print_worker(info: dict[str, Any]) -> None:
    if info["pid"] is None:
        _out().console.print("worker: not running")
    else:
        alive = "alive" if info["alive"] else "not alive (stale lock)"
        _out().console.print(f"worker: pid {info['pid']} on {info['hostname']}, {alive}, last "
                      f"heartbeat {info['heartbeat_age_s']} s ago")


@worker.command(name="start")
@common
def worker_start(home: Path | None, as_json: bool) -> None:
    """Start the worker (or report the live one)."""
    with open_cell(home, auto_worker=False) as cell:
        before = cell.worker_status()
        if not before["alive"]:
            cell.ensure_worker()
        # Read the status back through the service so both paths print the same shape
        # (ensure_worker's own answer carries a raw UNIX started_at).
        info = cell.worker_status()
    info = {**info, "already_running": bool(before["alive"])}
    if as_json:
        print_json(info)
        return
    if before["alive"]:
        _out().console.print("a worker is already running for this cell")
    _print_worker(info)


@worker.command(name="stop")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@common
def worker_stop(timeout: float, home: Path | None, as_json: bool) -> None:
    """Stop the worker with signals and clear its lock (running steps go on)."""
    with open_cell(home, auto_worker=False) as cell:
        answer = cell.stop_worker(timeout_s=timeout)
    if as_json:
        print_json(answer)
    elif answer["stopped"]:
        _out().console.print(f"stopped the worker (pid {answer['pid']})")
    else:
        _out().console.print(answer["reason"])


@worker.command(name="status")
@common
def worker_status(home: Path | None, as_json: bool) -> None:
    """Show the worker's PID, liveness and heartbeat age."""
    with open_cell(home, auto_worker=False) as cell:
        info = cell.worker_status()
    print_json(info) if as_json else _print_worker(info)


@main.group()
def runners() -> None:
    """List, show and validate runners."""


@runners.command(name="list")
@common
def runners_list(home: Path | None, as_json: bool) -> None:
    """List the registered runners (and files that failed validation)."""
    with open_cell(home, auto_worker=False) as cell:
        found = cell.runners()
        errors = dict(cell.registry.errors)
    rows = [{"name": r.name, "version": r.version, "plane": r.plane,
             "kind": "python" if r.python else "command", "source": r.source,
             "hash": r.definition_hash()} for r in found.values()]
    if as_json:
        print_json({"runners": rows, "errors": errors})
        return
    _out().table(None, ["runner", "version", "plane", "kind", "source"],
          [[r["name"], r["version"], r["plane"], r["kind"], r["source"]] for r in rows])
    for problem in errors.values():
        _out().error_console.print(f"[red]invalid:[/red] {problem}", markup=True)


@runners.command(name="show")
@click.argument("name")
@common
def runners_show(name: str, home: Path | None, as_json: bool) -> None:
    """Show one runner's full definition."""
    with open_cell(home, auto_worker=False) as cell:
        runner = cell.runner(name)
    data = {**runner.model_dump(mode="json", by_alias=True, exclude_none=True),
            "hash": runner.definition_hash()}
    if as_json:
        print_json(data)
    else:
        import yaml

        _out().console.out(yaml.safe_dump(data, sort_keys=False), highlight=False)


@runners.command(name="validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@common
def runners_validate(file: Path, home: Path | None, as_json: bool) -> None:
    """Validate a runner YAML file without registering it."""
    from jobcell.registry import load_runner_file

    runner = load_runner_file(file)
    if as_json:
        print_json({"valid": True, "name": runner.name, "hash": runner.definition_hash()})
    else:
        _out().console.print(f"{file}: valid runner {runner.name!r} (version {runner.version})")


@main.group()
def config() -> None:
    """Show the cell's configuration."""


@config.command(name="show")
@common
def config_show(home: Path | None, as_json: bool) -> None:
    """Print every option's effective value and where it came from."""
    with open_cell(home, auto_worker=False) as cell:
        rows = cell.settings.describe()
        root = str(cell.home.root)
    if as_json:
        print_json({"home": root, "options": rows})
        return
    _out().console.print(f"home: {root}")
    _out().table(None, ["option", "value", "source"],
          [[r["name"], json.dumps(r["value"]), r["source"]] for r in rows])


@main.command()
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cell home for the demo (default: a new temporary directory).")
@click.option("--lines", type=click.IntRange(1, 1_000_000), default=2000, show_default=True,
              help="Lines of text each generator writes.")
def demo(home: Path | None, lines: int) -> None:
    """Run the demo pipeline on the embedded default and show scheduling, caching, results."""
    from jobcell.demo import run_demo

    sys.exit(run_demo(home, lines))


# The HTTP server's commands live in their own module (it imports the helpers above).
from jobcell.cli_server import serve, upload, users  # noqa: E402

for _command in (serve, users, upload):
    main.add_command(_command)

if __name__ == "__main__":
    main()
