"""Slurm as text: the batch scripts and command lines jobcell builds, and the parsers of
what Slurm's commands print. Pure functions, no I/O: :mod:`jobcell.executors.slurm` runs
them through a transport.

Quoting: every value that comes from a step (directories, argv, exported values) reaches
the batch script through :func:`shlex.quote` and the Slurm commands as separate argv
elements, so quotes, spaces, newlines, ``$()``, backticks and ``;`` stay inert.

Status query: one ``squeue --me --states=all --array`` per round, never ``--jobs=``.
Slurm 22.05 answers ``squeue --jobs=<one id it no longer knows>`` with exit 1 and
"slurm_load_jobs error: Invalid job id specified" (with two or more unknown ids it exits 0
and prints nothing), so a listing by id would turn one vanished job into a failed round.
``--me`` lists every job of the submitting user that the controller remembers (until
``MinJobAge``) in one call that cannot fail for a vanished id; the caller keeps the ids it
tracks and, through the job name column, finds submissions whose id was never recorded.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any, NamedTuple

from jobcell.executors.base import BackendCapabilities, Launch, Phase, Status
from jobcell.executors.transport import CommandResult

#: Exit status of an array task whose index the script has no launch for.
UNKNOWN_INDEX_EXIT = 97
#: The exit code a Slurm ``OUT_OF_MEMORY`` end is reported with (like a SIGKILL).
OOM_EXIT_CODE = 137

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Outcome(Enum):
    """What a Slurm job state means for the attempt it runs."""

    ACTIVE = "active"          # queued, running or held: keep waiting
    ENDED = "ended"            # ended on its own: the exit_code file tells how
    REQUEUE = "requeue"        # the cluster lost it (node, preemption): a new attempt
    OOM = "oom"                # killed for memory
    LIMIT = "limit"            # killed at its time limit or deadline
    CANCELLED = "cancelled"    # cancelled in Slurm (scancel, an admin)


#: Every Slurm job state (long names, as ``squeue %T``, ``sacct`` and ``scontrol`` print
#: them) and what it means. A state missing here counts as ACTIVE: Slurm still lists it.
SLURM_STATES: dict[str, Outcome] = {
    "PENDING": Outcome.ACTIVE,
    "RUNNING": Outcome.ACTIVE,
    "CONFIGURING": Outcome.ACTIVE,
    "COMPLETING": Outcome.ACTIVE,
    "SUSPENDED": Outcome.ACTIVE,
    "STOPPED": Outcome.ACTIVE,
    "RESIZING": Outcome.ACTIVE,
    "SIGNALING": Outcome.ACTIVE,
    "STAGE_OUT": Outcome.ACTIVE,
    "REQUEUE_HOLD": Outcome.ACTIVE,
    "REQUEUE_FED": Outcome.ACTIVE,
    "RESV_DEL_HOLD": Outcome.ACTIVE,
    "SPECIAL_EXIT": Outcome.ACTIVE,   # requeued and held by the site's epilog
    "COMPLETED": Outcome.ENDED,
    "FAILED": Outcome.ENDED,
    "REVOKED": Outcome.ENDED,         # a federation sibling started elsewhere
    "NODE_FAIL": Outcome.REQUEUE,
    "PREEMPTED": Outcome.REQUEUE,
    "BOOT_FAIL": Outcome.REQUEUE,
    "REQUEUED": Outcome.REQUEUE,
    "OUT_OF_MEMORY": Outcome.OOM,
    "TIMEOUT": Outcome.LIMIT,
    "DEADLINE": Outcome.LIMIT,
    "CANCELLED": Outcome.CANCELLED,
}


def normalize_state(text: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``CANCELLED+`` (sacct, truncated) likewise."""
    words = text.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def outcome_of(state: str | None) -> Outcome | None:
    """What a state means; None for no state at all (Slurm no longer knows the job)."""
    if state is None or not normalize_state(state):
        return None
    return SLURM_STATES.get(normalize_state(state), Outcome.ACTIVE)


def is_active(state: str) -> bool:
    """Whether a job in ``state`` may still run (queued, running, held)."""
    return outcome_of(state) is Outcome.ACTIVE


# --- batch scripts -----------------------------------------------------------------------


def _check_text(value: str, what: str) -> str:
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL byte, which no command line can carry")
    return value


def _export_lines(exports: dict[str, str], indent: str) -> list[str]:
    lines = []
    for name in sorted(exports):
        if not _IDENTIFIER.match(name):
            raise ValueError(f"cannot export {name!r}: not a shell variable name "
                             "(letters, digits and _, not starting with a digit)")
        value = _check_text(exports[name], f"the value of {name}")
        lines.append(f"{indent}export {name}={shlex.quote(value)}")
    return lines


