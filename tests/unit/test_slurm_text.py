"""Slurm scripts, command lines and parsers: golden files, hostile values run for real with
bash, and parsers fed with outputs captured from a real Slurm 22.05 cluster."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobcell.executors import slurm_text as st
from jobcell.executors.base import Launch, Phase, Status, StepResources
from jobcell.executors.transport import CommandResult

GOLDEN = Path(__file__).parent / "golden" / "slurm"
CAPTURED = GOLDEN / "captured"
UPDATE_VARIABLE = "JOBCELL_UPDATE_GOLDEN"
# Read at import time: tests/conftest.py removes JOBCELL_* variables before each test.
UPDATE_GOLDEN = os.environ.get(UPDATE_VARIABLE) == "1"

#: Values a shell must never interpret: each reaches the runner byte for byte.
HOSTILE = [
    "a'; echo foo",
    "a\n0",
    "$(touch pwned)",
    "`touch pwned`",
    "semi;colon && true || false",
    "two  spaces\tand tab",
    'double "quotes" \\ backslash',
    "$HOME ${PATH} $1 $@ $*",
    "glob * ? [a]",
    "-dash",
    "",
    "üñí€",
    "'",
    "\\",
    "!bang #hash ~tilde",
    "%j %A %% percent",
]
HOSTILE_DIR_NAME = "d'ir \"x\" $(touch pwned) `id`;q\nnl"


def check_golden(name: str, content: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    assert path.exists(), f"{path} is missing; create it with {UPDATE_VARIABLE}=1 pytest {__file__}"
    assert content == path.read_text(), (
        f"the generated text differs from {path}. Every Slurm submission depends on it: if "
        f"the change is intended, review the diff, rerun with {UPDATE_VARIABLE}=1 "
        f"(`{UPDATE_VARIABLE}=1 pytest tests/unit/test_slurm_text.py`) and commit the file.")


def launch(index: int = 1, *, backend_dir: str | None = None, argv: tuple[str, ...] = (),
           exports: dict[str, str] | None = None, resources: StepResources | None = None,
           job: str = "job1") -> Launch:
    directory = backend_dir or f"/cell/artifacts/{job}/step{index}/attempt-1"
    return Launch(
        key=f"{job}/step{index}", attempt_dir=Path(directory),
        argv=argv or ("/bin/sh", "-c", f"echo {index} > output/x"), env={},
        exports=exports if exports is not None else {"JOBCELL_STEP_DIR": directory},
        runner="echo", resources=resources or StepResources(),
        job_name=f"jobcell-c0ffee-{job}-step{index}-1", backend_dir=directory)


def hostile_launch(directory: str) -> Launch:
    exports = {f"HOSTILE_{i}": value for i, value in enumerate(HOSTILE)}
    exports["JOBCELL_STEP_DIR"] = directory
    return launch(backend_dir=directory, argv=("/bin/echo", *HOSTILE), exports=exports)


SCRIPT_OPTIONS: dict[str, Any] = {
    "wrapper": "/cell/wrapper.sh", "shell": "/bin/bash",
    "before": ["module load python  # site line, verbatim", "ulimit -c 0"],
    "after": ["echo after >&2"]}


# --- golden files ------------------------------------------------------------------------


def test_single_script_matches_the_golden_file() -> None:
    script = st.batch_script([launch(exports={"B": "2", "A": "1 $(x)"})], array=False,
                             **SCRIPT_OPTIONS)
    check_golden("single.sh", script)


def test_hostile_single_script_matches_the_golden_file() -> None:
    script = st.batch_script([hostile_launch(f"/cell/artifacts/{HOSTILE_DIR_NAME}/attempt-1")],
                             array=False, **SCRIPT_OPTIONS)
    check_golden("single_hostile.sh", script)


def test_array_script_matches_the_golden_file() -> None:
    launches = [launch(i) for i in range(3)]
    launches[2] = hostile_launch(f"/cell/artifacts/{HOSTILE_DIR_NAME}/attempt-2")
    check_golden("array.sh", st.batch_script(launches, array=True, **SCRIPT_OPTIONS))


def test_sbatch_argvs_match_the_golden_file() -> None:
    resources = StepResources(cpu_slots=2, memory_mb=1500, gpus=1, optional_gpus=2,
                              timeout_s=3601)
    single = st.sbatch_argv([launch(resources=resources)], sbatch="sbatch",
                            script_path="/cell/artifacts/job1/step1/attempt-1/slurm-batch.sh",
                            partition="gpu", account="proj", qos="normal",
                            extra=["--exclusive", "--constraint=a b"], backend_gpus=2)
    hostile = hostile_launch(f"/cell/artifacts/{HOSTILE_DIR_NAME}/attempt-1")
    hostile_argv = st.sbatch_argv([hostile], sbatch="/opt/slurm/bin/sbatch",
                                  script_path=f"{hostile.backend_dir}/slurm-batch.sh")
    array = st.sbatch_argv([launch(i) for i in range(6)], sbatch="sbatch",
                           script_path="/cell/slurm/arrays/1-ab/batch.sh",
                           array_indices=list(range(6)))
    text = json.dumps({"single": single, "hostile": hostile_argv, "array": array},
                      indent=2, ensure_ascii=False) + "\n"
    check_golden("sbatch_argv.json", text)


# --- scripts run for real ----------------------------------------------------------------

FAKE_WRAPPER = """\
# records how it was called: its argv NUL-separated, and the exported HOSTILE_* values
dir=$1
printf '%s\\0' "$@" > "$dir/argv.bin"
for name in $(compgen -v HOSTILE_; compgen -v JOBCELL_); do
  printf '%s=%s\\0' "$name" "${!name}" >> "$dir/env.bin"
