"""SlurmExecutor driven directly (no worker) against the real test Slurm cluster, plus its
poll scheduling with a scripted transport and a fake clock."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jobcell.executors.base import Launch, Phase, Status, StepResources
from jobcell.executors.delegated import RECORD_FILE, read_record
from jobcell.executors.embedded import install_wrapper
from jobcell.executors.slurm import BATCH_SCRIPT, MARKER_FILE, SlurmExecutor
from jobcell.executors.transport import CommandResult, LocalTransport, TransportError
from jobcell.settings import load_settings

CELL_ID = "c0ffee"
FINAL = (Phase.EXITED, Phase.FAILED, Phase.INTERRUPTED)
FAST = {"backend_poll_interval_s": 0.2, "backend_poll_max_interval_s": 1.0,
        "backend_exit_code_grace_s": 3.0}
slurm = pytest.mark.slurm


class CountingTransport(LocalTransport):
    """The local transport, remembering every command it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, input_text: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CommandResult:
        self.calls.append(tuple(argv))
        return super().run(argv, input_text=input_text, timeout=timeout, env=env)

    def count(self, program: str) -> int:
        return sum(1 for argv in self.calls if os.path.basename(argv[0]) == program)


class Cell:
    """A cell's paths and one SlurmExecutor on them."""

    def __init__(self, root: Path, env: dict[str, str], **options: Any) -> None:
        self.root = root
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.wrapper = root / "wrapper.sh"
        install_wrapper(self.wrapper)
        self.env = env
        self.options = options
        self.transport = CountingTransport()
        self.log = io.StringIO()
        self.executor = self.new_executor()

    def new_executor(self, **options: Any) -> SlurmExecutor:
        settings = load_settings(None, env={}, overrides={
            "slurm_env": self.env, **FAST, **self.options, **options})
        self.transport = CountingTransport()
        self.log = io.StringIO()
        return SlurmExecutor(settings, transport=self.transport, wrapper_path=self.wrapper,
                             artifacts_root=self.artifacts, cell_id=CELL_ID, log=self.log)

    def launch(self, job: str, script: str, **fields: Any) -> Launch:
        return make_launch(self.executor, self.artifacts, job, script, **fields)


def make_launch(executor: SlurmExecutor, artifacts: Path, job: str, script: str, *,
                step: str = "s1", attempt: int = 1, resources: StepResources | None = None,
                argv: tuple[str, ...] = ()) -> Launch:
    """An attempt directory as launching.build_launch leaves it, and its Launch."""
    attempt_dir = artifacts / job / step / f"attempt-{attempt}"
    (attempt_dir / "output").mkdir(parents=True)
    (attempt_dir / "input").mkdir()
    (attempt_dir / "input" / "data.txt").write_text("input data\n")
    backend_dir = executor.backend_path(attempt_dir)
    exports = {"JOBCELL_JOB_ID": job, "JOBCELL_STEP_ID": step,
               "JOBCELL_ATTEMPT": str(attempt), "JOBCELL_STEP_DIR": backend_dir}
    return Launch(key=f"{job}/{step}", attempt_dir=attempt_dir,
                  argv=argv or ("/bin/sh", "-c", script), env={}, exports=exports,
                  runner="sh", job_name=f"jobcell-{CELL_ID}-{job}-{step}-{attempt}",
                  resources=resources or StepResources(memory_mb=100, timeout_s=600),
                  backend_dir=backend_dir)


def wait_final(executor: SlurmExecutor, keys: Sequence[str],
               timeout: float = 60.0) -> dict[str, Status]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, Status] = {}
    while time.monotonic() < deadline:
        statuses = executor.poll()
        if all(key in statuses and statuses[key].phase in FINAL for key in keys):
            return statuses
        executor.wait(0.5)
    raise AssertionError(f"not final after {timeout:.0f} s: {statuses}")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def slurm_state(cluster: Any, backend_id: str) -> str:
    states = cluster.job_states(backend_id)
    return states[0] if states else ""


@pytest.fixture
def cell(tmp_path: Path, slurm_cluster: Any) -> Iterator[Cell]:
    made = Cell(tmp_path / "cell", dict(slurm_cluster.env))
    yield made
    for item in made.executor.tracked():
        made.executor.terminate(item, force=True)
    made.executor.close()


# --- with the real cluster ---------------------------------------------------------------


