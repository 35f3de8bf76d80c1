"""The external executor driven directly (no worker), with real wrapper commands.

(a) Tiny wrapper scripts written by the tests: ``submit.sh`` starts ``JOBCELL_STEP_SCRIPT``
    in its own session and prints ``local-<pid>``; ``status.sh`` looks at that process;
    ``cancel.sh`` signals its process group. Files in the fake backend's directory make
    them fail or print garbage.
(b) ``tests/integration/wrappers/slurm_*.sh``, the wrappers an admin would write for Slurm,
    against the real local cluster (``slurm_cluster`` fixture, ``SLURM_CONF`` passed to the
    wrappers through the environment).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobcell.executors.base import Launch, Phase, Status, StepResources
from jobcell.executors.delegated import read_record
from jobcell.executors.embedded import install_wrapper
from jobcell.executors.external import ExternalExecutor
from jobcell.settings import Settings, load_settings

WRAPPERS = Path(__file__).parent / "wrappers"
ENDED = (Phase.EXITED, Phase.FAILED, Phase.INTERRUPTED)


def make_settings(**options: Any) -> Settings:
    return load_settings(None, env={}, overrides={"executor_backend": "external", **options})


class FakeClock:
    """A clock the test moves: the executor's rate limits and grace periods follow it."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_launch(root: Path, step: str, argv: list[str], *, index: int = 0,
                resources: StepResources | None = None) -> Launch:
    attempt = root / "artifacts" / "job-1" / step / "attempt-1"
    (attempt / "output").mkdir(parents=True)
    exports = {"JOBCELL_JOB_ID": "job-1", "JOBCELL_STEP_ID": step, "JOBCELL_ATTEMPT": "1",
               "JOBCELL_STEP_DIR": str(attempt), "JOBCELL_STEP_INDEX": str(index)}
    return Launch(f"job-1/{step}", attempt, tuple(argv), {**os.environ, **exports},
                  exports=exports, runner="demo",
                  resources=resources or StepResources(cpu_slots=1, memory_mb=200),
                  job_name=f"jobcell-test-job-1-{step}-1", backend_dir=str(attempt))


# --- (a) tiny wrapper scripts -----------------------------------------------------------

SUBMIT = r"""#!/bin/bash
set -eu
S=__STATE__
if [ -f "$S/submit_fail" ]; then echo "gateway refused: quota exceeded" >&2; exit 4; fi
if [ -f "$S/submit_garbage" ]; then echo "Submitted batch job 12"; exit 0; fi
env | grep '^JOBCELL_' | sort > "$S/submit_env.$JOBCELL_STEP_ID"
if [ -f "$S/hold" ]; then
  id="held-$JOBCELL_STEP_ID"; touch "$S/pending.$id"; echo "$id"; exit 0
fi
setsid nohup "$JOBCELL_STEP_SCRIPT" > /dev/null 2>&1 < /dev/null &
echo "$!" >> "$S/pids"
echo "submitted to the test gateway"
echo "local-$!"
"""

STATUS = r"""#!/bin/bash
S=__STATE__
echo "$*" >> "$S/status.log"
mode=$(cat "$S/status_mode" 2>/dev/null || echo normal)
case "$mode" in
  fail) echo "cannot reach the gateway" >&2; exit 2 ;;
  garbage) echo "<html>502 Bad Gateway</html>"; exit 0 ;;
esac
id="$1"
if [ -f "$S/pending.$id" ]; then echo PENDING; exit 0; fi
# A zombie (nobody reaped it yet) has ended.
st=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/${id#local-}/stat" 2>/dev/null)
if [ -n "$st" ] && [ "$st" != Z ]; then echo RUNNING; exit 0; fi
if [ -f "$S/cancelled.$id" ]; then echo CANCELLED; exit 0; fi
cat "$S/final" 2>/dev/null || echo SUCCEEDED
"""

