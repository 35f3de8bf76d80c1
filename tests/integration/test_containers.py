"""Container runners on a real cell: podman + runc running a busybox image imported from a
local rootfs (``podman_image``), steps run by an in-process worker with the embedded
executor. The step wrapper runs on the host; the runner argv is the podman command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from integration_support import attempt_dir, run_worker, step_of, wait_for

from jobcell.executors.container import ATTEMPT_LABEL
from jobcell.launching import job_name
from jobcell.service import Cell

pytestmark = [pytest.mark.podman, pytest.mark.usefixtures("podman_image")]

# A home path a shell would mangle: every value must reach podman as its own argv item.
HOSTILE_HOME = "cell home 'single' \"double\" $(touch pwned) `x` ;"
HOSTILE_TEXT = "it's \"quoted\", $(echo no) `no` ;|& \\ *\nsecond line"

# Upstream: write the param into output/data.txt (the value is $1, never part of a script).
PRODUCE = ["-c", 'printf "%s" "$1" > "$2/data.txt"', "produce", "{text}", "{output_dir}"]
# Downstream: record what the container can see and do.
PROBE_SCRIPT = r"""
set -u
home="$1"; in="$2"; out="$3"
cat "$in/data.txt" > "$out/copy.txt"
{
  echo "uid=$(id -u)"
  echo "pwd=$(pwd)"
  echo "step_dir=$JOBCELL_STEP_DIR"
  echo "job=$JOBCELL_JOB_ID"
  echo "greeting=$GREETING"
  echo "net=$(ls /sys/class/net | tr '\n' ' ')"
  echo "netdev=$(tail -n +3 /proc/net/dev | wc -l)"
  if test -e "$home"; then echo "home=visible"; else echo "home=hidden"; fi
  if test -e /jobcell/step/stdout.log; then echo "logs=visible"; else echo "logs=hidden"; fi
  if (echo changed > "$in/data.txt") 2>/dev/null; then echo "input=writable"; \
    else echo "input=read-only"; fi
  if (echo new > "$in/new.txt") 2>/dev/null; then echo "input_new=writable"; \
    else echo "input_new=read-only"; fi
  echo "manifest=$(test -r /jobcell/step/inputs.json && echo readable || echo missing)"
} > "$out/report.txt"
echo "probe done"
echo "probe stderr" >&2
"""
PROBE = ["-c", PROBE_SCRIPT.replace("{", "{{").replace("}", "}}"), "probe", "{home}",
         "{input_dir}", "{output_dir}"]


def container(command: str | None = "/bin/sh", **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"image": "localhost/jobcell-busybox:1", **fields}
    if command is not None:
        data["command"] = command
    return data


def report(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.fixture
def podman_cell(make_cell: Callable[..., Cell]) -> Cell:
    return make_cell(HOSTILE_HOME, container_runtime="podman", container_pull="never")


def test_a_container_step_reads_its_staged_input_and_writes_its_output(podman_cell: Cell
                                                                       ) -> None:
    cell = podman_cell
    cell.register_runner({"name": "produce", "command": "/bin/sh", "args_template": PRODUCE,
                          "params": {"text": {"type": "string"}}, "outputs": ["data.txt"],
                          "container": container(command=None)})
    cell.register_runner({"name": "probe", "command": "/bin/sh", "args_template": PROBE,
                          "params": {"home": {"type": "string"}},
                          "env": {"GREETING": "hello, 'world' $(no)"},
                          "outputs": ["copy.txt", "report.txt"],
                          "container": container(command=None)})
    job = cell.submit({"label": "containers", "steps": [
        {"runner": "produce", "params": {"text": HOSTILE_TEXT}},
        {"runner": "probe", "params": {"home": str(cell.home.root)}}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "succeeded", status
    first, second = attempt_dir(cell, job, "0-produce"), attempt_dir(cell, job, "1-probe")
    assert (first / "output" / "data.txt").read_text() == HOSTILE_TEXT
    assert (second / "output" / "copy.txt").read_text() == HOSTILE_TEXT
    seen = report(second / "output" / "report.txt")
    assert seen["uid"] == "0"                       # the invoking user (root here)
    assert seen["pwd"] == "/jobcell/step"
    assert seen["step_dir"] == "/jobcell/step"
    assert seen["job"] == job
    assert seen["greeting"] == "hello, 'world' $(no)"
    assert seen["net"].split() == ["lo"]            # no network but loopback
    assert seen["netdev"] == "1"
    assert seen["home"] == "hidden"                 # nothing of the host outside the step
    assert seen["logs"] == "hidden"                 # the wrapper's files stay outside
    assert seen["input"] == "read-only"
    assert seen["input_new"] == "read-only"
    assert seen["manifest"] == "readable"
    # the upstream output was not changed through the staged (hard-linked) input
    assert (first / "output" / "data.txt").read_text() == HOSTILE_TEXT
    assert not (cell.home.root.parent / "pwned").exists() and not Path("pwned").exists()
    # the wrapper ran on the host: its files are in the attempt directory
    assert (second / "exit_code").read_text().strip() == "0"
    assert int((second / "child.pid").read_text())
    assert (second / "stdout.log").read_text() == "probe done\n"
    assert "probe stderr" in (second / "stderr.log").read_text()


def test_a_nonzero_exit_inside_the_container_fails_the_step(podman_cell: Cell) -> None:
    cell = podman_cell
    cell.register_runner({"name": "fail", "command": "/bin/sh",
                          "args_template": ["-c", "echo failing >&2; exit 3"],
                          "container": container(command=None)})
    job = cell.submit({"label": "containers", "steps": [{"runner": "fail"}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "failed", status
    step = step_of(status, "0-fail")
    assert step["state"] == "failed" and step["exit_code"] == 3, step
    folder = attempt_dir(cell, job, "0-fail")
    assert (folder / "exit_code").read_text().strip() == "3"
    assert "failing" in (folder / "stderr.log").read_text()


def test_a_missing_image_fails_the_step_with_the_runtimes_message(podman_cell: Cell) -> None:
    cell = podman_cell
    cell.register_runner({"name": "ghost", "command": "/bin/true",
                          "container": {"image": "localhost/jobcell-no-such-image:1"}})
    job = cell.submit({"label": "containers", "steps": [{"runner": "ghost"}]}).job_id
    run_worker(cell)

    step = step_of(cell.status(job), "0-ghost")
    assert step["state"] == "failed" and step["exit_code"] == 125, step  # podman's own error
    stderr = (attempt_dir(cell, job, "0-ghost") / "stderr.log").read_text()
    assert "jobcell-no-such-image" in stderr


def test_a_timeout_stops_the_container_too(podman_cell: Cell, podman_image: Any) -> None:
    cell = podman_cell
    cell.register_runner({"name": "hang", "command": "/bin/sleep", "args_template": ["60"],
                          "resources": {"timeout_s": 1.5}, "container": container(None)})
    job = cell.submit({"label": "containers", "steps": [{"runner": "hang"}]}).job_id
    started = time.monotonic()
    run_worker(cell)

    step = step_of(cell.status(job), "0-hang")
    assert step["state"] == "failed", step
    assert time.monotonic() - started < 30
    # TERM reached the command through the container's init: nothing is left running,
    # and conmon removes the exited container (--rm) even when podman itself was killed.
    label = job_name(cell.home.cell_id, _row(cell, job, "0-hang"))

    def containers(*flags: str) -> str:
        listed = podman_image.run("ps", "-q", *flags, "--filter",
                                  f"label={ATTEMPT_LABEL}={label}")
        assert listed.returncode == 0, listed
        return str(listed.stdout.strip())

    wait_for(lambda: containers() == "", 10, "the step's container to stop")
    wait_for(lambda: containers("-a") == "", 10, "the step's container to be removed")


def test_a_runner_with_only_container_command_runs(podman_cell: Cell) -> None:
    cell = podman_cell
    cell.register_runner({"name": "inside", "args_template": ["-c", "echo in > out/x",
                                                              "{output_dir}"],
                          "container": container("/bin/sh", workdir="/jobcell/step",
                                                 args_template=["-c", 'echo in > "$1/x"',
                                                                "sh", "{output_dir}"])})
    job = cell.submit({"label": "containers", "steps": [{"runner": "inside"}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    assert (attempt_dir(cell, job, "0-inside") / "output" / "x").read_text() == "in\n"


def _row(cell: Cell, job_id: str, step_id: str) -> Any:
    job = cell.store.get_job(job_id)
    assert job is not None
    return next(s for s in job.steps if s.step_id == step_id)


def test_the_cell_options_reach_the_runtime(make_cell: Callable[..., Cell]) -> None:
    cell = make_cell("options", container_runtime="podman", container_pull="never",
                     container_network="host")
    cell.register_runner({"name": "net", "command": "/bin/sh",
                          "args_template": ["-c", 'ls /sys/class/net > "$1/net.txt"', "sh",
                                            "{output_dir}"],
                          "container": container(None)})
    job = cell.submit({"label": "containers", "steps": [{"runner": "net"}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    seen = (attempt_dir(cell, job, "0-net") / "output" / "net.txt").read_text().split()
    assert seen != ["lo"]  # the host's network, as the cell option asked


@pytest.mark.slurm
def test_a_container_step_runs_on_slurm_inside_the_wrapper(
        make_cell: Callable[..., Cell], slurm_cluster: Any) -> None:
    cell = make_cell("on-slurm", executor_backend="slurm", slurm_env=dict(slurm_cluster.env),
                     container_runtime="podman", container_pull="never",
                     backend_poll_interval_s=0.2, backend_poll_max_interval_s=1.0)
    cell.register_runner({"name": "produce", "command": "/bin/sh", "args_template": PRODUCE,
                          "params": {"text": {"type": "string"}}, "outputs": ["data.txt"],
                          "container": container(command=None)})
    job = cell.submit({"label": "containers", "steps": [
        {"id": "p", "runner": "produce", "params": {"text": HOSTILE_TEXT}}]}).job_id
    run_worker(cell, timeout_s=90)
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    step = step_of(status, "p")
    assert step["backend"] == "slurm" and step["backend_id"]
    assert (attempt_dir(cell, job, "p") / "output" / "data.txt").read_text() == HOSTILE_TEXT
    # It really went through podman inside the Slurm job's wrapper.
    script = (attempt_dir(cell, job, "p") / "slurm-batch.sh").read_text()
    assert "podman" in script and "--network" in script