@slurm
def test_a_job_runs_and_its_exit_code_is_reported(cell: Cell) -> None:
    ok = cell.launch("ok", "echo hi > output/x; echo out; echo err >&2")
    failing = cell.launch("bad", "exit 3")
    started = cell.executor.submit([ok])
    started.update(cell.executor.submit([failing]))
    assert set(started) == {"ok/s1", "bad/s1"} and all(v.isdigit() for v in started.values())
    for launch in (ok, failing):
        record = read_record(launch.attempt_dir)
        assert record is not None and record.backend_id == started[launch.key]
        assert record.backend == "slurm" and record.job_name == launch.job_name
        assert record.script == f"{launch.backend_dir}/{BATCH_SCRIPT}"
        assert (launch.attempt_dir / MARKER_FILE).exists()
    statuses = wait_final(cell.executor, ["ok/s1", "bad/s1"])
    assert statuses["ok/s1"] == Status(Phase.EXITED, 0)
    assert statuses["bad/s1"] == Status(Phase.EXITED, 3)
    assert (ok.attempt_dir / "output" / "x").read_text() == "hi\n"
    assert (ok.attempt_dir / "stdout.log").read_text() == "out\n"
    assert (ok.attempt_dir / "stderr.log").read_text() == "err\n"
    assert (ok.attempt_dir / "child.pid").exists()
    assert (ok.attempt_dir / BATCH_SCRIPT).exists()  # kept: how the attempt ran
    assert (ok.attempt_dir / f"slurm-{started['ok/s1']}.out").exists()
    assert cell.transport.count("sacct") == 0 and cell.transport.count("scontrol") == 0


@slurm
def test_hostile_paths_and_arguments_arrive_byte_exact(cell: Cell) -> None:
    hostile = ["a'; echo foo", "$(touch pwned)", "`touch pwned`", "semi;colon", "two  spaces",
               'double "q" \\', "%j %A", "", "üñí", "a\nb"]
    job = "j'ob \"x\" $(touch pwned) `id`;q %j\nnl"
    launch = cell.launch(job, "", argv=(
        "/bin/sh", "-c", 'for a in "$@"; do printf "%s\\0" "$a"; done > output/argv', "sh",
        *hostile))
    cell.executor.submit([launch])
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 0)
    recorded = (launch.attempt_dir / "output" / "argv").read_bytes().split(b"\0")[:-1]
    assert recorded == [value.encode() for value in hostile]
    assert not list(cell.root.rglob("pwned"))


@slurm
def test_six_launches_make_one_array_and_one_sbatch_call(cell: Cell) -> None:
    launches = [cell.launch(f"job{i}", f"echo {i} > output/x; exit {i}") for i in range(6)]
    started = cell.executor.submit(launches)
    assert cell.transport.count("sbatch") == 1
    array_ids = {value.split("_")[0] for value in started.values()}
    assert len(array_ids) == 1
    array_id = array_ids.pop()
    assert sorted(started.values()) == sorted(f"{array_id}_{i}" for i in range(6))
    polls_before = cell.transport.count("squeue")
    rounds = 0
    deadline = time.monotonic() + 60
    statuses: dict[str, Status] = {}
    while time.monotonic() < deadline:
        statuses = cell.executor.poll()
        rounds += 1
        if all(s.phase in FINAL for s in statuses.values()):
            break
        cell.executor.wait(0.5)
    assert cell.transport.count("squeue") - polls_before <= rounds  # one call per round
    for i, launch in enumerate(launches):
        assert statuses[launch.key] == Status(Phase.EXITED, i)
        assert (launch.attempt_dir / "output" / "x").read_text() == f"{i}\n"
        record = read_record(launch.attempt_dir)
        assert record is not None and record.backend_id == started[launch.key]
    assert record is not None
    script = Path(record.script or "")
    assert script.parent.parent == cell.root / "slurm" / "arrays"
    for launch in launches:
        cell.executor.forget(launch.key)
    assert not script.parent.exists()  # removed with the last member


@slurm
def test_groups_with_different_resources_are_separate_submissions(cell: Cell) -> None:
    small = [cell.launch(f"small{i}", "true") for i in range(2)]
    big = [cell.launch(f"big{i}", "true", resources=StepResources(memory_mb=200, timeout_s=60))
           for i in range(2)]
    single = cell.launch("single", "true", resources=StepResources(cpu_slots=2))
    cell.executor = cell.new_executor(slurm_max_array_size=1)
    started = cell.executor.submit([*small, *big, single])
    assert len(started) == 5
    assert cell.transport.count("sbatch") == 5  # array size 1: every launch alone
    assert all("_" not in value for value in started.values())
    wait_final(cell.executor, list(started))