CANCEL = r"""#!/bin/bash
S=__STATE__
echo "$1 $JOBCELL_CANCEL_SIGNAL" >> "$S/cancel.log"
if [ -f "$S/pending.$1" ]; then rm "$S/pending.$1"; touch "$S/cancelled.$1"; exit 0; fi
touch "$S/cancelled.$1"
kill -s "$JOBCELL_CANCEL_SIGNAL" -- "-${1#local-}"
"""

CAPABILITIES = r"""#!/bin/bash
S=__STATE__
echo x >> "$S/capabilities.log"
cat "$S/capabilities"
"""


class FakeBackend:
    """The tiny wrappers and the directory that steers them."""

    def __init__(self, root: Path) -> None:
        self.state = root / "backend"
        self.state.mkdir(parents=True)
        self.commands: dict[str, list[str]] = {}
        for name, text in (("submit", SUBMIT), ("status", STATUS), ("cancel", CANCEL),
                           ("capabilities", CAPABILITIES)):
            path = root / "bin" / f"{name}.sh"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text.replace("__STATE__", str(self.state)))
            path.chmod(0o755)
            self.commands[name] = [str(path)]

    def set(self, name: str, text: str | None) -> None:
        path = self.state / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)

    def lines(self, name: str) -> list[str]:
        path = self.state / name
        return path.read_text().splitlines() if path.exists() else []

    def submit_env(self, step: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.lines(f"submit_env.{step}"))

    def kill_all(self) -> None:
        for pid in self.lines("pids"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[FakeBackend]:
    fake = FakeBackend(tmp_path)
    yield fake
    fake.kill_all()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_executor(tmp_path: Path, backend: FakeBackend, clock: FakeClock
                  ) -> Iterator[Callable[..., tuple[ExternalExecutor, io.StringIO]]]:
    wrapper = tmp_path / "wrapper.sh"
    install_wrapper(wrapper)
    made: list[ExternalExecutor] = []

    def factory(**options: Any) -> tuple[ExternalExecutor, io.StringIO]:
        defaults: dict[str, Any] = {
            "external_submit_cmd": backend.commands["submit"],
            "external_status_cmd": backend.commands["status"],
            "external_cancel_cmd": backend.commands["cancel"],
            "backend_poll_interval_s": 1.0, "backend_poll_max_interval_s": 4.0,
            "backend_exit_code_grace_s": 10.0}
        log = io.StringIO()
        executor = ExternalExecutor(make_settings(**{**defaults, **options}),
                                    wrapper_path=wrapper, artifacts_root=tmp_path / "artifacts",
                                    clock=clock, log=log)
        made.append(executor)
        return executor, log

    yield factory
    for executor in made:
        executor.close()


def poll_until(executor: ExternalExecutor, key: str, clock: FakeClock,
               done: Callable[[Status], bool], *, step_s: float = 2.0,
               timeout: float = 30.0) -> Status:
    """Poll (moving the fake clock ``step_s`` each round) until ``done`` or real ``timeout``."""
    deadline = time.monotonic() + timeout
    status = executor.poll()[key]
    while not done(status):
        assert time.monotonic() < deadline, f"{key} still {status} after {timeout} s"
        time.sleep(0.05)
        clock.advance(step_s)
        status = executor.poll()[key]
    return status


def wait_started(launch: Launch, timeout: float = 30.0) -> int:
    """The runner's PID once the wrapper recorded it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):  # missing, or being written
            return int((launch.attempt_dir / "child.pid").read_text())
        assert time.monotonic() < deadline, f"{launch.key} did not start"
        time.sleep(0.05)


def ended(status: Status) -> bool:
    return status.phase in ENDED


WAIT_FOR_GO = ["/bin/sh", "-c", "while [ ! -f go ]; do sleep 0.05; done; echo went"]


def test_success_records_the_backend_id_and_passes_the_environment(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBCELL_ADMIN_KEY", "do-not-leak")
    executor, _ = make_executor()
    launch = make_launch(tmp_path, "hello", ["/bin/sh", "-c",
                                             "echo hi > output/hi.txt; env > output/env.txt"],
                         index=3)
    started = executor.submit([launch])
    backend_id = started[launch.key]
    assert backend_id.startswith("local-")  # the last line, after the gateway's chatter
    record = read_record(launch.attempt_dir)
    assert record is not None
    assert (record.backend, record.backend_id) == ("external", backend_id)
    assert record.script == str(launch.attempt_dir / "step.sh")
    status = poll_until(executor, launch.key, clock, ended)
    assert status == Status(Phase.EXITED, 0)
    assert (launch.attempt_dir / "output" / "hi.txt").read_text() == "hi\n"
    assert (launch.attempt_dir / "exit_code").read_text() == "0\n"
    env = backend.submit_env("hello")
    assert env["JOBCELL_JOB_ID"] == "job-1"
    assert env["JOBCELL_STEP_INDEX"] == "3"
    assert env["JOBCELL_RUNNER"] == "demo"
    assert env["JOBCELL_STEP_SCRIPT"] == env["JOBCELL_LOCAL_STEP_SCRIPT"] == \
        str(launch.attempt_dir / "step.sh")
    assert env["JOBCELL_OUTPUT_DIR"] == str(launch.attempt_dir / "output")
    assert (env["JOBCELL_MEMORY_MB"], env["JOBCELL_CPU_SLOTS"]) == ("200", "1")
    assert (env["JOBCELL_GPUS_REQUESTED"], env["JOBCELL_BACKEND_GPU_SOURCE"]) == ("0", "unknown")
    runner_env = dict(line.split("=", 1) for line in
                      (launch.attempt_dir / "output" / "env.txt").read_text().splitlines()
                      if "=" in line)
    assert runner_env["JOBCELL_STEP_ID"] == "hello"
    assert "JOBCELL_ADMIN_KEY" not in runner_env
    assert backend.lines("status.log") == [backend_id] * len(backend.lines("status.log"))


def test_a_non_zero_exit_is_the_exit_code_files_whatever_status_says(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    backend.set("final", "FAILED 9\n")  # the status line only explains; the file decides
    failing = make_launch(tmp_path, "fails", ["/bin/sh", "-c", "echo oops >&2; exit 3"])
    passing = make_launch(tmp_path, "passes", ["/bin/true"])
    started = executor.submit([failing, passing])
    assert set(started) == {failing.key, passing.key}
    assert poll_until(executor, failing.key, clock, ended) == Status(Phase.EXITED, 3)
    assert poll_until(executor, passing.key, clock, ended) == Status(Phase.EXITED, 0)
    assert (failing.attempt_dir / "stderr.log").read_text() == "oops\n"


def test_a_failing_submit_is_a_failed_attempt_with_the_reason(
        tmp_path: Path, backend: FakeBackend,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, log = make_executor()
    backend.set("submit_fail", "")
    refused = make_launch(tmp_path, "refused", ["/bin/true"])
    assert executor.submit([refused]) == {}
    assert refused.key in executor.tracked()
    assert executor.poll()[refused.key] == Status(
        Phase.FAILED, reason="external submit failed: submit.sh exited 4: gateway refused: "
                             "quota exceeded")
    assert "job-1/refused: external submit failed: submit.sh exited 4" in log.getvalue()
    assert read_record(refused.attempt_dir) is None

    backend.set("submit_fail", None)
    backend.set("submit_garbage", "")
    garbled = make_launch(tmp_path, "garbled", ["/bin/true"])
    assert executor.submit([garbled]) == {}
    reason = executor.poll()[garbled.key].reason
    assert reason == ("external submit failed: the external submit command printed "
                      "'Submitted batch job 12\\n', not a backend job id; the last non-empty "
                      "line of its stdout must be the backend job id alone (letters, digits "
                      "and . _ : @ / + = ; , -)")

    missing, _ = make_executor(external_submit_cmd=[str(tmp_path / "no-such-submit")])
    lost = make_launch(tmp_path, "lost", ["/bin/true"])
    assert missing.submit([lost]) == {}
    assert missing.poll()[lost.key] == Status(
        Phase.FAILED, reason=f"external submit failed: {tmp_path / 'no-such-submit'}: "
                             "program not found")
    assert not backend.lines("pids")  # nothing ever started


def test_a_failing_status_command_is_unknown_then_recovers(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, log = make_executor()
    launch = make_launch(tmp_path, "waits", WAIT_FOR_GO)
    executor.submit([launch])
    wait_started(launch)
    assert poll_until(executor, launch.key, clock, lambda s: True).phase == Phase.RUNNING
    backend.set("status_mode", "fail")
    unknown = poll_until(executor, launch.key, clock, lambda s: s.phase == Phase.UNKNOWN)
    assert unknown.reason == "status.sh exited 2: cannot reach the gateway"
    for _ in range(5):  # the outage goes on: still unknown, logged once, retried with backoff
        clock.advance(100)
        assert executor.poll()[launch.key].phase == Phase.UNKNOWN
    assert log.getvalue().count("external status command failed") == 1
    assert executor.last_error(launch.key) is None  # a failing command is not an answer
    calls = len(backend.lines("status.log"))
    executor.poll()  # within the backoff: no new call
    assert len(backend.lines("status.log")) == calls

    backend.set("status_mode", None)
    assert poll_until(executor, launch.key, clock,
                      lambda s: s.phase != Phase.UNKNOWN).phase == Phase.RUNNING
    assert "external status command works again" in log.getvalue()
    (launch.attempt_dir / "go").touch()
    assert poll_until(executor, launch.key, clock, ended) == Status(Phase.EXITED, 0)


def test_garbage_from_the_status_command_is_a_clear_error(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, log = make_executor()
    launch = make_launch(tmp_path, "garbage", WAIT_FOR_GO)
    backend_id = executor.submit([launch])[launch.key]
    backend.set("status_mode", "garbage")
    status = poll_until(executor, launch.key, clock, lambda s: s.phase == Phase.UNKNOWN)
    message = (f"backend job {backend_id}: the external status command printed "
               "'<html>502 Bad Gateway</html>\\n'; expected one of RUNNING, PENDING, "
               "SUCCEEDED, FAILED, CANCELLED, a terminal state optionally followed by an "
               "exit code")
    assert executor.last_error(launch.key) == message
    assert status.reason == message
    clock.advance(100)
    executor.poll()
    assert log.getvalue().count("502 Bad Gateway") == 1  # logged once per distinct message
    backend.set("status_mode", None)
    poll_until(executor, launch.key, clock, lambda s: s.phase == Phase.RUNNING)
    assert executor.last_error(launch.key) is None
    (launch.attempt_dir / "go").touch()
    assert poll_until(executor, launch.key, clock, ended) == Status(Phase.EXITED, 0)


def test_cancel_runs_the_cancel_command(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    launch = make_launch(tmp_path, "long", ["sleep", "60"])
    backend_id = executor.submit([launch])[launch.key]
    wait_started(launch)
    executor.terminate(launch.key)
    # The wrapper records how the runner ended (TERM), and that record decides.
    assert poll_until(executor, launch.key, clock, ended) == Status(Phase.EXITED, 143)
    assert backend.lines("cancel.log") == [f"{backend_id} TERM"]
    executor.terminate(launch.key, force=True)  # it has ended: nothing more to cancel
    assert backend.lines("cancel.log") == [f"{backend_id} TERM"]


def test_force_cancel_and_a_cancelled_pending_job(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    launch = make_launch(tmp_path, "stubborn",
                         ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
    backend_id = executor.submit([launch])[launch.key]
    wait_started(launch)
    executor.terminate(launch.key, force=True)
    status = poll_until(executor, launch.key, clock, ended)
    # KILL reaches the wrapper too: no exit_code, and the backend says CANCELLED.
    assert status == Status(Phase.FAILED, reason="cancelled by the backend")
    assert backend.lines("cancel.log") == [f"{backend_id} KILL"]

    backend.set("hold", "")
    held = make_launch(tmp_path, "held", ["/bin/true"])
    assert executor.submit([held]) == {held.key: "held-held"}
    assert poll_until(executor, held.key, clock, lambda s: True) == Status(Phase.RUNNING)
    executor.terminate(held.key)
    # Never started (no child.pid): no exit_code will come, no grace to wait.
    clock.advance(2)
    assert executor.poll()[held.key] == Status(Phase.FAILED, reason="cancelled by the backend")


def test_without_a_cancel_command_terminate_only_logs(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, log = make_executor(external_cancel_cmd=None)
    launch = make_launch(tmp_path, "uncancellable", WAIT_FOR_GO)
    backend_id = executor.submit([launch])[launch.key]
    executor.terminate(launch.key)
    executor.terminate(launch.key, force=True)
    assert log.getvalue().count(f"cannot cancel backend job {backend_id}: "
                                "external_cancel_cmd is not configured") == 1
    (launch.attempt_dir / "go").touch()
    assert poll_until(executor, launch.key, clock, ended) == Status(Phase.EXITED, 0)


def test_a_fresh_executor_adopts_from_external_backend_json(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    first, _ = make_executor()
    launch = make_launch(tmp_path, "adopted", WAIT_FOR_GO)
    backend_id = first.submit([launch])[launch.key]
    first.close()  # the worker died right after submitting, before recording anything

    second, _ = make_executor()
    second.adopt(launch.key, launch.attempt_dir, None)
    assert second.tracked() == {launch.key}
    before = len(backend.lines("status.log"))
    assert second.poll()[launch.key] == Status(Phase.RUNNING)
    assert backend.lines("status.log")[before:] == [backend_id]  # asked about the right id
    (launch.attempt_dir / "go").touch()
    assert poll_until(second, launch.key, clock, ended) == Status(Phase.EXITED, 0)


def test_adopting_an_attempt_that_never_reached_the_backend(
        tmp_path: Path, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    attempt = tmp_path / "artifacts" / "job-1" / "never" / "attempt-1"
    attempt.mkdir(parents=True)
    executor.adopt("job-1/never", attempt, None)
    assert executor.poll()["job-1/never"] == Status(Phase.RUNNING)
    clock.advance(9)
    assert executor.poll()["job-1/never"] == Status(Phase.RUNNING)  # within the grace
    clock.advance(2)
    assert executor.poll()["job-1/never"] == Status(Phase.INTERRUPTED)

    done = tmp_path / "artifacts" / "job-1" / "done" / "attempt-1"
    done.mkdir(parents=True)
    (done / "exit_code").write_text("5\n")
    executor.adopt("job-1/done", done, None)
    assert executor.poll()["job-1/done"] == Status(Phase.EXITED, 5)


def test_a_missing_exit_code_after_the_grace_is_interrupted(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    launch = make_launch(tmp_path, "vanishes", ["sleep", "60"])
    backend_id = executor.submit([launch])[launch.key]
    wait_started(launch)
    os.killpg(int(backend_id.removeprefix("local-")), signal.SIGKILL)  # wrapper and runner
    # The backend says SUCCEEDED, but no exit_code: it waits the grace, then never succeeds.
    first_gone = poll_until(executor, launch.key, clock, lambda s: s.phase != Phase.RUNNING,
                            step_s=1.0)
    assert first_gone == Status(Phase.INTERRUPTED, reason="the backend reports SUCCEEDED but "
                                                          "the step wrote no exit_code")
    assert not (launch.attempt_dir / "exit_code").exists()


def test_a_backend_failure_without_exit_code_is_failed_and_explained(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor()
    backend.set("final", "FAILED 137\n")
    launch = make_launch(tmp_path, "oom", ["sleep", "60"])
    backend_id = executor.submit([launch])[launch.key]
    wait_started(launch)
    os.killpg(int(backend_id.removeprefix("local-")), signal.SIGKILL)
    status = poll_until(executor, launch.key, clock, lambda s: s.phase != Phase.RUNNING,
                        step_s=1.0)
    assert status == Status(Phase.FAILED, reason="the backend reports FAILED (exit code 137) "
                                                 "and the step wrote no exit_code",
                            oom_like=True)


def test_status_polls_are_rate_limited_and_back_off_while_nothing_changes(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    executor, _ = make_executor(backend_poll_interval_s=1.0, backend_poll_max_interval_s=4.0)
    launch = make_launch(tmp_path, "steady", WAIT_FOR_GO)
    executor.submit([launch])
    wait_started(launch)

    def calls_after(advance: float) -> int:
        clock.advance(advance)
        before = len(backend.lines("status.log"))
        assert executor.poll()[launch.key].phase == Phase.RUNNING
        return len(backend.lines("status.log")) - before

    assert calls_after(1.0) == 1   # first answer: RUNNING (a change): next in 1 s
    assert calls_after(0.5) == 0
    assert calls_after(0.5) == 1   # unchanged: next in 2 s
    assert calls_after(1.0) == 0
    assert calls_after(1.0) == 1   # next in 4 s (the maximum)
    assert calls_after(3.0) == 0
    assert calls_after(1.0) == 1
    assert calls_after(3.9) == 0
    assert calls_after(0.1) == 1
    (launch.attempt_dir / "go").touch()
    deadline = time.monotonic() + 10
    while not (launch.attempt_dir / "exit_code").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # The exit_code file is read at every poll, without waiting for the next status call.
    before = len(backend.lines("status.log"))
    assert executor.poll()[launch.key] == Status(Phase.EXITED, 0)
    assert len(backend.lines("status.log")) == before


def test_path_mappings_reach_the_submit_command_and_the_step_script(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    mount = tmp_path / "mnt"
    mount.symlink_to(tmp_path)  # the backend sees the cell through another path
    executor, _ = make_executor(backend_path_mappings={str(tmp_path): str(mount)})
    launch = make_launch(tmp_path, "mapped", ["/bin/sh", "-c", "pwd -L > output/pwd.txt"])
    launch = Launch(**{**launch.__dict__, "backend_dir": ""})  # the executor maps it
    executor.submit([launch])
    assert poll_until(executor, launch.key, clock, ended) == Status(Phase.EXITED, 0)
    env = backend.submit_env("mapped")
    mapped_dir = str(mount / "artifacts" / "job-1" / "mapped" / "attempt-1")
    assert env["JOBCELL_STEP_SCRIPT"] == f"{mapped_dir}/step.sh"
    assert env["JOBCELL_OUTPUT_DIR"] == f"{mapped_dir}/output"
    assert env["JOBCELL_LOCAL_STEP_SCRIPT"] == str(launch.attempt_dir / "step.sh")
    assert (launch.attempt_dir / "output" / "pwd.txt").read_text() == f"{mapped_dir}\n"
    script = (launch.attempt_dir / "step.sh").read_text()
    assert f"{mount}/wrapper.sh" in script


def test_capabilities_are_probed_once_and_shape_the_gpu_request(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    backend.set("capabilities", json.dumps({"gpus": 2, "gpu_memory_mb": 81920}))
    executor, _ = make_executor(backend_capabilities_cmd=backend.commands["capabilities"])
    caps = executor.capabilities()
    assert (caps.gpus, caps.gpu_source, caps.details) == (
        2, "backend_capabilities_cmd", {"gpu_memory_mb": 81920})
    assert executor.capabilities() is caps
    gpu = make_launch(tmp_path, "gpu", ["/bin/true"],
                      resources=StepResources(gpus=0, optional_gpus=1))
    executor.submit([gpu])
    env = backend.submit_env("gpu")
    assert (env["JOBCELL_GPUS_REQUIRED"], env["JOBCELL_GPUS_OPTIONAL"],
            env["JOBCELL_GPUS_REQUESTED"]) == ("0", "1", "1")
    assert (env["JOBCELL_BACKEND_GPU_COUNT"], env["JOBCELL_BACKEND_GPU_SOURCE"]) == (
        "2", "backend_capabilities_cmd")
    assert len(backend.lines("capabilities.log")) == 1
    poll_until(executor, gpu.key, clock, ended)


def test_unusable_capabilities_leave_gpus_unknown(
        tmp_path: Path, backend: FakeBackend, clock: FakeClock,
        make_executor: Callable[..., tuple[ExternalExecutor, io.StringIO]]) -> None:
    backend.set("capabilities", "lots of gpus\n")
    executor, log = make_executor(backend_capabilities_cmd=backend.commands["capabilities"])
    caps = executor.capabilities()
    assert caps.gpus is None
    assert caps.details["error"] == ("the capabilities command printed line 1 'lots of gpus', "
                                     "not key=value (or a JSON object)")
    assert "backend_capabilities_cmd failed" in log.getvalue()
    gpu = make_launch(tmp_path, "gpu", ["/bin/true"],
                      resources=StepResources(gpus=1, optional_gpus=1))
    executor.submit([gpu])
    env = backend.submit_env("gpu")
    assert (env["JOBCELL_GPUS_REQUESTED"], env["JOBCELL_BACKEND_GPU_COUNT"]) == ("1", "")
    assert len(backend.lines("capabilities.log")) == 1  # retried only after a minute
    poll_until(executor, gpu.key, clock, ended)


# --- (b) the Slurm wrappers against the real local cluster ------------------------------


def slurm_options() -> dict[str, Any]:
    return {"external_submit_cmd": [str(WRAPPERS / "slurm_submit.sh")],
            "external_status_cmd": [str(WRAPPERS / "slurm_status.sh")],
            "external_cancel_cmd": [str(WRAPPERS / "slurm_cancel.sh")],
            "backend_capabilities_cmd": [str(WRAPPERS / "slurm_capabilities.sh")],
            "backend_poll_interval_s": 0.2, "backend_poll_max_interval_s": 1.0,
            "backend_exit_code_grace_s": 5.0}


@pytest.fixture
def slurm_executor(slurm_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[tuple[ExternalExecutor, io.StringIO]]:
    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)  # the wrappers' Slurm commands read SLURM_CONF
    wrapper = tmp_path / "wrapper.sh"
    install_wrapper(wrapper)
    log = io.StringIO()
    executor = ExternalExecutor(make_settings(**slurm_options()), wrapper_path=wrapper,
                                artifacts_root=tmp_path / "artifacts", log=log)
    yield executor, log
    executor.close()
    for record_file in (tmp_path / "artifacts").glob("*/*/*/external_backend.json"):
        record = json.loads(record_file.read_text())
        slurm_cluster.run("scancel", record["backend_id"])


def slurm_wait(executor: ExternalExecutor, key: str, done: Callable[[Status], bool],
               timeout: float = 60.0) -> Status:
    deadline = time.monotonic() + timeout
    status = executor.poll()[key]
    while not done(status):
        assert time.monotonic() < deadline, f"{key} still {status} after {timeout} s"
        time.sleep(0.1)
        status = executor.poll()[key]
    return status


def slurm_state(slurm_cluster: Any, backend_id: str) -> str:
    out = slurm_cluster.run("scontrol", "-o", "show", "job", backend_id).stdout
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))


@pytest.mark.slurm
def test_slurm_wrappers_run_steps_to_their_exit_codes(
        slurm_cluster: Any, slurm_executor: tuple[ExternalExecutor, io.StringIO],
        tmp_path: Path) -> None:
    executor, _ = slurm_executor
    ok = make_launch(tmp_path, "ok", ["/bin/sh", "-c", "echo \"$JOBCELL_STEP_ID\" > "
                                                       "output/who.txt"])
    bad = make_launch(tmp_path, "bad", ["/bin/sh", "-c", "exit 3"])
    started = executor.submit([ok, bad])
    assert set(started) == {ok.key, bad.key}
    assert all(backend_id.isdigit() for backend_id in started.values())
    record = read_record(ok.attempt_dir)
    assert record is not None and record.backend_id == started[ok.key]
    assert slurm_wait(executor, ok.key, ended) == Status(Phase.EXITED, 0)
    assert slurm_wait(executor, bad.key, ended) == Status(Phase.EXITED, 3)
    assert (ok.attempt_dir / "output" / "who.txt").read_text() == "ok\n"
    assert (ok.attempt_dir / "backend.out").exists()  # the wrapper's --output
    assert slurm_state(slurm_cluster, started[bad.key]) == "FAILED"


@pytest.mark.slurm
def test_slurm_capabilities_and_an_optional_gpu(
        slurm_cluster: Any, slurm_executor: tuple[ExternalExecutor, io.StringIO],
        tmp_path: Path) -> None:
    executor, _ = slurm_executor
    caps = executor.capabilities()
    assert (caps.gpus, caps.nodes, caps.gpu_source) == (2, 3, "slurm gres")
    assert caps.partitions == ("debug",)
    launch = make_launch(tmp_path, "gpu", ["/bin/sh", "-c", "env > output/env.txt"],
                         resources=StepResources(cpu_slots=1, memory_mb=200, optional_gpus=1))
    executor.submit([launch])
    assert slurm_wait(executor, launch.key, ended) == Status(Phase.EXITED, 0)
    env = dict(line.split("=", 1) for line in
               (launch.attempt_dir / "output" / "env.txt").read_text().splitlines()
               if "=" in line)
    assert env["SLURMD_NODENAME"] == slurm_cluster.gpu_node
    assert env.get("CUDA_VISIBLE_DEVICES") in ("0", "1")


@pytest.mark.slurm
def test_slurm_cancel(slurm_cluster: Any, slurm_executor: tuple[ExternalExecutor, io.StringIO],
                      tmp_path: Path) -> None:
    executor, _ = slurm_executor
    launch = make_launch(tmp_path, "long", ["sleep", "120"])
    backend_id = executor.submit([launch])[launch.key]
    wait_started(launch, timeout=60)
    executor.terminate(launch.key)
    status = slurm_wait(executor, launch.key, ended)
    assert status == Status(Phase.EXITED, 143)  # the wrapper recorded the TERM
    assert slurm_state(slurm_cluster, backend_id) == "CANCELLED"


@pytest.mark.slurm
def test_slurm_controller_down_is_unknown_then_recovers(
        slurm_cluster: Any, slurm_executor: tuple[ExternalExecutor, io.StringIO],
        tmp_path: Path) -> None:
    executor, log = slurm_executor
    launch = make_launch(tmp_path, "waits", WAIT_FOR_GO)
    executor.submit([launch])
    wait_started(launch, timeout=60)
    assert slurm_wait(executor, launch.key, lambda s: True).phase == Phase.RUNNING
    slurm_cluster.stop_controller()
    try:
        status = slurm_wait(executor, launch.key, lambda s: s.phase == Phase.UNKNOWN)
        assert status.reason is not None and "scontrol failed" in status.reason
        assert "external status command failed" in log.getvalue()
    finally:
        slurm_cluster.start_controller()
    assert slurm_wait(executor, launch.key, lambda s: s.phase != Phase.UNKNOWN,
                      timeout=90).phase == Phase.RUNNING
    (launch.attempt_dir / "go").touch()
    assert slurm_wait(executor, launch.key, ended) == Status(Phase.EXITED, 0)


@pytest.mark.slurm
def test_slurm_a_fresh_executor_adopts_from_the_record(
        slurm_cluster: Any, slurm_executor: tuple[ExternalExecutor, io.StringIO],
        tmp_path: Path) -> None:
    first, _ = slurm_executor
    launch = make_launch(tmp_path, "adopted", WAIT_FOR_GO)
    backend_id = first.submit([launch])[launch.key]
    wrapper = tmp_path / "wrapper.sh"
    second = ExternalExecutor(make_settings(**slurm_options()), wrapper_path=wrapper,
                              artifacts_root=tmp_path / "artifacts", log=io.StringIO())
    second.adopt(launch.key, launch.attempt_dir, None)
    assert slurm_wait(second, launch.key, lambda s: True).phase == Phase.RUNNING
    wait_started(launch, timeout=60)
    assert slurm_state(slurm_cluster, backend_id) == "RUNNING"
    (launch.attempt_dir / "go").touch()
    assert slurm_wait(second, launch.key, ended) == Status(Phase.EXITED, 0)
    second.close()