done
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def fake_wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "fake-wrapper.sh"
    path.write_text(FAKE_WRAPPER)
    return path


def run_script(script: str, where: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    path = where / "script.sh"
    path.write_text(script)
    return subprocess.run(["/bin/bash", str(path)], cwd=where, capture_output=True,
                          env={"PATH": os.environ["PATH"], **env}, timeout=30)


def expected_env(item: Launch) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in item.exports.items()}


def recorded(directory: Path) -> tuple[list[bytes], dict[bytes, bytes]]:
    """The wrapper's argv and the HOSTILE_*/JOBCELL_* variables it saw, as bytes."""
    argv = (directory / "argv.bin").read_bytes().split(b"\0")[:-1]
    env_items = (directory / "env.bin").read_bytes().split(b"\0")[:-1]
    return argv, dict(item.split(b"=", 1) for item in env_items)


def test_hostile_values_reach_the_wrapper_byte_exact(tmp_path: Path,
                                                     fake_wrapper: Path) -> None:
    directory = tmp_path / HOSTILE_DIR_NAME
    directory.mkdir()
    item = hostile_launch(str(directory))
    script = st.batch_script([item], wrapper=str(fake_wrapper), shell="/bin/bash",
                             before=[], after=[], array=False)
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    argv, env = recorded(directory)
    assert argv == [str(directory).encode(), *(word.encode() for word in item.argv)]
    assert env == expected_env(item)
    assert not list(tmp_path.rglob("pwned"))
    assert done.stdout == b""


def test_the_script_exits_with_the_wrapper_status_after_the_after_lines(
        tmp_path: Path, fake_wrapper: Path) -> None:
    item = launch(backend_dir=str(tmp_path), exports={})
    script = st.batch_script([item], wrapper=str(fake_wrapper), shell="/bin/bash",
                             before=["echo before >&2"], after=["echo after >&2"],
                             array=False)
    done = run_script(script, tmp_path, FAKE_EXIT="42")
    assert done.returncode == 42
    assert done.stderr == b"before\nafter\n"


def test_an_array_runs_the_launch_of_its_index(tmp_path: Path, fake_wrapper: Path) -> None:
    launches = []
    for index in range(3):
        directory = tmp_path / f"{HOSTILE_DIR_NAME}-{index}"
        directory.mkdir()
        launches.append(hostile_launch(str(directory)) if index == 1 else
                        launch(index, backend_dir=str(directory),
                               exports={"JOBCELL_STEP_DIR": str(directory)}))
    script = st.batch_script(launches, wrapper=str(fake_wrapper), shell="/bin/bash",
                             before=[], after=[], array=True)
    for index, item in enumerate(launches):
        done = run_script(script, tmp_path, SLURM_ARRAY_TASK_ID=str(index), FAKE_EXIT="3")
        assert done.returncode == 3, done.stderr
        argv, env = recorded(Path(item.remote_dir))
        assert argv == [item.remote_dir.encode(), *(word.encode() for word in item.argv)]
        assert env == expected_env(item)  # only its own variables
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("task", [{"SLURM_ARRAY_TASK_ID": "7"}, {"SLURM_ARRAY_TASK_ID": "x"},
                                  {}])