@slurm
def test_a_runner_killed_by_sigkill_exits_137(cell: Cell) -> None:
    launch = cell.launch("oom", "kill -9 $$")
    cell.executor.submit([launch])
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 137)


@slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_time_limit_is_slurms_and_its_timeout_explains_the_end(cell: Cell) -> None:
    launch = cell.launch("late", "sleep 600",
                         resources=StepResources(memory_mb=100, timeout_s=30))
    cell.executor.submit([launch])
    sbatch = next(argv for argv in cell.transport.calls if argv[0].endswith("sbatch"))
    assert "--time=1" in sbatch
    status = wait_final(cell.executor, [launch.key], timeout=200)[launch.key]
    # Slurm TERMs the job at its limit: the wrapper records 143, the state says why.
    assert status == Status(Phase.EXITED, 143,
                            reason="Slurm TIMEOUT (time limit 1 min reached)")


@slurm
def test_scancel_from_outside_is_never_a_success(cell: Cell, slurm_cluster: Any) -> None:
    launch = cell.launch("victim", "sleep 300")
    backend_id = cell.executor.submit([launch])[launch.key]
    wait_until(lambda: (launch.attempt_dir / "child.pid").exists())
    assert cell.executor.poll()[launch.key].phase is Phase.RUNNING
    assert slurm_cluster.run("scancel", backend_id).returncode == 0
    status = wait_final(cell.executor, [launch.key])[launch.key]
    assert status.phase in (Phase.EXITED, Phase.FAILED)
    assert status.exit_code != 0


@slurm
@pytest.mark.parametrize("force", [False, True])
def test_terminate_stops_the_job(cell: Cell, force: bool) -> None:
    launch = cell.launch("stop", "sleep 300")
    cell.executor.submit([launch])
    wait_until(lambda: (launch.attempt_dir / "child.pid").exists())
    cell.executor.terminate(launch.key, force=force)
    status = wait_final(cell.executor, [launch.key], timeout=40)[launch.key]
    assert status.phase is not Phase.EXITED or status.exit_code != 0
    if not force:
        # the wrapper recorded the TERM; Slurm's state explains it
        assert status == Status(Phase.EXITED, 143, reason="cancelled in Slurm")


@slurm
def test_a_failing_sbatch_fails_the_attempt_at_the_next_poll(cell: Cell) -> None:
    cell.executor = cell.new_executor(slurm_partition="nope")
    launch = cell.launch("nopart", "true")
    assert cell.executor.submit([launch]) == {}
    status = cell.executor.poll()[launch.key]
    assert status.phase is Phase.FAILED
    assert status.reason == "sbatch failed: sbatch: error: invalid partition specified: nope"
    assert read_record(launch.attempt_dir) is None


@slurm
def test_a_failing_squeue_makes_steps_unknown_then_they_finish(cell: Cell,
                                                               tmp_path: Path) -> None:
    broken = tmp_path / "squeue-broken"
    broken.write_text("#!/bin/sh\necho 'squeue: error: broken on purpose' >&2\nexit 1\n")
    broken.chmod(0o755)
    cell.executor = cell.new_executor(slurm_squeue=str(broken))
    launch = cell.launch("blind", "sleep 1; echo done > output/x")
    cell.executor.submit([launch])
    assert cell.executor.poll()[launch.key] == Status(Phase.UNKNOWN)
    time.sleep(2.5)
    for _ in range(3):
        assert cell.executor.poll()[launch.key] == Status(Phase.UNKNOWN)
        time.sleep(1.1)
    assert cell.log.getvalue().count("broken on purpose") == 1  # once per outage
    # A new executor (a new worker) with a working squeue picks the job up from its record.
    cell.executor.close()
    cell.executor = cell.new_executor()
    cell.executor.adopt(launch.key, launch.attempt_dir, None)
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 0)
    assert (launch.attempt_dir / "output" / "x").read_text() == "done\n"