def _wrapper_line(launch: Launch, wrapper: str, shell: str, indent: str) -> str:
    words = [shell, wrapper, launch.remote_dir, *launch.argv]
    for word in words:
        _check_text(word, "an argument")
    return indent + shlex.join(words)


def check_launch(launch: Launch) -> None:
    """Raise ValueError when a launch cannot be put in a batch script (an export name that
    is not a shell variable, a NUL byte anywhere)."""
    _export_lines(launch.exports, "")
    for word in (launch.remote_dir, *launch.argv):
        _check_text(word, "an argument")


def _check_shell(shell: str) -> str:
    if not shell.startswith("/") or any(c.isspace() for c in shell) or "\0" in shell:
        raise ValueError(f"the script shell must be an absolute path without spaces: {shell!r}")
    return shell


def batch_script(launches: Sequence[Launch], *, wrapper: str, shell: str,
                 before: Sequence[str], after: Sequence[str], array: bool,
                 unset: Sequence[str] = ()) -> str:
    """The sbatch script for one launch, or for an array of launches (index ``i`` runs
    ``launches[i]``). All sbatch options go on the command line; the script only sets up
    the environment, runs the step wrapper and exits with its status.

    ``unset``: variables the job would inherit from the submitting worker (sbatch exports
    its environment) that a step must not see, such as jobcell's own settings with the
    admin key; removed first, before the site's lines and the step's exports.

    ``before``/``after`` (the site's preparation lines) are copied verbatim; the exports
    come after ``before`` so that jobcell's values win over what a module load sets.
    """
    _check_shell(shell)
    if not launches:
        raise ValueError("a batch script needs at least one launch")
    if not array and len(launches) != 1:
        raise ValueError("a plain batch script runs exactly one launch; use array=True")
    lines = [f"#!{shell}", "# jobcell batch script: all sbatch options are on its command line",
             "set -u"]
    drop = sorted({name for name in unset if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)})
    if drop:
        lines.append("unset " + " ".join(drop))
    lines.extend(before)
    if array:
        lines.extend(_array_body(launches, wrapper, shell))
    else:
        lines.extend(_export_lines(launches[0].exports, ""))
        lines.append(_wrapper_line(launches[0], wrapper, shell, ""))
        lines.append("jobcell_status=$?")
    lines.extend(after)
    lines.append('exit "$jobcell_status"')
    return "\n".join(lines) + "\n"


def _array_body(launches: Sequence[Launch], wrapper: str, shell: str) -> list[str]:
    lines = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    for index, launch in enumerate(launches):
        lines.append(f"  {index})")
        lines.extend(_export_lines(launch.exports, "    "))
        lines.append(_wrapper_line(launch, wrapper, shell, "    "))
        lines.append("    jobcell_status=$?")
        lines.append("    ;;")
    lines.extend([
        "  *)",
        "    printf 'jobcell: no launch for array index %s\\n' "
        '"${SLURM_ARRAY_TASK_ID:-unset}" >&2',
        f"    exit {UNKNOWN_INDEX_EXIT}",
        "    ;;",
        "esac",
    ])
    return lines


# --- sbatch ------------------------------------------------------------------------------


def _slurm_filename(path: str) -> str:
    """A directory for an sbatch filename pattern: ``%`` is Slurm's escape character."""
    return path.replace("%", "%%")


def array_job_name(launches: Sequence[Launch]) -> str:
    """The default name of an array: the members' common ``-``-separated name prefix
    plus ``-array`` (``jobcell-<cell>-array`` for members of different jobs)."""
    names = [launch.job_name.split("-") for launch in launches]
    common: list[str] = []
    for words in zip(*names, strict=False):
        if len(set(words)) != 1:
            break
        common.append(words[0])
    return "-".join([*common, "array"]) if common else "jobcell-array"


def gpus_to_request(required: int, optional: int, backend_gpus: int | None) -> int:
    """Required GPUs, plus optional ones only when the backend reports GPUs: the total is
    capped at ``backend_gpus`` (GPUs on the best node) but never below ``required``."""
    if not backend_gpus or backend_gpus <= 0 or optional <= 0:
        return required
    return max(required, min(required + optional, backend_gpus))


def time_limit(timeout_s: float) -> str:
    """``--time`` in whole minutes, rounded up, at least 1."""
    return str(max(1, math.ceil(timeout_s / 60.0)))


