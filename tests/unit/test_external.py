"""External executor, pure parts: the submit environment, the step script (run for real with
bash), and the parsers of what the admin's submit, status and capabilities commands print."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from jobcell.executors.base import BackendCapabilities, Launch, StepResources
from jobcell.executors.external import (
    ExternalExecutor,
    parse_capabilities,
    parse_status_output,
    parse_submit_output,
    program_problem,
    requested_gpus,
    step_identity,
    step_script,
    submit_environment,
)
from jobcell.settings import load_settings

HOSTILE = ["it's", 'say "hi"', "two words", "line1\nline2", "$(touch /tmp/pwned-jobcell)",
           "`id`", "$HOME", "back\\slash", "*", "-n", "", "; rm -rf /", "tab\there", "é ü"]


def make_launch(attempt_dir: Path, **overrides: object) -> Launch:
    fields: dict[str, object] = {
        "key": "job-1/align",
        "attempt_dir": attempt_dir,
        "argv": ("python3", "-c", "print(1)"),
        "env": {},
        "exports": {"JOBCELL_JOB_ID": "job-1", "JOBCELL_STEP_ID": "align",
                    "JOBCELL_ATTEMPT": "2", "JOBCELL_STEP_DIR": "/backend/job-1/align/a-2"},
        "runner": "aligner",
        "resources": StepResources(cpu_slots=4, memory_mb=2048, gpus=1, optional_gpus=2,
                                   timeout_s=600.0),
        "job_name": "jobcell-c1-job-1-align-2",
        "backend_dir": "/backend/job-1/align/a-2",
    }
    fields.update(overrides)
    return Launch(**fields)  # type: ignore[arg-type]


# --- identity and GPUs ------------------------------------------------------------------


def test_step_identity_comes_from_the_exports_then_the_key(tmp_path: Path) -> None:
    assert step_identity(make_launch(tmp_path)) == ("job-1", "align", "align")
    indexed = make_launch(tmp_path, exports={"JOBCELL_STEP_INDEX": "3"})
    assert step_identity(indexed) == ("job-1", "align", "3")
    bare = make_launch(tmp_path, key="j9/s7", exports={})
    assert step_identity(bare) == ("j9", "s7", "s7")


@pytest.mark.parametrize(("required", "optional", "backend", "expected"), [
    (0, 0, None, 0), (1, 0, 4, 1), (1, 2, None, 1), (1, 2, 0, 1), (1, 2, 8, 3),
    (1, 2, 2, 2), (0, 1, 1, 1), (2, 1, 1, 2),
])
def test_optional_gpus_are_requested_only_when_the_backend_reports_them(
        required: int, optional: int, backend: int | None, expected: int) -> None:
    assert requested_gpus(required, optional, backend) == expected


# --- the submit environment -------------------------------------------------------------


def test_submit_environment_without_capabilities(tmp_path: Path) -> None:
    attempt = tmp_path / "a-2"
    env = submit_environment(make_launch(attempt), backend_dir="/backend/job-1/align/a-2")
    assert env == {
        "JOBCELL_JOB_ID": "job-1",
        "JOBCELL_STEP_ID": "align",
        "JOBCELL_STEP_INDEX": "align",
        "JOBCELL_ATTEMPT": "2",
        "JOBCELL_JOB_NAME": "jobcell-c1-job-1-align-2",
        "JOBCELL_RUNNER": "aligner",
        "JOBCELL_STEP_SCRIPT": "/backend/job-1/align/a-2/step.sh",
        "JOBCELL_OUTPUT_DIR": "/backend/job-1/align/a-2/output",
        "JOBCELL_LOCAL_STEP_SCRIPT": str(attempt / "step.sh"),
        "JOBCELL_LOCAL_OUTPUT_DIR": str(attempt / "output"),
        "JOBCELL_BACKEND_DIR": "/backend/job-1/align/a-2",
        "JOBCELL_LOCAL_DIR": str(attempt),
        "JOBCELL_MEMORY_MB": "2048",
        "JOBCELL_CPU_SLOTS": "4",
        "JOBCELL_TIMEOUT_S": "600",
        "JOBCELL_GPUS_REQUIRED": "1",
        "JOBCELL_GPUS_OPTIONAL": "2",
        "JOBCELL_GPUS_REQUESTED": "1",
        "JOBCELL_BACKEND_GPU_COUNT": "",
        "JOBCELL_BACKEND_GPU_SOURCE": "unknown",
    }


def test_submit_environment_with_reported_gpus(tmp_path: Path) -> None:
    capabilities = BackendCapabilities("external", gpus=4, gpu_source="backend_capabilities_cmd")
    env = submit_environment(make_launch(tmp_path), backend_dir="/b/", capabilities=capabilities)
    assert env["JOBCELL_GPUS_REQUESTED"] == "3"
    assert env["JOBCELL_BACKEND_GPU_COUNT"] == "4"
    assert env["JOBCELL_BACKEND_GPU_SOURCE"] == "backend_capabilities_cmd"
    assert env["JOBCELL_STEP_SCRIPT"] == "/b/step.sh"


def test_submit_environment_when_the_backend_has_no_gpus(tmp_path: Path) -> None:
    env = submit_environment(make_launch(tmp_path), backend_dir="/b",
                             capabilities=BackendCapabilities("external", gpus=0))
    assert env["JOBCELL_GPUS_REQUESTED"] == "1"
    assert env["JOBCELL_BACKEND_GPU_COUNT"] == "0"


# --- the step script --------------------------------------------------------------------

GOLDEN_STEP_SCRIPT = r"""#!/bin/bash
# jobcell step script for job-1/align: exports, then the step wrapper.
set -u
unset JOBCELL_ADMIN_KEY JOBCELL_HOME
export JOBCELL_JOB_ID=job-1
export JOBCELL_STEP_ID=align
export QUOTE=''"'"'; echo pwned'
export SUBST='$(touch /tmp/pwned-jobcell)'
export MULTI='a
b'
exec /bin/bash '/wrap dir/wrapper.sh' '/backend/a 2' echo 'it'"'"'s' '$(id)' 'two words'
"""


def test_step_script_golden(tmp_path: Path) -> None:
    launch = make_launch(
        tmp_path, argv=("echo", "it's", "$(id)", "two words"),
        exports={"JOBCELL_JOB_ID": "job-1", "JOBCELL_STEP_ID": "align",
                 "QUOTE": "'; echo pwned", "SUBST": "$(touch /tmp/pwned-jobcell)",
                 "MULTI": "a\nb"})
    text = step_script(launch, shell="/bin/bash", wrapper="/wrap dir/wrapper.sh",
                       backend_dir="/backend/a 2",
                       unset=["JOBCELL_HOME", "JOBCELL_ADMIN_KEY", "JOBCELL_JOB_ID"])
    assert text == GOLDEN_STEP_SCRIPT


FAKE_WRAPPER = """\
import json, os, sys
names = [n for n in os.environ if n.startswith(("HOSTILE_", "JOBCELL_"))]
json.dump({"argv": sys.argv[1:], "env": {n: os.environ[n] for n in names}},
          open(os.environ["FAKE_WRAPPER_OUT"], "w"))