def test_an_unknown_array_index_exits_97(tmp_path: Path, fake_wrapper: Path,
                                         task: dict[str, str]) -> None:
    script = st.batch_script([launch(0), launch(1)], wrapper=str(fake_wrapper),
                             shell="/bin/bash", before=[], after=[], array=True)
    done = run_script(script, tmp_path, **task)
    assert done.returncode == st.UNKNOWN_INDEX_EXIT
    assert b"no launch for array index" in done.stderr


@pytest.mark.parametrize("name", ["A-B", "1A", "A B", "A=B", "", "A\nB", "$A"])
def test_export_names_must_be_shell_variables(name: str) -> None:
    with pytest.raises(ValueError, match="shell variable"):
        st.batch_script([launch(exports={name: "x"})], array=False, **SCRIPT_OPTIONS)


def test_nul_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        st.batch_script([launch(argv=("/bin/echo", "a\0b"))], array=False, **SCRIPT_OPTIONS)
    with pytest.raises(ValueError, match="NUL"):
        st.batch_script([launch(exports={"A": "a\0b"})], array=False, **SCRIPT_OPTIONS)


def test_script_shape_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        st.batch_script([launch(0), launch(1)], array=False, **SCRIPT_OPTIONS)
    with pytest.raises(ValueError, match="at least one"):
        st.batch_script([], array=True, **SCRIPT_OPTIONS)
    with pytest.raises(ValueError, match="absolute path"):
        st.batch_script([launch()], wrapper="/w", shell="bash -x", before=[], after=[],
                        array=False)


# --- sbatch argv -------------------------------------------------------------------------


def option(argv: list[str], name: str) -> str | None:
    values = [word.split("=", 1)[1] for word in argv if word.startswith(f"--{name}=")]
    return values[-1] if values else None


@pytest.mark.parametrize(("timeout_s", "minutes"),
                         [(0.5, "1"), (59, "1"), (60, "1"), (61, "2"), (3600, "60"),
                          (86400 * 2 + 1, "2881")])
def test_time_limit_rounds_up_to_whole_minutes(timeout_s: float, minutes: str) -> None:
    argv = st.sbatch_argv([launch(resources=StepResources(timeout_s=timeout_s))],
                          sbatch="sbatch", script_path="/s.sh")
    assert option(argv, "time") == minutes


@pytest.mark.parametrize(("required", "optional", "backend", "gres"), [
    (0, 0, None, None), (1, 0, None, "gpu:1"), (0, 2, None, None), (0, 2, 0, None),
    (0, 2, 1, "gpu:1"), (0, 2, 4, "gpu:2"), (1, 2, 2, "gpu:2"), (2, 1, 1, "gpu:2"),
    (1, 1, -1, "gpu:1")])
def test_gpus(required: int, optional: int, backend: int | None, gres: str | None) -> None:
    resources = StepResources(gpus=required, optional_gpus=optional)
    argv = st.sbatch_argv([launch(resources=resources)], sbatch="sbatch", script_path="/s.sh",
                          backend_gpus=backend)
    assert option(argv, "gres") == gres


def test_single_job_options() -> None:
    item = launch(resources=StepResources(cpu_slots=3, memory_mb=700))
    argv = st.sbatch_argv([item], sbatch="/usr/bin/sbatch", script_path="/d/s.sh",
                          extra=["--nice=5"])
    assert argv[:2] == ["/usr/bin/sbatch", "--parsable"]
    assert argv[-2:] == ["--nice=5", "/d/s.sh"]
    assert option(argv, "job-name") == item.job_name
    assert option(argv, "output") == f"{item.backend_dir}/slurm-%j.out"
    assert option(argv, "error") == f"{item.backend_dir}/slurm-%j.err"
    assert option(argv, "chdir") == item.backend_dir
    assert option(argv, "mem") == "700M"
    assert option(argv, "cpus-per-task") == "3"
    assert "--no-requeue" in argv
    for name in ("partition", "account", "qos", "array", "gres"):
        assert option(argv, name) is None


def test_percent_in_a_directory_is_escaped_for_slurm_patterns_only() -> None:
    item = launch(backend_dir="/a%j/b%%c")
    argv = st.sbatch_argv([item], sbatch="sbatch", script_path="/a%j/b%%c/slurm-batch.sh")
    assert option(argv, "output") == "/a%%j/b%%%%c/slurm-%j.out"
    assert option(argv, "chdir") == "/a%j/b%%c"
    assert argv[-1] == "/a%j/b%%c/slurm-batch.sh"