def format_indices(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5`` (the ``--array`` syntax)."""
    ordered = sorted(set(indices))
    if not ordered or ordered[0] < 0:
        raise ValueError("array indices must be non-negative and at least one")
    parts: list[str] = []
    start = previous = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts)


def sbatch_argv(launches: Sequence[Launch], *, sbatch: str, script_path: str,
                partition: str | None = None, account: str | None = None,
                qos: str | None = None, extra: Sequence[str] = (),
                array_indices: Sequence[int] | None = None, backend_gpus: int | None = None,
                job_name: str | None = None) -> list[str]:
    """The sbatch command line that submits ``script_path`` (from :func:`batch_script`).

    The resources are those of ``launches[0]`` (an array groups launches with equal
    resources). A single launch writes Slurm's own output to ``<backend_dir>/slurm-%j.*``
    and runs there; an array (``array_indices`` given) writes ``slurm-%A_%a.*`` next to its
    script and runs in the script's directory. ``--no-requeue``: one Slurm job is exactly
    one attempt; a job the cluster loses (NODE_FAIL, PREEMPTED) ends and jobcell starts a
    new attempt, so Slurm never reruns an attempt beside its successor.
    """
    if not launches:
        raise ValueError("nothing to submit")
    first = launches[0]
    resources = first.resources
    if array_indices is None:
        name = job_name or first.job_name
        output_dir = first.remote_dir
        pattern = "slurm-%j"
    else:
        name = job_name or array_job_name(launches)
        output_dir = script_path.rsplit("/", 1)[0] or "/"
        pattern = "slurm-%A_%a"
    argv = [sbatch, "--parsable", f"--job-name={name}",
            f"--output={_slurm_filename(output_dir)}/{pattern}.out",
            f"--error={_slurm_filename(output_dir)}/{pattern}.err",
            f"--chdir={output_dir}", "--no-requeue",
            f"--mem={resources.memory_mb}M", f"--cpus-per-task={resources.cpu_slots}",
            f"--time={time_limit(resources.timeout_s)}"]
    gpus = gpus_to_request(resources.gpus, resources.optional_gpus, backend_gpus)
    if gpus > 0:
        argv.append(f"--gres=gpu:{gpus}")
    for option, value in (("partition", partition), ("account", account), ("qos", qos)):
        if value:
            argv.append(f"--{option}={value}")
    if array_indices is not None:
        argv.append(f"--array={format_indices(array_indices)}")
    argv.extend(extra)
    argv.append(script_path)
    for word in argv:
        _check_text(word, "an sbatch argument")
    return argv


def parse_sbatch(stdout: str) -> str:
    """The job id ``sbatch --parsable`` printed (``123`` or ``123;cluster``)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines:
        job_id = lines[-1].split(";", 1)[0].strip()
        if job_id.isdigit():
            return job_id
    shown = stdout.strip()[:200] or "nothing"
    raise ValueError(f"sbatch --parsable printed {shown!r} where a job id was expected")


def derived_job_name(cell_id: str, key: str, attempt_dir_name: str) -> str | None:
    """``jobcell-<cell>-<job>-<step>-<attempt>`` from a ``<job_id>/<step_id>`` key and an
    ``attempt-<n>`` directory name (as :func:`jobcell.launching.job_name` builds it)."""
    job_id, _, step_id = key.partition("/")
    attempt = attempt_dir_name.removeprefix("attempt-")
    if not step_id or not attempt.isdigit():
        return None
    return f"jobcell-{cell_id}-{job_id}-{step_id}-{attempt}"


def id_order(backend_id: str) -> tuple[int, int]:
    """A sort key for ``123`` / ``123_4`` ids: the newest submission sorts last."""
    job, _, index = backend_id.partition("_")
    return (int(job) if job.isdigit() else -1, int(index) if index.isdigit() else -1)


# --- squeue ------------------------------------------------------------------------------


class QueueRow(NamedTuple):
    """One line of the squeue listing: an id (``123`` or ``123_4``), its state, its name."""

    backend_id: str
    state: str
    name: str


def squeue_argv(squeue: str) -> list[str]:
    """One listing of every job of the submitting user, array tasks one per line, final
    states included (see the module docstring for why no ``--jobs``)."""
    return [squeue, "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%j"]


def expand_ids(text: str) -> list[str]:
    """``123_[1-3,7%2]`` -> ``123_1 123_2 123_3 123_7``; other ids as they are."""
    match = re.fullmatch(r"(\d+)_\[([^\]]*)\]", text)
    if not match:
        return [text]
    base, spec = match.groups()
    spec = spec.split("%", 1)[0]
    ids: list[str] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return [text]
        ids.extend(f"{base}_{i}" for i in range(int(low), int(high or low) + 1))
    return ids


def parse_squeue_rows(text: str) -> list[QueueRow]:
    """The rows of :func:`squeue_argv`'s output (names may contain ``|``)."""
    rows: list[QueueRow] = []
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) < 2 or not parts[0]:
            continue
        name = parts[2] if len(parts) == 3 else ""
        rows.extend(QueueRow(i, normalize_state(parts[1]), name) for i in expand_ids(parts[0]))
    return rows