@slurm
def test_a_stopped_controller_makes_steps_unknown(cell: Cell, slurm_cluster: Any) -> None:
    launch = cell.launch("ctl", "sleep 3; echo done > output/x")
    cell.executor.submit([launch])
    wait_until(lambda: (launch.attempt_dir / "child.pid").exists())
    slurm_cluster.stop_controller()
    try:
        assert cell.executor.poll()[launch.key] == Status(Phase.UNKNOWN)
    finally:
        slurm_cluster.start_controller()
    assert wait_final(cell.executor, [launch.key], timeout=90)[launch.key] == \
        Status(Phase.EXITED, 0)
    assert "works again" in cell.log.getvalue()


@slurm
def test_adopt_from_the_record_after_a_restart(cell: Cell) -> None:
    launch = cell.launch("adopt", "sleep 2; echo done > output/x; exit 4")
    backend_id = cell.executor.submit([launch])[launch.key]
    cell.executor.close()
    cell.executor = cell.new_executor()
    cell.executor.adopt(launch.key, launch.attempt_dir, None)
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 4)
    assert cell.transport.count("sbatch") == 0
    record = read_record(launch.attempt_dir)
    assert record is not None and record.backend_id == backend_id


@slurm
@pytest.mark.parametrize("marker", [True, False])
def test_adopt_without_a_record_finds_the_job_by_name(cell: Cell, marker: bool) -> None:
    launches = [cell.launch(f"lost{i}", f"sleep 2; exit {i}") for i in range(2)]
    single = cell.launch("lostsingle", "sleep 2; exit 7")
    started = cell.executor.submit(launches)
    started.update(cell.executor.submit([single]))
    cell.executor.close()
    # The worker died after sbatch answered, before the records were written.
    adopted = [single] if not marker else [*launches, single]
    for launch in adopted:
        (launch.attempt_dir / RECORD_FILE).unlink()
        if not marker:
            (launch.attempt_dir / MARKER_FILE).unlink()  # the name is derived from the key
    cell.executor = cell.new_executor()
    for launch in adopted:
        cell.executor.adopt(launch.key, launch.attempt_dir, None)
    statuses = wait_final(cell.executor, [launch.key for launch in adopted])
    assert statuses[single.key] == Status(Phase.EXITED, 7)
    for launch in adopted:
        record = read_record(launch.attempt_dir)
        assert record is not None and record.backend_id == started[launch.key]
    if marker:
        assert [statuses[launch.key] for launch in launches] == [
            Status(Phase.EXITED, 0), Status(Phase.EXITED, 1)]


@slurm
def test_a_job_that_vanished_without_an_exit_code_is_interrupted_after_the_grace(
        cell: Cell) -> None:
    cell.executor = cell.new_executor(backend_exit_code_grace_s=2.0)
    launch = cell.launch("gone", "true")
    cell.executor.adopt(launch.key, launch.attempt_dir, "999999")  # Slurm never knew it
    started = time.monotonic()
    status = wait_final(cell.executor, [launch.key])[launch.key]
    assert status.phase is Phase.INTERRUPTED and "exit_code" in (status.reason or "")
    assert time.monotonic() - started >= 2.0


@slurm
def test_a_job_that_ended_before_the_wrapper_ran_is_interrupted_after_the_grace(
        cell: Cell) -> None:
    cell.executor = cell.new_executor(backend_exit_code_grace_s=1.0,
                                      preparation_script_before=["exit 5"])
    launch = cell.launch("prepfail", "true")
    cell.executor.submit([launch])
    status = wait_final(cell.executor, [launch.key])[launch.key]
    assert status.phase is Phase.INTERRUPTED
    assert "FAILED" in (status.reason or "")
    assert not (launch.attempt_dir / "exit_code").exists()


@slurm
@pytest.mark.parametrize("local_mount", [False, True])
def test_staged_attempts_run_in_tmp_io_and_come_back(cell: Cell, tmp_path: Path,
                                                     local_mount: bool) -> None:
    tmp_io = tmp_path / "tmp_io"
    options: dict[str, Any] = {"slurm_tmp_io": str(tmp_io)}
    if local_mount:
        options["slurm_tmp_io_local"] = str(tmp_io)
    cell.executor = cell.new_executor(**options)
    launch = cell.launch("staged", 'cat input/data.txt > output/copy; pwd > output/where; '
                         'echo changed > input/data.txt')
    remote = tmp_io / CELL_ID / "staged" / "s1" / "attempt-1"
    assert launch.backend_dir == str(remote)
    cell.executor.submit([launch])
    assert (tmp_io / CELL_ID / "wrapper.sh").exists()
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 0)
    assert (launch.attempt_dir / "output" / "copy").read_text() == "input data\n"
    assert (launch.attempt_dir / "output" / "where").read_text() == f"{remote}\n"
    assert (launch.attempt_dir / "exit_code").read_text() == "0\n"
    assert (launch.attempt_dir / BATCH_SCRIPT).exists()
    assert (launch.attempt_dir / "input" / "data.txt").read_text() == "input data\n"
    cell.executor.forget(launch.key)
    assert not remote.exists()