def test_array_options() -> None:
    launches = [launch(i, job=f"job{i % 2}") for i in range(6)]
    argv = st.sbatch_argv(launches, sbatch="sbatch", script_path="/cell/slurm/arrays/t/b.sh",
                          array_indices=list(range(6)))
    assert option(argv, "array") == "0-5"
    assert option(argv, "job-name") == "jobcell-c0ffee-array"
    assert option(argv, "output") == "/cell/slurm/arrays/t/slurm-%A_%a.out"
    assert option(argv, "error") == "/cell/slurm/arrays/t/slurm-%A_%a.err"
    assert option(argv, "chdir") == "/cell/slurm/arrays/t"
    named = st.sbatch_argv(launches, sbatch="sbatch", script_path="/b.sh",
                           array_indices=[0, 1], job_name="jobcell-c0ffee-array-x")
    assert option(named, "job-name") == "jobcell-c0ffee-array-x"
    assert option(named, "chdir") == "/"


def test_array_name_is_the_common_prefix() -> None:
    same_job = [launch(i) for i in range(3)]
    assert st.array_job_name(same_job) == "jobcell-c0ffee-job1-array"


@pytest.mark.parametrize(("indices", "text"), [
    ([0], "0"), ([0, 1, 2], "0-2"), ([2, 0, 1, 5, 7, 8], "0-2,5,7-8"), ([3, 3], "3")])
def test_format_indices(indices: list[int], text: str) -> None:
    assert st.format_indices(indices) == text


def test_format_indices_refuses_nonsense() -> None:
    for indices in ([], [-1]):
        with pytest.raises(ValueError):
            st.format_indices(indices)


# --- sbatch, squeue ----------------------------------------------------------------------


@pytest.mark.parametrize(("stdout", "job_id"), [
    ("123\n", "123"), ("123;cluster\n", "123"), ("  77 \n", "77"),
    ((CAPTURED / "sbatch_stdout.txt").read_text(), "13")])
def test_parse_sbatch(stdout: str, job_id: str) -> None:
    assert st.parse_sbatch(stdout) == job_id


@pytest.mark.parametrize("stdout", ["", "Submitted batch job 12\n", "abc;x", "\n\n"])
def test_parse_sbatch_refuses_what_is_not_an_id(stdout: str) -> None:
    with pytest.raises(ValueError, match="where a job id was expected"):
        st.parse_sbatch(stdout)


def captured(name: str) -> CommandResult:
    return CommandResult(
        ("cmd",), int((CAPTURED / f"{name}.rc").read_text()),
        (CAPTURED / f"{name}.stdout").read_text(), (CAPTURED / f"{name}.stderr").read_text())


def test_why_squeue_lists_by_user_and_not_by_job_id() -> None:
    # Slurm 22.05: one unknown id fails the whole call; two unknown ids do not.
    one = captured("squeue_jobs_invalid")
    assert not one.ok and "Invalid job id specified" in one.stderr
    two = captured("squeue_jobs_two_invalid")
    assert two.ok and two.stdout == ""
    argv = st.squeue_argv("squeue")
    assert "--me" in argv and not any(word.startswith("--jobs") for word in argv)
    assert argv == ["squeue", "--me", "--noheader", "--array", "--states=all",
                    "--format=%i|%T|%j"]


def test_parse_captured_squeue() -> None:
    mixed = st.parse_squeue((CAPTURED / "squeue_mixed.txt").read_text())
    assert mixed["11"] == "CANCELLED"
    assert mixed["10"] == "RUNNING"
    assert mixed["12_0"] == "RUNNING"
    assert mixed["12_3"] == "PENDING"
    assert mixed["9"] == "FAILED"
    final = st.parse_squeue((CAPTURED / "squeue_final.txt").read_text())
    assert final["10"] == "TIMEOUT"
    assert final["12_2"] == "FAILED"
    assert final["12_1"] == "COMPLETED"
    rows = st.parse_squeue_rows((CAPTURED / "squeue_running.txt").read_text())
    assert [r.backend_id for r in rows if r.name == "jobcell-c1-array"] == [
        "12_0", "12_1", "12_2", "12_3"]
    assert all(st.is_active(r.state) for r in rows if r.name == "jobcell-c1-array")


def test_parse_squeue_edge_cases() -> None:
    rows = st.parse_squeue_rows("5_[1-3,7%2]|PENDING|a|b\n\ngarbage\n6|CANCELLED by 0|\n")
    assert [(r.backend_id, r.state, r.name) for r in rows] == [
        ("5_1", "PENDING", "a|b"), ("5_2", "PENDING", "a|b"), ("5_3", "PENDING", "a|b"),
        ("5_7", "PENDING", "a|b"), ("6", "CANCELLED", "")]
    assert st.expand_ids("5_[x]") == ["5_[x]"]