def parse_squeue(text: str) -> dict[str, str]:
    """Backend id -> Slurm state, from :func:`squeue_argv`'s output."""
    return {row.backend_id: row.state for row in parse_squeue_rows(text)}


# --- sacct and scontrol ------------------------------------------------------------------


class JobRecord(NamedTuple):
    """How Slurm remembers a job: its state and its ``exit:signal`` pair (``0:9``)."""

    state: str
    exit_code: str | None


def sacct_argv(sacct: str, ids: Iterable[str]) -> list[str]:
    """One accounting query for the allocations (not the steps) of ``ids``."""
    return [sacct, "--noheader", "--parsable2", "--allocations",
            "--format=JobID,State,ExitCode", f"--jobs={','.join(ids)}"]


def parse_sacct(text: str) -> dict[str, JobRecord]:
    """Backend id -> record, from :func:`sacct_argv`'s output (``CANCELLED by 0`` ->
    ``CANCELLED``; step lines such as ``123.batch`` are skipped)."""
    records: dict[str, JobRecord] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        exit_code = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
        for job_id in expand_ids(parts[0]):
            records[job_id] = JobRecord(normalize_state(parts[1]), exit_code)
    return records


def accounting_disabled(result: CommandResult) -> bool:
    """Whether sacct said accounting is off (Slurm prints it with exit 0 or 1): that text
    is never a job status."""
    text = f"{result.stdout}\n{result.stderr}".lower()
    return "accounting storage is disabled" in text


def scontrol_argv(scontrol: str, backend_id: str) -> list[str]:
    """What the controller still remembers of one job (until ``MinJobAge``)."""
    return [scontrol, "show", "job", backend_id]


def parse_scontrol_job(text: str) -> JobRecord | None:
    """The state and exit pair of ``scontrol show job``; None when it named no job."""
    state = re.search(r"\bJobState=(\S+)", text)
    if state is None:
        return None
    exit_code = re.search(r"\bExitCode=(\d+:\d+)", text)
    return JobRecord(normalize_state(state.group(1)), exit_code.group(1) if exit_code else None)


def parse_exit_pair(text: str | None) -> tuple[int, int] | None:
    """``1:0`` -> (1, 0): the exit status and the signal that ended the job."""
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def scancel_argv(scancel: str, ids: Sequence[str], *, force: bool = False) -> list[str]:
    """Cancel ``ids``: plainly (TERM to every process of the job, KILL after the cluster's
    ``KillWait``), or with ``force`` KILL right away to the whole job, batch shell too."""
    if force:
        return [scancel, "--signal=KILL", "--full", *ids]
    return [scancel, *ids]


# --- sinfo -------------------------------------------------------------------------------


def sinfo_argv(sinfo: str) -> list[str]:
    """One line per node and partition: name, partition, CPUs, memory (MB), GRES, state."""
    return [sinfo, "--noheader", "--Node", "--format=%N|%P|%c|%m|%G|%T"]


_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)")


def gpu_count(gres: str) -> int:
    """GPUs in a GRES column: ``gpu:2``, ``gpu:tesla:4(S:0-1)``, ``(null)`` -> 0; several
    types add up (``gpu:a100:2,gpu:v100:1`` -> 3)."""
    return sum(int(count) for count in _GPU_GRES.findall(gres.strip()))


def _number(text: str) -> int | None:
    digits = text.strip().rstrip("+")
    return int(digits) if digits.isdigit() else None