@slurm
def test_optional_gpus_are_requested_when_slurm_has_them(cell: Cell) -> None:
    launch = cell.launch("gpu", 'echo "${CUDA_VISIBLE_DEVICES:-none}" > output/gpus',
                         resources=StepResources(memory_mb=100, optional_gpus=1))
    cell.executor.submit([launch])
    sbatch = next(argv for argv in cell.transport.calls if argv[0].endswith("sbatch"))
    assert "--gres=gpu:1" in sbatch
    assert wait_final(cell.executor, [launch.key])[launch.key] == Status(Phase.EXITED, 0)
    assert (launch.attempt_dir / "output" / "gpus").read_text().strip() in ("0", "1")


@slurm
def test_capabilities_and_usable(cell: Cell) -> None:
    caps = cell.executor.capabilities()
    assert caps.backend == "slurm" and caps.nodes == 3 and caps.gpus == 2
    assert caps.partitions == ("debug",) and caps.cpus == 6
    assert cell.executor.usable() is None
    calls = cell.transport.count("sinfo")
    cell.executor.capabilities()
    assert cell.transport.count("sinfo") == calls  # cached
    broken = cell.new_executor(slurm_sinfo="/bin/false")
    reason = broken.usable()
    assert reason is not None and "sinfo failed" in reason
    assert broken.capabilities().details["error"]


# --- poll scheduling, with a scripted transport and a fake clock -------------------------