# --- sacct, scontrol ---------------------------------------------------------------------

SACCT = """\
123|COMPLETED|0:0
123.batch|COMPLETED|0:0
123.extern|COMPLETED|0:0
124|FAILED|1:0
125|CANCELLED by 0|0:15
126_4|OUT_OF_MEMORY|0:125
127|TIMEOUT|0:0
128|NODE_FAIL|0:0
129|PREEMPTED|0:0
130|FAILED|0:9
131|CANCELLED+|0:0
132|RUNNING|
"""


def test_parse_sacct() -> None:
    records = st.parse_sacct(SACCT)
    assert records["123"] == ("COMPLETED", "0:0")
    assert records["124"] == ("FAILED", "1:0")
    assert records["125"] == ("CANCELLED", "0:15")
    assert records["126_4"] == ("OUT_OF_MEMORY", "0:125")
    assert records["127"].state == "TIMEOUT"
    assert records["130"].exit_code == "0:9"
    assert records["131"].state == "CANCELLED"
    assert records["132"] == ("RUNNING", None)
    assert not any("." in key for key in records)
    assert st.sacct_argv("sacct", ["1", "2_3"]) == [
        "sacct", "--noheader", "--parsable2", "--allocations",
        "--format=JobID,State,ExitCode", "--jobs=1,2_3"]


def test_accounting_disabled_is_never_a_status() -> None:
    real = captured("sacct_disabled")
    assert st.accounting_disabled(real)
    assert st.parse_sacct(real.stdout) == {}
    with_exit_0 = CommandResult(("sacct",), 0, "Slurm accounting storage is disabled\n", "")
    assert st.accounting_disabled(with_exit_0)
    assert st.parse_sacct(with_exit_0.stdout) == {}
    assert not st.accounting_disabled(CommandResult(("sacct",), 0, SACCT, ""))


@pytest.mark.parametrize(("name", "state", "exit_code"), [
    ("ok", "COMPLETED", "0:0"), ("fail", "FAILED", "3:0"), ("sig", "FAILED", "0:9"),
    ("timeout", "TIMEOUT", "0:15"), ("cancel", "CANCELLED", "0:0"),
    ("running", "PENDING", "0:0"), ("array_task_failed", "FAILED", "5:0"),
    ("array_task_ok", "COMPLETED", "0:0")])
def test_parse_captured_scontrol(name: str, state: str, exit_code: str) -> None:
    record = st.parse_scontrol_job((CAPTURED / f"scontrol_{name}.txt").read_text())
    assert record == (state, exit_code)


def test_scontrol_of_an_unknown_job() -> None:
    result = captured("scontrol_invalid")
    assert not result.ok and "Invalid job id" in result.stderr
    assert st.parse_scontrol_job(result.stdout) is None
    assert st.scontrol_argv("scontrol", "5_1") == ["scontrol", "show", "job", "5_1"]


def test_exit_pairs_and_scancel() -> None:
    assert st.parse_exit_pair("1:0") == (1, 0)
    assert st.parse_exit_pair("0:9") == (0, 9)
    assert st.parse_exit_pair(None) is None
    assert st.parse_exit_pair("x") is None
    assert st.scancel_argv("scancel", ["1", "2_3"]) == ["scancel", "1", "2_3"]
    assert st.scancel_argv("scancel", ["1"], force=True) == [
        "scancel", "--signal=KILL", "--full", "1"]


# --- sinfo -------------------------------------------------------------------------------


def test_parse_captured_sinfo() -> None:
    caps = st.parse_sinfo((CAPTURED / "sinfo_nodes.txt").read_text())
    assert caps.backend == "slurm"
    assert caps.partitions == ("debug", "other")
    assert caps.nodes == 3 and caps.cpus == 3 and caps.memory_mb == 3000
    assert caps.gpus == 2 and caps.gpu_source == "sinfo GRES"
    assert caps.details["default_partition"] == "debug"
    assert caps.details["gpus_per_node_max"] == 2
    assert st.sinfo_argv("sinfo") == ["sinfo", "--noheader", "--Node",
                                      "--format=%N|%P|%c|%m|%G|%T"]