"""


def test_step_script_passes_hostile_values_through_bash_unchanged(tmp_path: Path) -> None:
    wrapper_dir = tmp_path / "wrapper dir 'q'"
    wrapper_dir.mkdir()
    fake = wrapper_dir / "fake wrapper.sh"
    # The step script runs ``SHELL WRAPPER DIR ARGV...``; the "shell" here hands them to
    # Python, which records exactly the argv and environment the real wrapper would get.
    (wrapper_dir / "record.py").write_text(FAKE_WRAPPER)
    fake.write_text("")
    shell = wrapper_dir / "shell"
    shell.write_text('#!/bin/bash\nexec python3 "$RECORDER" "$@"\n')
    shell.chmod(0o755)
    exports = {f"HOSTILE_{i}": value for i, value in enumerate(HOSTILE)}
    exports["JOBCELL_STEP_ID"] = "align"
    launch = make_launch(tmp_path, argv=("runner", *HOSTILE), exports=exports)
    backend_dir = str(tmp_path / "attempt $(id) 'x'")
    script = tmp_path / "step.sh"
    script.write_text(step_script(launch, shell=str(shell), wrapper=str(fake),
                                  backend_dir=backend_dir,
                                  unset=["JOBCELL_ADMIN_KEY", "JOBCELL_STEP_ID"]))
    script.chmod(0o755)
    out = tmp_path / "out.json"
    env = {"PATH": os.environ["PATH"], "FAKE_WRAPPER_OUT": str(out),
           "RECORDER": str(wrapper_dir / "record.py"), "JOBCELL_ADMIN_KEY": "secret",
           "JOBCELL_STEP_ID": "from-the-worker"}
    done = subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(fake), backend_dir, "runner", *HOSTILE]
    assert seen["env"] == exports  # the admin key is gone, the step id is the step's
    assert not Path("/tmp/pwned-jobcell").exists()


def test_step_script_runs_the_real_wrapper(tmp_path: Path) -> None:
    from jobcell.executors.wrapper import wrapper_script

    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(wrapper_script())
    attempt = tmp_path / "attempt 1"
    attempt.mkdir()
    launch = make_launch(attempt, argv=("/bin/sh", "-c", 'printf "%s|" "$@"; exit 3', "sh",
                                        *HOSTILE[:6]),
                         exports={"JOBCELL_STEP_ID": "x y"})
    script = attempt / "step.sh"
    script.write_text(step_script(launch, shell="/bin/bash", wrapper=str(wrapper),
                                  backend_dir=str(attempt)))
    done = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 3
    assert (attempt / "exit_code").read_text() == "3\n"
    assert (attempt / "stdout.log").read_text() == "".join(f"{v}|" for v in HOSTILE[:6])


def test_a_hostile_key_stays_inside_the_comment(tmp_path: Path) -> None:
    launch = make_launch(tmp_path, key="job\ntouch /tmp/pwned-jobcell\r/step", exports={})
    text = step_script(launch, shell="/bin/bash", wrapper="/w.sh", backend_dir="/b")
    assert text.splitlines()[1] == ("# jobcell step script for job?touch /tmp/pwned-jobcell?"
                                    "/step: exports, then the step wrapper.")
    assert len(text.splitlines()) == 4


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "A=B", "", "X;id"])
def test_step_script_refuses_names_a_shell_cannot_export(tmp_path: Path, name: str) -> None:
    launch = make_launch(tmp_path, exports={name: "v"})
    with pytest.raises(ValueError, match="not a shell variable name"):
        step_script(launch, shell="/bin/bash", wrapper="/w.sh", backend_dir="/b")


def test_step_script_refuses_nul_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NUL"):
        step_script(make_launch(tmp_path, exports={"A": "x\0y"}), shell="/bin/bash",
                    wrapper="/w.sh", backend_dir="/b")
    with pytest.raises(ValueError, match="NUL"):
        step_script(make_launch(tmp_path, argv=("a\0b",)), shell="/bin/bash",
                    wrapper="/w.sh", backend_dir="/b")


# --- submit output ----------------------------------------------------------------------


@pytest.mark.parametrize(("stdout", "expected"), [
    ("123\n", "123"),
    ("  4567  ", "4567"),
    ("submitting...\nqueued on gpu\n\n  job.42@site  \n\n", "job.42@site"),
    ("123;cluster\n", "123;cluster"),
    ("arn:aws:batch/abc-DEF_1+2=3\n", "arn:aws:batch/abc-DEF_1+2=3"),
])
def test_submit_output_gives_the_last_non_empty_line(stdout: str, expected: str) -> None:
    assert parse_submit_output(stdout) == expected


@pytest.mark.parametrize(("stdout", "shown"), [
    ("Submitted batch job 123\n", "'Submitted batch job 123\\n'"),
    ("$(id)\n", "'$(id)\\n'"),
    ("-rf\n", "'-rf\\n'"),
    ("id'quote\n", "\"id'quote\\n\""),
    ("x" * 300, "'" + "x" * 200 + "...'"),
])
def test_unusable_submit_output_is_quoted_in_the_error(stdout: str, shown: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_submit_output(stdout)
    message = str(caught.value)
    assert message.startswith(f"the external submit command printed {shown}, not a backend "
                              "job id; the last non-empty line")


@pytest.mark.parametrize("stdout", ["", "\n\n", "   \n"])
def test_empty_submit_output_says_no_id(stdout: str) -> None:
    with pytest.raises(ValueError, match="printed no backend job id; the last non-empty line "
                                         "of its stdout must be the backend job id alone"):
        parse_submit_output(stdout)


# --- status output ----------------------------------------------------------------------


@pytest.mark.parametrize(("stdout", "expected"), [
    ("RUNNING\n", ("RUNNING", None)),
    ("PENDING", ("PENDING", None)),
    ("SUCCEEDED\n", ("SUCCEEDED", None)),
    ("SUCCEEDED 0\n", ("SUCCEEDED", 0)),
    ("FAILED 137\n", ("FAILED", 137)),
    ("FAILED -9\n", ("FAILED", -9)),
    ("CANCELLED\n", ("CANCELLED", None)),
    ("CANCELLED 143", ("CANCELLED", 143)),
    ("running\n", ("RUNNING", None)),
    ("checking...\n\n  failed   2  \n\n", ("FAILED", 2)),
])
def test_status_output(stdout: str, expected: tuple[str, int | None]) -> None:
    assert parse_status_output(stdout) == expected


@pytest.mark.parametrize(("stdout", "message"), [
    ("", "the external status command printed nothing; expected one of RUNNING, PENDING, "
         "SUCCEEDED, FAILED, CANCELLED, a terminal state optionally followed by an exit code"),
    ("COMPLETED\n", "the external status command printed 'COMPLETED\\n'; expected one of "
                    "RUNNING, PENDING, SUCCEEDED, FAILED, CANCELLED"),
    ("<html>502 Bad Gateway</html>", "printed '<html>502 Bad Gateway</html>'; expected"),
    ("FAILED 1 2\n", "printed 'FAILED 1 2\\n'; expected one of"),
    ("RUNNING 0\n", "printed 'RUNNING 0\\n'; only SUCCEEDED, FAILED and CANCELLED take an "
                    "exit code"),
    ("FAILED oom\n", "printed 'FAILED oom\\n'; the exit code after FAILED must be an integer"),
    ("FAILED 1.5\n", "the exit code after FAILED must be an integer"),
])
def test_unparsable_status_output_gives_a_clear_message(stdout: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_status_output(stdout)
    assert message in str(caught.value)


# --- capabilities -----------------------------------------------------------------------


def test_capabilities_json() -> None:
    caps = parse_capabilities('{"gpus": 2, "gpu_memory_mb": 81920, "partitions": ["gpu"],'
                              ' "nodes": 3, "site": "hpc1"}\n')
    assert caps == BackendCapabilities("external", gpus=2, gpu_source="backend_capabilities_cmd",
                                       partitions=("gpu",), nodes=3,
                                       details={"gpu_memory_mb": 81920, "site": "hpc1"})
    assert caps.to_dict()["gpu_memory_mb"] == 81920


def test_capabilities_key_value_lines() -> None:
    caps = parse_capabilities("# site gateway\ngpus=2\ngpu_memory_mb = 81920\n\n"
                              "partitions=gpu, cpu\ncpus=64\nmemory_mb=512000\n"
                              "gpu_source=sinfo gres\nnote=a=b\n")
    assert caps.gpus == 2
    assert caps.gpu_source == "sinfo gres"
    assert caps.partitions == ("gpu", "cpu")
    assert (caps.cpus, caps.memory_mb) == (64, 512000)
    assert caps.details == {"gpu_memory_mb": 81920, "note": "a=b"}


def test_capabilities_without_gpus_leave_them_unknown() -> None:
    caps = parse_capabilities("nodes=2\n")
    assert caps.gpus is None
    assert caps.gpu_source == "unknown"
    assert parse_capabilities('{"gpus": null}').gpus is None
    assert parse_capabilities("gpus=0").gpus == 0


@pytest.mark.parametrize(("stdout", "message"), [
    ("", "the capabilities command printed nothing; expected a JSON object"),
    ('{"gpus": 2', "the capabilities command printed invalid JSON"),
    ("[1, 2]", "printed JSON that is not an object: '[1, 2]'"),
    ("gpus=2\nhello world\n", "printed line 2 'hello world', not key=value"),
    ("=3\n", "printed line 1 '=3', not key=value"),
    ("gpus=two\n", "gave gpus='two'; gpus must be a non-negative integer"),
    ("gpus=-1\n", "gave gpus=-1; gpus must be a non-negative integer"),
    ('{"gpus": true}', "gave gpus=True; gpus must be a non-negative integer"),
    ('{"gpus": 1.5}', "gave gpus=1.5; gpus must be a non-negative integer"),
    ('{"partitions": 3}', "gave partitions=3; expected a list of names"),
])
def test_unparsable_capabilities_give_a_clear_message(stdout: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_capabilities(stdout)
    assert message in str(caught.value)


# --- usable -----------------------------------------------------------------------------


def _program(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\necho 1\n")
    path.chmod(mode)
    return path


def test_program_problem(tmp_path: Path) -> None:
    ok = _program(tmp_path / "ok")
    plain = _program(tmp_path / "plain", 0o644)
    assert program_problem([str(ok)], "x") is None
    assert program_problem(["sh", "-c", "true"], "x") is None
    assert program_problem(None, "x") == "x is not configured"
    assert program_problem([str(tmp_path / "nope")], "x") == \
        f"x: {tmp_path / 'nope'} does not exist"
    assert program_problem([str(plain)], "x") == f"x: {plain} is not executable"
    assert program_problem(["no-such-program-jobcell"], "x") == \
        "x: no-such-program-jobcell is not on PATH"
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_usable_needs_submit_and_status_commands(tmp_path: Path) -> None:
    ok = str(_program(tmp_path / "ok"))

    def usable(**options: object) -> str | None:
        settings = load_settings(None, env={}, overrides={"executor_backend": "external",
                                                          **options})
        executor = ExternalExecutor(settings, wrapper_path=tmp_path / "wrapper.sh",
                                    artifacts_root=tmp_path)
        return executor.usable()

    assert usable() == "external_submit_cmd is not configured"
    assert usable(external_submit_cmd=[ok]) == "external_status_cmd is not configured"
    assert usable(external_submit_cmd=[ok], external_status_cmd=[ok]) is None
    assert usable(external_submit_cmd=[ok, "--flag"], external_status_cmd=f"{ok} -q") is None
    missing = str(tmp_path / "missing")
    assert usable(external_submit_cmd=[missing], external_status_cmd=[ok]) == \
        f"external_submit_cmd: {missing} does not exist"
    assert usable(external_submit_cmd=[ok], external_status_cmd=[ok],
                  external_cancel_cmd=[missing]) == \
        f"external_cancel_cmd: {missing} does not exist"


def test_capabilities_without_a_command_are_unknown(tmp_path: Path) -> None:
    settings = load_settings(None, env={})
    executor = ExternalExecutor(settings, wrapper_path=tmp_path / "w", artifacts_root=tmp_path)
    caps = executor.capabilities()
    assert (caps.backend, caps.gpus, caps.gpu_source) == ("external", None, "unknown")


def test_backend_path_applies_the_path_mappings(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={
        "backend_path_mappings": {"/srv/cell": "/gpfs/cell", "/srv/cell/artifacts/x": "/x"}})
    executor = ExternalExecutor(settings, wrapper_path=tmp_path / "w", artifacts_root=tmp_path)
    assert executor.backend_path(Path("/srv/cell/artifacts/j/s/attempt-1")) == \
        "/gpfs/cell/artifacts/j/s/attempt-1"
    assert executor.backend_path(Path("/srv/cell/artifacts/x/a")) == "/x/a"
    assert executor.backend_path(Path("/elsewhere/a")) == "/elsewhere/a"
