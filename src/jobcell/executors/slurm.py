"""Slurm executor: attempts become sbatch jobs (arrays where they can), polled in one
squeue call per round.

Files and recovery. Before sbatch runs, ``slurm_submit.json`` in the local attempt
directory names the Slurm job (and array index) about to be submitted; right after sbatch
answers, ``external_backend.json`` records the job id. A worker that dies in between
finds the job again by that name in the next squeue round, so nothing is submitted twice.
Batch scripts are kept (they are small and say how an attempt ran): ``slurm-batch.sh`` in
the attempt directory, or ``<home>/slurm/arrays/<token>/batch.sh`` for an array, whose
``slurm-%A_%a.out``/``.err`` go next to it (the directory is removed once every member
this executor submitted has been forgotten).

Staging. With ``slurm_tmp_io`` the backend sees attempts under
``<slurm_tmp_io>/<cell_id>/<path below the artifacts root>``: each attempt directory is
copied there before sbatch (through the transport, or a plain copy into
``slurm_tmp_io_local`` when that mount is given), results are copied back when the
``exit_code`` appears (never the local ``input/``), and the copy is removed on forget.
Without it, the cell's files are shared and ``backend_path_mappings`` translate paths.

Status. The ``exit_code`` file is the authority; Slurm's state only says a job is still
queued or running, or explains an end without the file (see
:func:`jobcell.executors.slurm_text.interpret`). A failing squeue makes every attempt
UNKNOWN; nothing is ever resubmitted from ``poll``.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import select
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from jobcell.executors import slurm_text as text
from jobcell.executors.base import BackendCapabilities, Launch, Phase, Status
from jobcell.executors.delegated import (
    BackendRecord,
    MissingClock,
    Outage,
    parse_exit_code,
    read_record,
    write_record,
)
from jobcell.executors.transport import CommandResult, Transport, TransportError
from jobcell.executors.wrapper import wrapper_script
from jobcell.launching import map_path
from jobcell.settings import Settings

MARKER_FILE = "slurm_submit.json"
BATCH_SCRIPT = "slurm-batch.sh"
ARRAY_SCRIPT = "batch.sh"
SBATCH_TIMEOUT_S = 120.0
QUERY_TIMEOUT_S = 60.0
CAPABILITIES_TTL_S = 300.0
CAPABILITIES_RETRY_S = 30.0

_RUNNING = Status(Phase.RUNNING)
_UNKNOWN = Status(Phase.UNKNOWN)


@dataclass
class _Tracked:
    """One attempt this executor follows."""

    key: str
    attempt_dir: Path
    backend_dir: str
    backend_id: str | None = None
    job_name: str | None = None          # the Slurm job name (the array's, for a member)
    array_index: int | None = None
    time_limit_s: float | None = None
    status: Status = _RUNNING
    final: bool = False
    submit_error: str | None = None      # sbatch failed: FAILED unless found by name
    maybe_submitted: bool = False        # sbatch's outcome is unknown: grace before FAILED
    cancel: bool | None = None           # a cancel (True: forced) waiting to be sent
    array_dir: str | None = None


@dataclass
class _Submission:
    """One sbatch call: its launches, script and job name."""

    launches: list[Launch]
    items: list[_Tracked]
    script: str
    job_name: str
    array: bool


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_marker(attempt_dir: Path) -> dict[str, Any]:
    """What ``slurm_submit.json`` says was about to be submitted (empty when absent)."""
    try:
        data = json.loads((attempt_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class SlurmExecutor:
    """Runs attempts as Slurm batch jobs through a transport (local commands or SSH)."""

    name = "slurm"
    delegated = True
    enforces_timeout = True   # --time

    def __init__(self, settings: Settings, *, transport: Transport, wrapper_path: Path,
                 artifacts_root: Path, cell_id: str,
                 clock: Callable[[], float] = time.time, log: TextIO | None = None) -> None:
        self.settings = settings
        self.transport = transport
        self.wrapper_path = wrapper_path
        self.artifacts_root = artifacts_root
        self.cell_id = cell_id
        self.clock = clock
        self.log = log
        self._tracked: dict[str, _Tracked] = {}
        self._outage = Outage("Slurm status query (squeue)", log=log)
        self._missing = MissingClock(settings.backend_exit_code_grace_s)
        self._interval: float = settings.backend_poll_interval_s
        self._next_round = float("-inf")
        self._urgent = False
        self._submitted_since_round = False
        self._accounting: bool | None = None   # None: not probed yet
        self._wrapper_installed = False
        self._array_refs: dict[str, int] = {}
        self._capabilities: BackendCapabilities | None = None
        self._capabilities_error: str | None = None
        self._capabilities_until = float("-inf")

    # --- paths ---------------------------------------------------------------------------

    @property
    def _tmp_io(self) -> str | None:
        value: str | None = self.settings.slurm_tmp_io
        return (value.rstrip("/") or "/") if value else None

    def backend_path(self, attempt_dir: Path) -> str:
        tmp_io = self._tmp_io
        if tmp_io is None:
            return map_path(str(attempt_dir), self.settings.backend_path_mappings)
        try:
            relative = attempt_dir.relative_to(self.artifacts_root)
        except ValueError:
            try:
                relative = attempt_dir.resolve().relative_to(self.artifacts_root.resolve())
            except ValueError:
                raise ValueError(f"{attempt_dir} is not under the artifacts root "
                                 f"{self.artifacts_root}; it cannot be staged") from None
        return posixpath.join(tmp_io, self.cell_id, relative.as_posix())

    def _local_mount(self, backend: str) -> Path | None:
        """Where a staged backend path lies locally, when ``slurm_tmp_io_local`` is set."""
        mount, tmp_io = self.settings.slurm_tmp_io_local, self._tmp_io
        if not mount or tmp_io is None:
            return None
        return Path(mount) / posixpath.relpath(backend, tmp_io)

    def _wrapper_backend_path(self) -> str:
        tmp_io = self._tmp_io
        if tmp_io is None:
            return map_path(str(self.wrapper_path), self.settings.backend_path_mappings)
        path = posixpath.join(tmp_io, self.cell_id, "wrapper.sh")
        if not self._wrapper_installed:
            shell = self.settings.slurm_script_shell
            self._write(path, wrapper_script(shell).encode(), 0o755)
            self._wrapper_installed = True
        return path

    def _array_dir(self, token: str) -> str:
        tmp_io = self._tmp_io
        if tmp_io is not None:
            return posixpath.join(tmp_io, self.cell_id, "_slurm", "arrays", token)
        local = self.artifacts_root.parent / "slurm" / "arrays" / token
        return map_path(str(local), self.settings.backend_path_mappings)

    # --- backend files -------------------------------------------------------------------

    def _write(self, backend: str, data: bytes, mode: int = 0o644) -> None:
        local = self._local_mount(backend)
        if local is None:
            self.transport.write_file(backend, data, mode)
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, local)

    def _remove(self, backend: str) -> None:
        local = self._local_mount(backend)
        try:
            if local is None:
                self.transport.remove_tree(backend)
            else:
                shutil.rmtree(local, ignore_errors=True)
        except (TransportError, OSError) as exc:
            self._say(f"could not remove {backend}: {exc}")

    def _stage(self, item: _Tracked) -> None:
        local = self._local_mount(item.backend_dir)
        if local is None:
            self.transport.put_tree(item.attempt_dir, item.backend_dir)
        else:
            # Inputs may be symlinks to the cell's files: the backend gets their content.
            shutil.copytree(item.attempt_dir, local, dirs_exist_ok=True, symlinks=False,
                            ignore_dangling_symlinks=True)

    def _fetch(self, item: _Tracked) -> None:
        """Copy a staged attempt's results back; the local ``input/`` stays as it is."""
        remote_input = posixpath.join(item.backend_dir, "input")
        local = self._local_mount(item.backend_dir)
        if local is None:
            self.transport.remove_tree(remote_input)
            self.transport.get_tree(item.backend_dir, item.attempt_dir)
        else:
            shutil.rmtree(local / "input", ignore_errors=True)
            shutil.copytree(local, item.attempt_dir, dirs_exist_ok=True, symlinks=True)
        self._drop_links(item)

    def _drop_links(self, item: _Tracked) -> None:
        """A symlink the step left (say ``stderr.log`` -> ``/etc/shadow``) would point into
        *this* host once fetched: none is kept, so logs and outputs are only what the step
        wrote (a declared output that was a link is then missing, and the step fails)."""
        for path in item.attempt_dir.rglob("*"):
            try:
                relative = path.relative_to(item.attempt_dir)
                if relative.parts[0] != "input" and path.is_symlink():
                    self._say(f"{item.key}: dropped the symlink {relative} fetched back")
                    path.unlink()
            except (OSError, ValueError, IndexError):
                continue

    def _read_exit_code(self, item: _Tracked) -> int | None:
        if self._tmp_io is None:
            try:
                return parse_exit_code((item.attempt_dir / "exit_code").read_bytes())
            except OSError:
                return None
        backend = posixpath.join(item.backend_dir, "exit_code")
        local = self._local_mount(backend)
        if local is None:
            return parse_exit_code(self.transport.read_file(backend))
        try:
            return parse_exit_code(local.read_bytes())
        except OSError:
            return None

    # --- commands ------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], timeout: float = QUERY_TIMEOUT_S) -> CommandResult:
        return self.transport.run(argv, timeout=timeout, env=self.settings.slurm_env)

    def _say(self, line: str) -> None:
        print(f"slurm: {line}", file=self.log or sys.stderr, flush=True)

    # --- submit --------------------------------------------------------------------------

    def submit(self, launches: list[Launch]) -> dict[str, str]:
        self._interval = self.settings.backend_poll_interval_s
        self._next_round = min(self._next_round, self.clock() + self._interval)
        self._submitted_since_round = True
        started: dict[str, str] = {}
        for chunk in self._chunks(self._valid(launches)):
            submission = self._describe(chunk)
            try:
                started.update(self._submit_chunk(submission))
            except Exception as exc:  # never lose track of a chunk sbatch may have taken
                started.update(self._sbatch_failed(submission, f"{type(exc).__name__}: {exc}",
                                                   maybe_submitted=True))
        return started

    def _valid(self, launches: list[Launch]) -> list[Launch]:
        """The launches a batch script can carry; the others fail alone, not their array."""
        valid = []
        for launch in launches:
            try:
                text.check_launch(launch)
            except ValueError as exc:
                item = _Tracked(launch.key, launch.attempt_dir, launch.remote_dir)
                self._tracked[launch.key] = item
                self._finish(item, Status(Phase.FAILED,
                                          reason=f"could not prepare the Slurm job: {exc}"))
                continue
            valid.append(launch)
        return valid

    def _chunks(self, launches: list[Launch]) -> list[list[Launch]]:
        """Launches grouped by (runner, resources), each group cut to the array limit."""
        groups: dict[tuple[Any, ...], list[Launch]] = {}
        for launch in launches:
            groups.setdefault((launch.runner, launch.resources), []).append(launch)
        size = self.settings.slurm_max_array_size
        return [group[i:i + size] for group in groups.values()
                for i in range(0, len(group), size)]

    def _submit_chunk(self, submission: _Submission) -> dict[str, str]:
        try:
            argv = self._prepare(submission)
        except TransportError as exc:
            self._not_submitted(submission, f"could not stage the attempt: {exc}",
                                Phase.INTERRUPTED)
            return {}
        except (OSError, ValueError) as exc:
            self._not_submitted(submission, f"could not prepare the Slurm job: {exc}",
                                Phase.FAILED)
            return {}
        try:
            result = self._run(argv, SBATCH_TIMEOUT_S)
        except TransportError as exc:
            return self._sbatch_failed(submission, str(exc), maybe_submitted=True)
        if not result.ok:
            first = (result.stderr.strip() or result.stdout.strip() or
                     f"exit status {result.returncode}").splitlines()[0]
            # The controller being away is not a verdict on the job: look for it, then
            # requeue the attempt rather than fail it.
            return self._sbatch_failed(submission, first,
                                       maybe_submitted=text.transient_error(result.stderr))
        try:
            job_id = text.parse_sbatch(result.stdout)
        except ValueError as exc:
            return self._sbatch_failed(submission, str(exc), maybe_submitted=True)
        return self._submitted(submission, job_id)

    def _describe(self, chunk: list[Launch]) -> _Submission:
        array = len(chunk) > 1
        if array:
            token = f"{int(self.clock())}-{secrets.token_hex(4)}"
            array_dir = self._array_dir(token)
            script = posixpath.join(array_dir, ARRAY_SCRIPT)
            job_name = f"jobcell-{self.cell_id}-array-{token}"
        else:
            array_dir = None
            script = posixpath.join(chunk[0].remote_dir, BATCH_SCRIPT)
            job_name = chunk[0].job_name or text.derived_job_name(
                self.cell_id, chunk[0].key, chunk[0].attempt_dir.name) or \
                f"jobcell-{self.cell_id}-{secrets.token_hex(4)}"
        items = []
        for index, launch in enumerate(chunk):
            item = _Tracked(launch.key, launch.attempt_dir, launch.remote_dir,
                            job_name=job_name, array_index=index if array else None,
                            time_limit_s=launch.resources.timeout_s, array_dir=array_dir)
            self._tracked[launch.key] = item
            items.append(item)
        return _Submission(chunk, items, script, job_name, array)

    def _prepare(self, submission: _Submission) -> list[str]:
        """Write the markers, stage the attempts, write the script; the sbatch argv."""
        now = self.clock()
        for item in submission.items:
            _atomic_json(item.attempt_dir / MARKER_FILE, {
                "job_name": submission.job_name, "array_index": item.array_index,
                "script": submission.script, "backend_dir": item.backend_dir,
                "written_at": now})
        wrapper = self._wrapper_backend_path()
        if self._tmp_io is not None:
            for item in submission.items:
                self._stage(item)
        script = text.batch_script(
            submission.launches, wrapper=wrapper, shell=self.settings.slurm_script_shell,
            before=self.settings.preparation_script_before,
            after=self.settings.preparation_script_after, array=submission.array,
            unset=[name for name in os.environ if name.startswith("JOBCELL_")])
        self._write(submission.script, script.encode(), 0o755)
        if self.settings.debug_slurm_script:
            self._say(f"batch script {submission.script}:\n{script}")
        backend_gpus = None
        if any(launch.resources.optional_gpus > 0 for launch in submission.launches):
            backend_gpus = self.capabilities().details.get("gpus_per_node_max")
        return text.sbatch_argv(
            submission.launches, sbatch=self.settings.slurm_sbatch, script_path=submission.script,
            partition=self.settings.slurm_partition, account=self.settings.slurm_account,
            qos=self.settings.slurm_qos, extra=self.settings.sbatch_extra,
            array_indices=list(range(len(submission.launches))) if submission.array else None,
            backend_gpus=backend_gpus, job_name=submission.job_name)

    def _submitted(self, submission: _Submission, job_id: str) -> dict[str, str]:
        now = self.clock()
        started: dict[str, str] = {}
        if submission.array and submission.items[0].array_dir:
            self._array_refs[submission.items[0].array_dir] = len(submission.items)
        for item in submission.items:
            item.backend_id = job_id if item.array_index is None \
                else f"{job_id}_{item.array_index}"
            self._record(item, now, submission.script)
            started[item.key] = item.backend_id
        return started

    def _record(self, item: _Tracked, now: float, script: str | None) -> None:
        assert item.backend_id is not None
        record = BackendRecord("slurm", item.backend_id, now, script=script,
                               job_name=item.job_name, backend_dir=item.backend_dir)
        try:
            write_record(item.attempt_dir, record)
        except OSError as exc:  # the marker still lets a new worker find the job by name
            self._say(f"could not record {item.backend_id} for {item.key}: {exc}")

    def _sbatch_failed(self, submission: _Submission, error: str, *,
                       maybe_submitted: bool) -> dict[str, str]:
        self._say(f"sbatch failed for {len(submission.items)} attempt(s): {error}")
        for item in submission.items:
            item.submit_error = f"sbatch failed: {error}"
            item.maybe_submitted = maybe_submitted
        # A job that did reach Slurm is found by its name in the next round, which comes
        # at once, so that the next poll already answers.
        self._urgent = True
        return {}

    def _not_submitted(self, submission: _Submission, reason: str, phase: Phase) -> None:
        self._say(f"{len(submission.items)} attempt(s) not submitted: {reason}")
        for item in submission.items:
            self._finish(item, Status(phase, reason=reason))

    # --- adopt, terminate, forget --------------------------------------------------------

    def adopt(self, key: str, attempt_dir: Path, backend_id: str | None,
              job_name: str | None = None) -> None:
        """Follow an attempt an earlier worker submitted. Without an id (given or in
        ``external_backend.json``) the job is looked up by name in the next round: from
        ``slurm_submit.json``, else ``job_name``, else derived from the key and directory.
        """
        record = read_record(attempt_dir)
        marker = read_marker(attempt_dir)
        backend_id = backend_id or (record.backend_id if record else None)
        backend_dir = (record.backend_dir if record else None) or marker.get("backend_dir")
        if not isinstance(backend_dir, str):
            try:
                backend_dir = self.backend_path(attempt_dir)
            except ValueError:
                backend_dir = str(attempt_dir)
        item = _Tracked(key, attempt_dir, backend_dir, backend_id=backend_id)
        if backend_id is None:
            name = marker.get("job_name") or job_name or \
                text.derived_job_name(self.cell_id, key, attempt_dir.name)
            item.job_name = name if isinstance(name, str) else None
            index = marker.get("array_index")
            item.array_index = index if isinstance(index, int) else None
            self._urgent = True
        self._tracked[key] = item

    def terminate(self, key: str, force: bool = False) -> None:
        item = self._tracked.get(key)
        if item is None or item.final:
            return
        # Sent in the next round, batched with the others; kept until scancel took it
        # (a controller that is down keeps it pending, never drops it).
        item.cancel = force or bool(item.cancel)
        self._urgent = True

    def _scancel(self, ids: list[str], force: bool) -> bool:
        argv = text.scancel_argv(self.settings.slurm_scancel, ids, force=force)
        try:
            result = self._run(argv)
        except TransportError as exc:
            self._say(f"scancel {' '.join(ids)} failed: {exc}; retrying next round")
            return False
        if result.ok:
            return True
        self._say(f"scancel {' '.join(ids)}: {result.describe()}")
        # Jobs that already ended need no cancel; anything else is tried again.
        gone = ("invalid job id", "already completing or completed", "job has already finished")
        return any(text_ in result.stderr.lower() for text_ in gone)

    def forget(self, key: str) -> None:
        item = self._tracked.pop(key, None)
        if item is None:
            return
        self._missing.seen(key)
        if self._tmp_io is not None:
            self._remove(item.backend_dir)
        if item.array_dir in self._array_refs:
            self._array_refs[item.array_dir] -= 1
            if self._array_refs[item.array_dir] <= 0:
                del self._array_refs[item.array_dir]
                self._remove(item.array_dir)

    # --- poll ----------------------------------------------------------------------------

    def tracked(self) -> set[str]:
        """Keys of the attempts this executor is watching."""
        return set(self._tracked)

    def poll(self) -> dict[str, Status]:
        now = self.clock()
        live = [item for item in self._tracked.values() if not item.final]
        if live and self._round_due(now):
            self._round(live, now)
        return {key: item.status for key, item in self._tracked.items()}

    def _round_due(self, now: float) -> bool:
        if self._outage.active:
            return self._outage.may_try(now)
        return self._urgent or now >= self._next_round

    def _round(self, live: list[_Tracked], now: float) -> None:
        before = {item.key: item.status for item in live}
        self._urgent = False
        try:
            result = self._run(text.squeue_argv(self.settings.slurm_squeue))
            error = None if result.ok else result.describe()
        except TransportError as exc:
            error = str(exc)
        if error is not None:
            self._outage.failed(now, error)
            for item in live:
                item.status = _UNKNOWN
            return
        self._outage.succeeded(now)
        self._apply(live, text.parse_squeue_rows(result.stdout), now)
        changed = self._submitted_since_round or any(
            item.status != before[item.key] for item in live)
        self._submitted_since_round = False
        minimum = self.settings.backend_poll_interval_s
        maximum = max(minimum, self.settings.backend_poll_max_interval_s)
        self._interval = minimum if changed else min(maximum, self._interval * 2)
        self._next_round = now + self._interval

    def _apply(self, live: list[_Tracked], rows: list[text.QueueRow], now: float) -> None:
        by_id = {row.backend_id: row for row in rows}
        by_name: dict[str, list[text.QueueRow]] = {}
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
        ended: list[tuple[_Tracked, str | None]] = []
        for item in live:
            if item.backend_id is None and not self._look_up(item, by_name, now):
                continue
            found = by_id.get(item.backend_id or "")
            if found is not None and text.is_active(found.state):
                item.status = _RUNNING
                self._missing.seen(item.key)
            else:
                ended.append((item, found.state if found else None))
        self._send_cancels(live)
        self._settle(ended, now)

    def _look_up(self, item: _Tracked, by_name: dict[str, list[text.QueueRow]],
                 now: float) -> bool:
        """Find a job whose id was never recorded by its name; True when its id is known
        (or it must be settled from its files)."""
        rows = by_name.get(item.job_name or "", []) if item.job_name else []
        if item.array_index is not None:
            rows = [r for r in rows if r.backend_id.endswith(f"_{item.array_index}")]
        if rows:
            item.backend_id = max(rows, key=lambda r: text.id_order(r.backend_id)).backend_id
            self._say(f"found {item.key} in Slurm as {item.backend_id} ({item.job_name})")
            item.submit_error = None
            self._record(item, now, None)
            return True
        if item.submit_error is None:
            return True  # adopted without an id: its exit_code file or the grace decides
        if not item.maybe_submitted:
            self._finish(item, Status(Phase.FAILED, reason=item.submit_error))
        elif self._missing.expired(item.key, now):
            # Not in Slurm after all: nothing ran; a new attempt is submitted.
            self._finish(item, Status(Phase.INTERRUPTED, reason=item.submit_error))
        return False

    def _send_cancels(self, live: list[_Tracked]) -> None:
        for force in (False, True):
            ids = [item.backend_id for item in live if item.cancel is force
                   and item.backend_id is not None and not item.final]
            if ids and self._scancel(sorted(ids), force):
                for item in live:
                    if item.backend_id in ids:
                        item.cancel = None

    def _settle(self, ended: list[tuple[_Tracked, str | None]], now: float) -> None:
        """Attempts Slurm no longer runs: the exit_code file, else Slurm's word on them."""
        unexplained: list[_Tracked] = []
        for item, state in ended:
            try:
                code = self._read_exit_code(item)
                if code is not None and self._tmp_io is not None:
                    self._fetch(item)
            except (TransportError, OSError) as exc:
                self._say(f"could not read the results of {item.key}: {exc}")
                item.status = _UNKNOWN
                continue
            if code is not None:
                self._finish(item, text.interpret(state, code,
                                                  time_limit_s=item.time_limit_s))
            elif state is None:
                unexplained.append(item)
            else:
                self._explain(item, state, None, now, in_queue=True)
        records = self._accounting_records([i.backend_id or "" for i in unexplained])
        for item in unexplained:
            record = records.get(item.backend_id or "")
            state = record.state if record and not text.is_active(record.state) else None
            self._explain(item, state, record.exit_code if record else None, now,
                          in_queue=False)

    def _explain(self, item: _Tracked, state: str | None, slurm_exit: str | None,
                 now: float, *, in_queue: bool) -> None:
        outcome = text.outcome_of(state)
        waits = outcome in (None, text.Outcome.ENDED)
        expired = self._missing.expired(item.key, now) if waits else False
        if not waits and in_queue and slurm_exit is None and item.backend_id:
            slurm_exit = self._scontrol_exit(item.backend_id)
        status = text.interpret(state, None, slurm_exit=slurm_exit, grace_expired=expired,
                                time_limit_s=item.time_limit_s)
        if status.phase is Phase.RUNNING:
            item.status = _RUNNING
            return
        if text.normalize_state(state or "") == "REQUEUED" and item.backend_id:
            # Slurm would run this attempt again beside the one jobcell starts next.
            self._scancel([item.backend_id], True)
        self._finish(item, status)

    def _scontrol_exit(self, backend_id: str) -> str | None:
        try:
            result = self._run(text.scontrol_argv(self.settings.slurm_scontrol, backend_id))
        except TransportError:
            return None
        record = text.parse_scontrol_job(result.stdout) if result.ok else None
        return record.exit_code if record else None

    def _accounting_records(self, ids: list[str]) -> dict[str, text.JobRecord]:
        """sacct's records of ``ids``; the first call also probes whether accounting is
        on (when it is off, sacct is never asked again)."""
        ids = [i for i in ids if i]
        if not ids or self._accounting is False:
            return {}
        try:
            result = self._run(text.sacct_argv(self.settings.slurm_sacct, ids))
        except TransportError:
            return {}
        if text.accounting_disabled(result):
            self._accounting = False
            return {}
        if not result.ok:
            return {}
        self._accounting = True
        return text.parse_sacct(result.stdout)

    def _finish(self, item: _Tracked, status: Status) -> None:
        item.status = status
        item.final = True
        item.cancel = None
        self._missing.seen(item.key)

    # --- wait, capabilities, close -------------------------------------------------------

    def wait(self, timeout: float, wake_fds: Sequence[int] = ()) -> None:
        delay = max(0.0, timeout)
        if any(not item.final for item in self._tracked.values()):
            due = 0.0 if self._urgent else (
                self._outage.retry_at if self._outage.active else self._next_round)
            delay = min(delay, max(0.0, due - self.clock()))
        if wake_fds:
            select.select(list(wake_fds), [], [], delay)
        elif delay > 0:
            time.sleep(delay)

    def _probe(self) -> None:
        now = self.clock()
        if now < self._capabilities_until:
            return
        try:
            result = self._run(text.sinfo_argv(self.settings.slurm_sinfo), 30.0)
            error = None if result.ok else result.describe()
        except TransportError as exc:
            error = str(exc)
        now = self.clock()   # sinfo may have taken long: cache from when it answered
        if error is None:
            self._capabilities = text.parse_sinfo(result.stdout)
            self._capabilities_until = now + CAPABILITIES_TTL_S
        else:
            self._capabilities = BackendCapabilities(
                "slurm", gpu_source="unknown (sinfo failed)", details={"error": error})
            self._capabilities_until = now + CAPABILITIES_RETRY_S
        self._capabilities_error = error

    def capabilities(self) -> BackendCapabilities:
        self._probe()
        assert self._capabilities is not None
        return self._capabilities

    def usable(self) -> str | None:
        self._probe()
        if self._capabilities_error is None:
            return None
        return (f"Slurm cannot be reached through {self.transport.description}: sinfo "
                f"failed ({self._capabilities_error}).")

    def close(self) -> None:
        self.transport.close()