@pytest.mark.parametrize(("gres", "count"), [
    ("gpu:2", 2), ("gpu:tesla:4(S:0-1)", 4), ("(null)", 0), ("", 0),
    ("gpu:a100:2,gpu:v100:1,mps:100", 3), ("mps:100,gpu:1(IDX:0)", 1), ("shard:8", 0)])
def test_gpu_count(gres: str, count: int) -> None:
    assert st.gpu_count(gres) == count


def test_parse_sinfo_with_odd_values() -> None:
    caps = st.parse_sinfo("n1|p*|4|8000|gpu:tesla:4(S:0-1)|mixed\n"
                          "n2|p*|8+|N/A|(null)|down\nbad line\n")
    assert caps.nodes == 2 and caps.gpus == 4
    assert caps.cpus == 12 and caps.memory_mb is None
    assert caps.partitions == ("p",)
    assert st.parse_sinfo("").nodes is None


# --- interpretation ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["OUT_OF_MEMORY", "TIMEOUT", "CANCELLED by 0", "FAILED",
                                   "NODE_FAIL", "RUNNING", None])
def test_an_exit_code_file_always_wins(state: str | None) -> None:
    status = st.interpret(state, 0)
    assert status == Status(Phase.EXITED, 0)
    assert st.interpret(state, 3).phase is Phase.EXITED
    assert st.interpret(state, 3).exit_code == 3


def test_a_non_zero_exit_code_is_explained_by_the_state() -> None:
    oom = st.interpret("OUT_OF_MEMORY", 137)
    assert oom.phase is Phase.EXITED and oom.oom_like and "OUT_OF_MEMORY" in (oom.reason or "")
    timeout = st.interpret("TIMEOUT", 143, time_limit_s=90)
    assert timeout.reason == "Slurm TIMEOUT (time limit 2 min reached)"
    assert st.interpret("FAILED", 3).reason is None
    assert st.interpret("CANCELLED by 0", 143).reason == "cancelled in Slurm"
    assert st.interpret("NODE_FAIL", 1).phase is Phase.EXITED


@pytest.mark.parametrize(("state", "expected"), [
    ("PENDING", Status(Phase.RUNNING)), ("RUNNING", Status(Phase.RUNNING)),
    ("CONFIGURING", Status(Phase.RUNNING)), ("COMPLETING", Status(Phase.RUNNING)),
    ("SUSPENDED", Status(Phase.RUNNING)), ("REQUEUE_HOLD", Status(Phase.RUNNING)),
    ("SOME_FUTURE_STATE", Status(Phase.RUNNING)),
    ("OUT_OF_MEMORY", Status(Phase.FAILED, 137, "Slurm OUT_OF_MEMORY (the job exceeded its "
                                                 "memory, exit 0:125)", oom_like=True)),
    ("TIMEOUT", Status(Phase.FAILED, None, "Slurm TIMEOUT (time limit 1 min reached, "
                                           "exit 0:125)")),
    ("DEADLINE", Status(Phase.FAILED, None, "Slurm DEADLINE (exit 0:125)")),
    ("CANCELLED by 1000", Status(Phase.FAILED, None, "cancelled in Slurm")),
    ("NODE_FAIL", Status(Phase.INTERRUPTED, None, "Slurm NODE_FAIL: the cluster lost the job")),
    ("PREEMPTED", Status(Phase.INTERRUPTED, None, "Slurm PREEMPTED: the cluster lost the job")),
    ("BOOT_FAIL", Status(Phase.INTERRUPTED, None, "Slurm BOOT_FAIL: the cluster lost the job")),
    ("REQUEUED", Status(Phase.INTERRUPTED, None, "Slurm REQUEUED: the cluster lost the job")),
])
def test_states_without_an_exit_code_file(state: str, expected: Status) -> None:
    assert st.interpret(state, None, slurm_exit="0:125", time_limit_s=60) == expected


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED", None])
def test_an_end_without_a_file_waits_for_the_grace(state: str | None) -> None:
    assert st.interpret(state, None) == Status(Phase.RUNNING)
    status = st.interpret(state, None, grace_expired=True)
    assert status.phase is Phase.INTERRUPTED
    assert "without writing an exit_code" in (status.reason or "")


def test_every_state_is_in_the_one_table() -> None:
    assert st.normalize_state(" cancelled by 0 ") == "CANCELLED"
    assert st.normalize_state("CANCELLED+") == "CANCELLED"
    assert st.outcome_of(None) is None and st.outcome_of("") is None
    assert st.outcome_of("COMPLETED") is st.Outcome.ENDED
    assert {st.outcome_of(s) for s in st.SLURM_STATES} == set(st.Outcome)