def parse_sinfo(text: str) -> BackendCapabilities:
    """What :func:`sinfo_argv`'s output says the cluster offers (a node listed in several
    partitions counts once)."""
    partitions: list[str] = []
    default: str | None = None
    nodes: dict[str, tuple[int | None, int | None, int, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6 or not parts[0]:
            continue
        node, partition, cpu_text, memory_text, gres, state = parts[:6]
        name = partition.rstrip("*")
        if partition.endswith("*"):
            default = name
        if name and name not in partitions:
            partitions.append(name)
        nodes[node] = (_number(cpu_text), _number(memory_text), gpu_count(gres), state.strip())
    if not nodes:
        return BackendCapabilities("slurm", gpu_source="sinfo listed no nodes")
    cpus = [c for c, _, _, _ in nodes.values()]
    memory = [m for _, m, _, _ in nodes.values()]
    gpus = [g for _, _, g, _ in nodes.values()]
    details: dict[str, Any] = {
        "default_partition": default, "gpus_per_node_max": max(gpus),
        "memory_mb_per_node_max": max((m for m in memory if m is not None), default=None),
        "node_states": {node: info[3] for node, info in sorted(nodes.items())}}
    return BackendCapabilities(
        "slurm", gpus=sum(gpus), gpu_source="sinfo GRES", partitions=tuple(partitions),
        nodes=len(nodes), cpus=_total(cpus), memory_mb=_total(memory), details=details)


def _total(values: list[int | None]) -> int | None:
    """The sum, or None when any value is unknown."""
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


# --- interpretation ----------------------------------------------------------------------


def _reason(outcome: Outcome, state: str, slurm_exit: str | None,
            time_limit_s: float | None) -> str:
    """Why Slurm ended a job, in words."""
    if outcome is Outcome.CANCELLED:
        return "cancelled in Slurm"
    if outcome is Outcome.REQUEUE:
        return f"Slurm {state}: the cluster lost the job"
    if state == "TIMEOUT":
        limit = f"time limit {time_limit(time_limit_s)} min" if time_limit_s else "time limit"
        detail = f"{limit} reached"
    elif state == "OUT_OF_MEMORY":
        detail = "the job exceeded its memory"
    else:
        detail = ""
    if slurm_exit:
        detail = f"{detail}, exit {slurm_exit}" if detail else f"exit {slurm_exit}"
    return f"Slurm {state} ({detail})" if detail else f"Slurm {state}"


def interpret(state: str | None, exit_code_file: int | None, *, slurm_exit: str | None = None,
              grace_expired: bool = False, time_limit_s: float | None = None) -> Status:
    """What an attempt's Slurm state (None: Slurm no longer knows the job) and its
    ``exit_code`` file (None: not written) mean.

    The file always wins; the state only explains a non-zero code (OOM, TIMEOUT, ...).
    Without the file: active -> RUNNING; OUT_OF_MEMORY -> FAILED 137, OOM-like; TIMEOUT or
    DEADLINE -> FAILED; CANCELLED -> FAILED; NODE_FAIL, PREEMPTED, BOOT_FAIL, REQUEUED ->
    INTERRUPTED (a new attempt); COMPLETED, FAILED or unknown -> RUNNING until
    ``grace_expired`` (a shared filesystem may lag), then INTERRUPTED.
    """
    outcome = outcome_of(state)
    name = normalize_state(state or "")
    if exit_code_file is not None:
        if exit_code_file == 0 or outcome in (None, Outcome.ACTIVE, Outcome.ENDED):
            return Status(Phase.EXITED, exit_code_file)
        assert outcome is not None
        return Status(Phase.EXITED, exit_code_file,
                      reason=_reason(outcome, name, slurm_exit, time_limit_s),
                      oom_like=outcome is Outcome.OOM)
    if outcome is Outcome.ACTIVE:
        return Status(Phase.RUNNING)
    if outcome in (Outcome.OOM, Outcome.LIMIT, Outcome.CANCELLED, Outcome.REQUEUE):
        assert outcome is not None
        return Status(Phase.INTERRUPTED if outcome is Outcome.REQUEUE else Phase.FAILED,
                      OOM_EXIT_CODE if outcome is Outcome.OOM else None,
                      reason=_reason(outcome, name, slurm_exit, time_limit_s),
                      oom_like=outcome is Outcome.OOM)
    if not grace_expired:
        return Status(Phase.RUNNING)
    how = f"ended as {name}" if name else "left Slurm's queue"
    return Status(Phase.INTERRUPTED, reason=f"the job {how} without writing an exit_code")


TRANSIENT_SBATCH_ERRORS = ("unable to contact slurm controller", "socket timed out",
                           "temporarily unable", "connection refused", "slurm_persist_conn",
                           "try again")


def transient_error(stderr: str) -> bool:
    """Whether an sbatch failure says the controller was unreachable or busy (the job may
    or may not exist; never a verdict on the job itself)."""
    lowered = stderr.lower()
    return any(text in lowered for text in TRANSIENT_SBATCH_ERRORS)