class ScriptedTransport(LocalTransport):
    """Answers Slurm commands from a script instead of a cluster."""

    description = "scripted commands"

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.queue = ""
        self.squeue_rc = 0
        self.sacct = CommandResult(("sacct",), 1, "", "Slurm accounting storage is disabled\n")
        self.next_id = 100

    def run(self, argv: Sequence[str], *, input_text: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CommandResult:
        self.calls.append(tuple(argv))
        program = os.path.basename(argv[0])
        if program == "sbatch":
            self.next_id += 1
            return CommandResult(tuple(argv), 0, f"{self.next_id}\n", "")
        if program == "squeue":
            if self.squeue_rc:
                return CommandResult(tuple(argv), self.squeue_rc, "", "squeue: down\n")
            return CommandResult(tuple(argv), 0, self.queue, "")
        if program == "sacct":
            return self.sacct
        if program == "scancel":
            return CommandResult(tuple(argv), 0, "", "")
        raise TransportError(f"{program}: not scripted")

    def count(self, program: str) -> int:
        return sum(1 for argv in self.calls if os.path.basename(argv[0]) == program)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripted:
    """A SlurmExecutor on a scripted transport and a fake clock."""

    executor: SlurmExecutor
    transport: ScriptedTransport
    clock: Clock
    root: Path
    log: io.StringIO

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def launch(self, job: str, script: str, **fields: Any) -> Launch:
        return make_launch(self.executor, self.artifacts, job, script, **fields)

    def executor_with(self, **options: Any) -> SlurmExecutor:
        return SlurmExecutor(load_settings(None, env={}, overrides=options),
                             transport=ScriptedTransport(), wrapper_path=self.root / "w.sh",
                             artifacts_root=self.artifacts, cell_id=CELL_ID)


@pytest.fixture
def scripted(tmp_path: Path) -> Scripted:
    transport, clock, log = ScriptedTransport(), Clock(), io.StringIO()
    root = tmp_path / "cell"
    (root / "artifacts").mkdir(parents=True)
    settings = load_settings(None, env={}, overrides={
        "backend_poll_interval_s": 1.0, "backend_poll_max_interval_s": 8.0,
        "backend_exit_code_grace_s": 5.0})
    executor = SlurmExecutor(settings, transport=transport, wrapper_path=root / "w.sh",
                             artifacts_root=root / "artifacts", cell_id=CELL_ID, clock=clock,
                             log=log)
    return Scripted(executor, transport, clock, root, log)


def test_polls_back_off_while_nothing_changes(
        scripted: Scripted) -> None:
    executor, transport, clock = scripted.executor, scripted.transport, scripted.clock
    launch = scripted.launch("a", "true")
    executor.submit([launch])
    transport.queue = "101|RUNNING|x\n"
    rounds_at = []
    for tick in range(40):
        clock.now = 1000.0 + tick * 0.5
        before = transport.count("squeue")
        assert executor.poll()[launch.key] == Status(Phase.RUNNING)
        if transport.count("squeue") > before:
            rounds_at.append(clock.now - 1000.0)
    # first round at once, then 1 s (the submission counted as a change), then 2, 4, 8, 8
    assert rounds_at == [0.0, 1.0, 3.0, 7.0, 15.0]
    transport.queue = "101|COMPLETED|x\n"
    (launch.attempt_dir / "exit_code").write_text("0\n")
    clock.now += 8.0
    assert executor.poll()[launch.key] == Status(Phase.EXITED, 0)
    second = scripted.launch("b", "true")
    executor.submit([second])
    clock.now += 1.0  # a submission brings the interval back to the minimum
    calls = transport.count("squeue")
    executor.poll()
    assert transport.count("squeue") == calls + 1


def test_an_outage_is_logged_once_and_retried_with_backoff(
        scripted: Scripted) -> None:
    executor, transport, clock = scripted.executor, scripted.transport, scripted.clock
    launch = scripted.launch("a", "true")
    executor.submit([launch])
    transport.squeue_rc = 1
    for _ in range(30):
        assert executor.poll()[launch.key] == Status(Phase.UNKNOWN)
        clock.now += 0.5
    assert 3 <= transport.count("squeue") <= 6  # 1, 2, 4, 8 s apart
    assert scripted.log.getvalue().count("squeue: down") == 1
    transport.squeue_rc = 0
    transport.queue = "101|RUNNING|x\n"
    clock.now += 60
    assert executor.poll()[launch.key] == Status(Phase.RUNNING)
    assert "works again" in scripted.log.getvalue()


def test_accounting_is_probed_once_and_the_grace_applies(
        scripted: Scripted) -> None:
    executor, transport, clock = scripted.executor, scripted.transport, scripted.clock
    launches = [scripted.launch(f"j{i}", "true") for i in range(2)]
    executor.submit(launches)  # one array: 101_0, 101_1
    transport.queue = ""  # both gone from squeue without an exit_code
    for _ in range(6):
        statuses = executor.poll()
        clock.now += 1.0
    assert transport.count("sacct") == 1  # "disabled": never asked again
    assert all(s == Status(Phase.RUNNING) for s in statuses.values())  # within the grace
    clock.now += 5.0
    statuses = executor.poll()
    assert all(s.phase is Phase.INTERRUPTED for s in statuses.values())


def test_sacct_explains_jobs_squeue_forgot(
        scripted: Scripted) -> None:
    executor, transport = scripted.executor, scripted.transport
    launches = [scripted.launch(f"j{i}", "true") for i in range(3)]
    for launch in launches:
        executor.submit([launch])  # 101, 102, 103
    transport.queue = ""
    transport.sacct = CommandResult(("sacct",), 0, "101|OUT_OF_MEMORY|0:125\n"
                                    "102|CANCELLED by 0|0:15\n103|NODE_FAIL|0:0\n", "")
    statuses = executor.poll()
    assert statuses[launches[0].key] == Status(
        Phase.FAILED, 137, "Slurm OUT_OF_MEMORY (the job exceeded its memory, exit 0:125)",
        oom_like=True)
    assert statuses[launches[1].key] == Status(Phase.FAILED, reason="cancelled in Slurm")
    assert statuses[launches[2].key].phase is Phase.INTERRUPTED
    assert transport.count("sacct") == 1


def test_a_requeued_job_is_interrupted_and_cancelled(
        scripted: Scripted) -> None:
    executor, transport = scripted.executor, scripted.transport
    launch = scripted.launch("a", "true")
    executor.submit([launch])
    transport.queue = "101|REQUEUED|x\n"
    assert executor.poll()[launch.key].phase is Phase.INTERRUPTED
    assert ("scancel", "--signal=KILL", "--full", "101") in transport.calls


def test_a_cancel_before_the_id_is_known_is_sent_once_found(
        scripted: Scripted) -> None:
    executor, transport = scripted.executor, scripted.transport
    launch = scripted.launch("a", "true")
    json_marker = {"job_name": launch.job_name, "array_index": None}
    (launch.attempt_dir / MARKER_FILE).write_text(json.dumps(json_marker))
    executor.adopt(launch.key, launch.attempt_dir, None)
    executor.terminate(launch.key)
    assert transport.count("scancel") == 0
    transport.queue = f"55|RUNNING|{launch.job_name}\n77|RUNNING|someone-else\n"
    assert executor.poll()[launch.key] == Status(Phase.RUNNING)
    assert ("scancel", "55") in transport.calls
    record = read_record(launch.attempt_dir)
    assert record is not None and record.backend_id == "55"


def test_an_unreachable_sbatch_waits_for_the_grace_then_requeues(
        scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    executor, transport, clock = scripted.executor, scripted.transport, scripted.clock
    original = transport.run

    def flaky(argv: Sequence[str], **kwargs: Any) -> CommandResult:
        if argv[0] == "sbatch":
            raise TransportError("sbatch did not answer in 120 s")
        return original(argv, **kwargs)

    monkeypatch.setattr(transport, "run", flaky)
    launch = scripted.launch("a", "true")
    assert executor.submit([launch]) == {}
    assert executor.poll()[launch.key] == Status(Phase.RUNNING)  # it may have reached Slurm
    clock.now += 6.0
    # Not in Slurm after all: nothing ran, so the attempt is interrupted (a new one is
    # submitted), never failed for the controller's absence.
    assert executor.poll()[launch.key] == Status(
        Phase.INTERRUPTED, reason="sbatch failed: sbatch did not answer in 120 s")


def sbatch_answers(scripted: Scripted, monkeypatch: pytest.MonkeyPatch, stderr: str) -> None:
    """Make every sbatch call exit 1 with ``stderr``; other commands run as scripted."""
    original = scripted.transport.run

    def answer(argv: Sequence[str], **kwargs: Any) -> CommandResult:
        if argv[0] == "sbatch":
            return CommandResult(tuple(argv), 1, "", stderr)
        return original(argv, **kwargs)

    monkeypatch.setattr(scripted.transport, "run", answer)


def test_a_controller_away_during_sbatch_is_not_a_verdict_on_the_job(
        scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    sbatch_answers(scripted, monkeypatch, "sbatch: error: Batch job submission failed: "
                   "Unable to contact slurm controller (connect failure)")
    launch = scripted.launch("a", "true")
    assert scripted.executor.submit([launch]) == {}
    assert scripted.executor.poll()[launch.key] == Status(Phase.RUNNING)
    scripted.clock.now += 6.0
    assert scripted.executor.poll()[launch.key].phase == Phase.INTERRUPTED


def test_a_definite_sbatch_rejection_fails_at_once(
        scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    sbatch_answers(scripted, monkeypatch, "sbatch: error: invalid partition specified: nosuch")
    launch = scripted.launch("a", "true")
    assert scripted.executor.submit([launch]) == {}
    status = scripted.executor.poll()[launch.key]
    assert status.phase == Phase.FAILED and "invalid partition" in (status.reason or "")


def test_staging_outside_the_artifacts_root_is_refused(
        scripted: Scripted, tmp_path: Path) -> None:
    artifacts = scripted.artifacts
    staged = scripted.executor_with(slurm_tmp_io="/scratch/x/")
    assert staged.backend_path(artifacts / "j" / "s" / "attempt-1") == \
        f"/scratch/x/{CELL_ID}/j/s/attempt-1"
    with pytest.raises(ValueError, match="not under the artifacts root"):
        staged.backend_path(tmp_path / "elsewhere")
    mapped = scripted.executor_with(backend_path_mappings={str(scripted.root): "/remote/cell"})
    assert mapped.backend_path(artifacts / "j") == "/remote/cell/artifacts/j"
    assert scripted.executor.backend_path(artifacts / "j") == str(artifacts / "j")


def test_a_launch_that_cannot_be_scripted_fails_alone(scripted: Scripted) -> None:
    good = [scripted.launch(f"good{i}", "true") for i in range(2)]
    bad = scripted.launch("bad", "true", argv=("/bin/echo", "a\0b"))
    started = scripted.executor.submit([good[0], bad, good[1]])
    assert sorted(started.values()) == ["101_0", "101_1"]
    assert scripted.transport.count("sbatch") == 1
    status = scripted.executor.poll()[bad.key]
    assert status.phase is Phase.FAILED and "NUL" in (status.reason or "")
