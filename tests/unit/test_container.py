"""Container runners: command lines pinned by golden files, validation, runtime resolution.

The golden files under ``tests/unit/golden/container/`` hold the full argv of one step
(and, for apptainer/singularity, the variables set in the runtime's environment), built
by :func:`jobcell.launching.build_launch` for an attempt directory whose backend path is
hostile to any shell. Update them with ``JOBCELL_UPDATE_GOLDEN=1 pytest
tests/unit/test_container.py`` after reviewing the change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jobcell.executors import container as containers
from jobcell.executors.base import Launch
from jobcell.executors.container import (
    ContainerError,
    ContainerOptions,
    GpuRequest,
    Mount,
    check_extra_args,
    cleanup_argv,
    container_argv,
    resolve_runtime,
)
from jobcell.launching import build_launch
from jobcell.model.canonical import hash_value
from jobcell.model.runner import ContainerSpec, RunnerDefinition, runner_argv
from jobcell.settings import load_settings
from jobcell.store import StepRow

GOLDEN = Path(__file__).parent / "golden" / "container"
UPDATE_VARIABLE = "JOBCELL_UPDATE_GOLDEN"
# Read at import time: tests/conftest.py removes JOBCELL_* variables before each test.
UPDATE_GOLDEN = os.environ.get(UPDATE_VARIABLE) == "1"

# The attempt directory as the backend sees it: quotes, spaces, a newline, $() and ``.
HOSTILE_DIR = "/data/cell home/it's \"q\" $(rm -rf ~) `id`\nline/artifacts/j1/s1/attempt-1"
HOSTILE_VALUE = "a b; rm -rf / $(id) `id` 'q' \"d\" \\ * ,=\nnext"
EXECUTABLES = {name: f"/usr/bin/{name}" for name in containers.RUNTIMES}


def which(name: str) -> str | None:
    return EXECUTABLES.get(name)


def runner(**fields: Any) -> RunnerDefinition:
    data: dict[str, Any] = {
        "name": "tool", "command": "/opt/tool/bin/run",
        "args_template": ["--in", "{input_dir}", "--out={output_dir}", "--dir", "{step_dir}",
                          "--text", "{text}", "{count}"],
        "params": {"text": {"type": "string"}, "count": {"type": "integer", "default": 2}},
        "env": {"MODE": HOSTILE_VALUE, "LC_ALL": "C.UTF-8"},
        "container": {"image": "registry.example.org/lab/tool@sha256:" + "ab" * 32}}
    data.update(fields)
    return RunnerDefinition.model_validate(data)


def step(gpus: list[str] | None = None, **params: Any) -> StepRow:
    return StepRow(job_id="j1", step_id="s1", index=0, runner="tool", runner_hash="h",
                   runner_def={}, params={"text": HOSTILE_VALUE, "count": 2, **params},
                   inputs=[], input_layout="flat", cache=True, cpu_slots=1, memory_mb=256,
                   timeout_s=60, retries=0, attempt=1, gpus=gpus)


def launch(tmp_path: Path, definition: RunnerDefinition, options: ContainerOptions, *,
           gpus: list[str] | None = None, gpu_env: bool = False,
           base_env: dict[str, str] | None = None) -> Launch:
    return build_launch(key="j1/s1", step=step(gpus), runner=definition,
                        attempt_dir=tmp_path / "attempt-1", upstream={}, gpu_env=gpu_env,
                        cell_id="c0ffee", backend_path=lambda _: HOSTILE_DIR,
                        base_env=base_env if base_env is not None else {"PATH": "/usr/bin"},
                        container_options=options, which=which)


def options(runtime: str, **fields: Any) -> ContainerOptions:
    return ContainerOptions(**{"runtime": runtime, "uid": 0, "gid": 0, **fields})


def with_container(**container: Any) -> RunnerDefinition:
    base = runner().container
    assert base is not None
    return runner(container={**base.model_dump(exclude_none=True), **container})


CASES: dict[str, tuple[RunnerDefinition, ContainerOptions, list[str] | None]] = {
    "podman-root-no-gpu": (runner(), options("podman"), None),
    "podman-rootless": (runner(), options("podman", uid=1000, gid=1000), None),
    "podman-gpus-required": (runner(resources={"gpus": 2}), options("podman"), ["0", "2"]),
    "podman-gpus-required-unknown-devices": (runner(resources={"gpus": 2}),
                                             options("podman"), None),
    "podman-gpus-optional-backend-has-gpus": (runner(resources={"optional_gpus": 1}),
                                              options("podman", backend_gpus=4), None),
    "podman-gpus-optional-no-backend-gpus": (runner(resources={"optional_gpus": 1}),
                                             options("podman", backend_gpus=0), None),
    "podman-network-and-extra-args": (
        with_container(workdir="/work", pull="always",
                       extra_args=["--memory", "2g", "--shm-size=1g", "--read-only",
                                   "--tmpfs", "/scratch"]),
        options("podman", network="labnet"), None),
    "podman-python-runner": (
        RunnerDefinition.model_validate({"name": "py", "python": "lab.analysis:fit",
                                         "container": {"image": "lab/py:3.12",
                                                       "command": "/usr/bin/python3"}}),
        options("podman"), None),
    "docker-no-gpu": (runner(), options("docker", uid=1000, gid=100), None),
    "docker-gpus-required": (runner(resources={"gpus": 2}), options("docker"), ["1", "3"]),
    "docker-gpus-required-count": (runner(resources={"gpus": 2}), options("docker"), None),
    "docker-gpus-optional-forced": (runner(resources={"optional_gpus": 1}),
                                    options("docker", force_gpu=True), None),
    "apptainer-no-gpu": (with_container(image="docker://lab/tool:1.2"),
                         options("apptainer", uid=1000, gid=1000), None),
    "apptainer-gpus-required": (
        runner(resources={"gpus": 1}, container={"image": "/images/tool.sif", "pull": "never"}),
        options("apptainer"), ["0"]),
    "apptainer-pull-always": (with_container(image="docker://lab/tool:1.2", pull="always"),
                              options("apptainer"), None),
    "singularity-gpus-optional": (
        runner(resources={"optional_gpus": 1},
               container={"image": "library://lab/tool:1.2", "runtime": "singularity"}),
        options("podman", backend_gpus=2), None),
}


def golden_payload(launch_: Launch) -> dict[str, Any]:
    runtime_env = {k: v for k, v in sorted(launch_.exports.items())
                   if k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}
    return {"argv": list(launch_.argv), "runtime_env": runtime_env}


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_lines_match_the_golden_files(case: str, tmp_path: Path) -> None:
    definition, opts, gpus = CASES[case]
    # a cell that leases GPUs itself sets CUDA_VISIBLE_DEVICES; the others do not
    payload = golden_payload(launch(tmp_path, definition, opts, gpus=gpus,
                                    gpu_env=gpus is not None))
    path = GOLDEN / f"{case}.json"
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; create it with {UPDATE_VARIABLE}=1 pytest"
    assert text == path.read_text(encoding="utf-8"), (
        f"the {case} command line differs from {path}: if the change is intended, review "
        f"the diff and rerun with {UPDATE_VARIABLE}=1 pytest tests/unit/test_container.py")


def test_every_golden_file_is_a_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(CASES)


# -- what the golden files must show, asserted directly ---------------------------------------

def items_after(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, item in enumerate(argv[:-1]) if item == flag]


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_oci_values_are_single_items_and_paths_are_inside(runtime: str, tmp_path: Path
                                                          ) -> None:
    argv = launch(tmp_path, runner(), options(runtime)).argv
    assert argv[:2] == (f"/usr/bin/{runtime}", "run")
    assert {"--rm", "--init", "--pull=missing", "--cap-drop=all"} <= set(argv)
    assert items_after(argv, "--network") == ["none"]
    assert items_after(argv, "--user") == ["0:0"]
    assert items_after(argv, "--volume") == [
        f"{HOSTILE_DIR}/input:/jobcell/step/input:ro",
        f"{HOSTILE_DIR}/inputs.json:/jobcell/step/inputs.json:ro",
        f"{HOSTILE_DIR}/output:/jobcell/step/output:rw"]
    assert items_after(argv, "--workdir") == ["/jobcell/step"]
    env = items_after(argv, "--env")
    assert f"MODE={HOSTILE_VALUE}" in env and "JOBCELL_STEP_DIR=/jobcell/step" in env
    assert "JOBCELL_JOB_ID=j1" in env and "JOBCELL_ATTEMPT=1" in env
    image_at = argv.index(runner().container.image)  # type: ignore[union-attr]
    assert argv[image_at + 1:] == (
        "/opt/tool/bin/run", "--in", "/jobcell/step/input", "--out=/jobcell/step/output",
        "--dir", "/jobcell/step", "--text", HOSTILE_VALUE, "2")
    assert not any(HOSTILE_DIR in item for item in argv[image_at:])  # host paths stay out


def test_apptainer_passes_variables_in_its_environment_not_as_csv_options(tmp_path: Path
                                                                          ) -> None:
    base = {"PATH": "/usr/bin", "APPTAINER_BIND": "/etc", "SINGULARITY_BINDPATH": "/srv"}
    result = launch(tmp_path, with_container(image="docker://lab/tool:1"),
                    options("apptainer"), base_env=base)
    assert "--env" not in result.argv
    assert result.env["APPTAINERENV_MODE"] == HOSTILE_VALUE
    assert result.exports["APPTAINERENV_JOBCELL_STEP_DIR"] == "/jobcell/step"
    assert "APPTAINER_BIND" not in result.env and "SINGULARITY_BINDPATH" not in result.env
    assert items_after(result.argv, "--bind")[0] == f"{HOSTILE_DIR}/input:/jobcell/step/input:ro"
    assert items_after(result.argv, "--network") == ["none"] and "--net" in result.argv
    assert {"--containall", "--cleanenv", "--no-home"} <= set(result.argv)
    assert "--nv" not in result.argv


def test_cuda_devices_are_renumbered_inside_podman_and_docker_only(tmp_path: Path) -> None:
    gpu_runner = runner(resources={"gpus": 2})
    for runtime, inside in (("podman", "0,1"), ("docker", "0,1"), ("apptainer", "2,5")):
        definition = gpu_runner if runtime != "apptainer" else runner(
            resources={"gpus": 2}, container={"image": "/i.sif"})
        result = launch(tmp_path / runtime, definition, options(runtime), gpus=["2", "5"],
                        gpu_env=True)
        env = dict(item.split("=", 1) for item in items_after(result.argv, "--env")) \
            if runtime != "apptainer" else {k.removeprefix("APPTAINERENV_"): v
                                            for k, v in result.exports.items()}
        assert env["CUDA_VISIBLE_DEVICES"] == inside, runtime
        assert env["JOBCELL_GPU_DEVICES"] == "2,5"       # the host's ids, for the record
        assert result.env["CUDA_VISIBLE_DEVICES"] == "2,5"  # the runtime itself: host ids


def test_optional_gpus_need_backend_gpus_leased_devices_or_the_force_variable() -> None:
    assert containers.gpu_request(0, 1, (), None, False) is None
    assert containers.gpu_request(0, 1, (), 0, False) is None
    assert containers.gpu_request(0, 1, (), 2, False) == GpuRequest((), 1)
    assert containers.gpu_request(0, 1, ("3",), None, False) == GpuRequest(("3",), 1)
    assert containers.gpu_request(0, 1, (), None, True) == GpuRequest((), 1)
    assert containers.gpu_request(2, 0, ("0", "1"), 0, False) == GpuRequest(("0", "1"), 2)
    assert containers.gpu_request(0, 0, ("0",), 4, True) is None
    # a cell that leases GPUs itself decided: no leased device, no GPU
    assert containers.gpu_request(0, 1, (), 4, True, scheduled=True) is None
    assert containers.gpu_request(0, 1, ("1",), 4, False, scheduled=True) == \
        GpuRequest(("1",), 1)


def test_a_cell_that_leased_no_gpu_to_an_optional_step_gives_the_container_none(
        tmp_path: Path) -> None:
    definition = runner(resources={"optional_gpus": 1})
    result = launch(tmp_path, definition, options("podman", backend_gpus=4, force_gpu=True),
                    gpus=None, gpu_env=True)
    assert "--device" not in result.argv
    assert "CUDA_VISIBLE_DEVICES=" in items_after(result.argv, "--env")


def test_the_force_variable_is_read_from_the_base_environment(tmp_path: Path) -> None:
    definition = runner(resources={"optional_gpus": 1})
    plain = build_launch(key="k", step=step(), runner=definition, attempt_dir=tmp_path / "a",
                         upstream={}, gpu_env=False, cell_id="c", backend_path=str,
                         base_env={"PATH": "/bin"}, which=which)
    forced = build_launch(key="k", step=step(), runner=definition, attempt_dir=tmp_path / "b",
                          upstream={}, gpu_env=False, cell_id="c", backend_path=str,
                          base_env={"PATH": "/bin", "JOBCELL_FORCE_CONTAINER_GPU": "1"},
                          which=which)
    assert "--device" not in plain.argv
    assert items_after(forced.argv, "--device") == ["nvidia.com/gpu=all"]


def test_the_runners_runtime_and_pull_override_the_cell_options(tmp_path: Path) -> None:
    definition = with_container(runtime="docker", pull="never")
    argv = launch(tmp_path, definition, options("podman", pull="always")).argv
    assert argv[0] == "/usr/bin/docker" and "--pull=never" in argv


def test_cell_options_come_from_the_settings(tmp_path: Path) -> None:
    config = tmp_path / "jobcell.toml"
    config.write_text('container_runtime = "apptainer"\ncontainer_pull = "never"\n'
                      'container_network = "slirp"\n')
    settings = load_settings(config, env={})
    opts = ContainerOptions.from_settings(settings, backend_gpus=3,
                                          environ={"JOBCELL_FORCE_CONTAINER_GPU": "1"},
                                          probe_local=False)
    assert (opts.runtime, opts.pull, opts.network) == ("apptainer", "never", "slirp")
    assert (opts.backend_gpus, opts.force_gpu, opts.probe_local) == (3, True, False)
    defaults = ContainerOptions.from_settings(load_settings(None, env={}))
    assert (defaults.runtime, defaults.pull, defaults.network, defaults.force_gpu) == \
        ("auto", "missing", "none", False)


def test_a_delegated_backend_uses_an_explicit_runtime_by_name(tmp_path: Path) -> None:
    definition = with_container(runtime="apptainer", image="/i.sif")
    result = build_launch(key="k", step=step(), runner=definition, attempt_dir=tmp_path / "a",
                          upstream={}, gpu_env=False, cell_id="c", backend_path=str,
                          base_env={}, which=lambda _: None,
                          container_options=ContainerOptions(probe_local=False))
    assert result.argv[:2] == ("apptainer", "exec")
    with pytest.raises(ContainerError, match="no container runtime was found"):
        build_launch(key="k", step=step(), runner=runner(), attempt_dir=tmp_path / "b",
                     upstream={}, gpu_env=False, cell_id="c", backend_path=str,
                     base_env={}, which=lambda _: None,
                     container_options=ContainerOptions(probe_local=False))


def test_python_runners_mount_their_input_json(tmp_path: Path) -> None:
    definition, opts, _ = CASES["podman-python-runner"]
    result = launch(tmp_path, definition, opts)
    assert f"{HOSTILE_DIR}/input.json:/jobcell/step/input.json:ro" in \
        items_after(result.argv, "--volume")
    assert result.argv[-5:] == ("/usr/bin/python3", "-m", "jobcell.pyrunner",
                                "lab.analysis:fit", "/jobcell/step")
    assert (tmp_path / "attempt-1" / "input.json").exists()


def test_runners_without_a_container_are_unchanged(tmp_path: Path) -> None:
    plain = RunnerDefinition.model_validate({"name": "p", "command": "/bin/echo",
                                             "args_template": ["{output_dir}"]})
    result = build_launch(key="k", step=step(), runner=plain, attempt_dir=tmp_path / "a",
                          upstream={}, gpu_env=False, cell_id="c", backend_path=str,
                          base_env={})
    assert result.argv == ("/bin/echo", f"{tmp_path / 'a'}/output")


def test_runner_argv_refuses_a_container_runner() -> None:
    with pytest.raises(ValueError, match="runs in a container"):
        runner_argv(runner(), {})


def test_cleanup_lists_an_attempts_containers_by_label() -> None:
    assert cleanup_argv("podman", "/usr/bin/podman", "jobcell-c-j-s-1") == [
        "/usr/bin/podman", "ps", "-aq", "--filter", "label=io.jobcell.attempt=jobcell-c-j-s-1"]
    assert cleanup_argv("apptainer", "/usr/bin/apptainer", "x") is None


# -- runtime resolution ----------------------------------------------------------------------

def test_auto_takes_the_first_runtime_found() -> None:
    assert resolve_runtime("auto", which) == ("podman", "/usr/bin/podman")
    found = {"apptainer": "/opt/bin/apptainer", "singularity": "/usr/bin/singularity"}
    assert resolve_runtime("auto", found.get) == ("apptainer", "/opt/bin/apptainer")
    assert resolve_runtime("docker", which) == ("docker", "/usr/bin/docker")


def test_a_missing_runtime_says_what_was_looked_for() -> None:
    with pytest.raises(ContainerError) as info:
        resolve_runtime("auto", lambda _: None)
    assert "podman, docker, apptainer, singularity" in str(info.value)
    with pytest.raises(ContainerError, match="'singularity' was not found on PATH"):
        resolve_runtime("singularity", lambda _: None)
    with pytest.raises(ContainerError, match="unknown container runtime 'lxc'"):
        resolve_runtime("lxc", which)


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "named", "reason"), [
    (["--privileged"], "--privileged", "never allowed"),
    (["--volume", "/etc:/etc"], "--volume", "only the step directory is mounted"),
    (["-v", "/:/host"], "-v", "only the step directory is mounted"),
    (["-v/:/host"], "-v/:/host", "only the step directory is mounted"),
    (["--volume=/:/host"], "--volume=/:/host", "only the step directory is mounted"),
    (["--mount", "type=bind,src=/etc,dst=/e"], "--mount", "only 'type=tmpfs'"),
    (["--mount=type=volume,source=data,target=/d"], "--mount", "only 'type=tmpfs'"),
    (["--bind", "/etc:/etc"], "--bind", "only the step directory is mounted"),
    (["--network", "host"], "--network", "container_network"),
    (["--network=host"], "--network=host", "container_network"),
    (["--net"], "--net", "container_network"),
    (["-p", "80:80"], "-p", "container_network"),
    (["--user", "0"], "--user", "invoking user"),
    (["-u", "0"], "-u", "invoking user"),
    (["--userns=host"], "--userns=host", "invoking user"),
    (["--fakeroot"], "--fakeroot", "invoking user"),
    (["-e", "A=1"], "-e", "runner's 'env'"),
    (["--env-file", "/etc/secrets"], "--env-file", "runner's 'env'"),
    (["--env-host"], "--env-host", "runner's 'env'"),
    (["--workdir", "/x"], "--workdir", "container.workdir"),
    (["--pull", "always"], "--pull", "container.pull"),
    (["--gpus", "all"], "--gpus", "GPUs"),
    (["--device", "/dev/sda"], "--device", "GPUs"),
    (["--cap-add", "SYS_ADMIN"], "--cap-add", "isolation"),
    (["--security-opt", "seccomp=unconfined"], "--security-opt", "isolation"),
    (["--pid=host"], "--pid=host", "isolation"),
    (["-d"], "-d", "foreground"),
    (["-it"], "-it", "foreground"),
    (["-tv/:/h"], "-tv/:/h", "foreground"),
    (["--log-opt", "path=/etc/passwd"], "--log-opt", "host files"),
    (["--cidfile", "/tmp/x"], "--cidfile", "host files"),
    (["--runtime", "/tmp/evil"], "--runtime", "host files"),
    (["--frobnicate"], "--frobnicate", "not an allowed option"),
    (["-m", "1g"], "-m", "long forms only"),
    (["busybox"], "busybox", "is not an option"),
    (["--memory"], "--memory", "needs a value"),
])
def test_extra_args_that_are_not_allowed_are_named(args: list[str], named: str, reason: str
                                                   ) -> None:
    with pytest.raises(ContainerError) as info:
        check_extra_args(args)
    message = str(info.value)
    assert repr(named) in message and reason in message, message


@pytest.mark.parametrize(("args", "runtime"), [
    (["--memory", "2g", "--cpus=1.5", "--shm-size", "1g", "--read-only"], "podman"),
    (["--tmpfs", "/scratch:size=1g", "--mount", "type=tmpfs,destination=/t"], "docker"),
    (["--label", "--privileged"], "podman"),  # a value, as podman itself reads it
    (["--writable-tmpfs", "--no-init", "--memory", "1G"], "apptainer"),
    (["--writable-tmpfs"], None),             # valid for one family: checked again at run
])
def test_extra_args_that_are_allowed(args: list[str], runtime: str | None) -> None:
    assert check_extra_args(args, runtime) == args


def test_extra_args_are_checked_again_for_the_runtime_that_runs_them(tmp_path: Path) -> None:
    definition = with_container(extra_args=["--writable-tmpfs"])  # apptainer only
    with pytest.raises(ContainerError, match="'--writable-tmpfs' is not an allowed option"):
        launch(tmp_path, definition, options("podman"))


def rejected(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        runner(**fields)
    return str(info.value)


@pytest.mark.parametrize(("container", "problem"), [
    ({}, "image"),
    ({"image": ""}, "must be one word"),
    ({"image": "lab/tool 1"}, "must be one word"),
    ({"image": "--privileged"}, "must not start with '-'"),
    ({"image": "x", "runtime": "lxc"}, "runtime"),
    ({"image": "x", "pull": "sometimes"}, "pull"),
    ({"image": "x", "workdir": "relative"}, "must be an absolute path"),
    ({"image": "x", "workdir": "/a/../b"}, "must be an absolute path"),
    ({"image": "x", "extra_args": ["--privileged"]}, "'--privileged' is not allowed"),
    ({"image": "x", "runtime": "apptainer", "extra_args": ["--read-only"]},
     "'--read-only' is not an allowed option"),
    ({"image": "x", "mounts": ["/etc"]}, "Extra inputs are not permitted"),
    ({"image": "x", "args_template": ["{nope}"]}, "unknown placeholder {nope}"),
    ({"image": "x", "args_template": ["{runner_dir}/x"]}, "{runner_dir} is not available"),
])
def test_invalid_container_blocks_are_rejected(container: dict[str, Any], problem: str
                                               ) -> None:
    assert problem in rejected(container=container)


def test_a_container_runner_needs_a_command_somewhere() -> None:
    message = rejected(command=None, args_template=[])
    assert "needs 'container.command' or 'command'" in message
    accepted = runner(command=None, args_template=[],
                      container={"image": "x", "command": "/bin/tool"})
    assert accepted.command is None


def test_container_runner_rules() -> None:
    assert "{runner_dir} is not available" in rejected(args_template=["{runner_dir}/x"])
    assert "names must match" in rejected(env={"FOO*": "x"})
    assert "'artifact' plane" in rejected(plane="session")
    assert "exactly one of 'command' or 'python'" in rejected(python="m:f")
    python = {"name": "py", "python": "m:f", "container": {"image": "x"}}
    with pytest.raises(ValidationError, match="'python_path' is not used in a container"):
        RunnerDefinition.model_validate({**python, "python_path": ["/src"]})
    with pytest.raises(ValidationError, match="'args_template' is not used"):
        RunnerDefinition.model_validate({**python, "container": {"image": "x",
                                                                 "args_template": ["a"]}})


@pytest.mark.parametrize(("runtime", "path", "problem"), [
    ("podman", "/cell:home/attempt-1", "':'"),
    ("apptainer", "/cell,home/attempt-1", "','"),
    ("docker", "relative/attempt-1", "must be absolute"),
])
def test_step_directories_the_runtime_cannot_mount_are_refused(runtime: str, path: str,
                                                               problem: str) -> None:
    with pytest.raises(ContainerError) as info:
        container_argv(ContainerSpec(image="/i.sif"), runtime, runtime, command=["x"],
                       mounts=[Mount(path + "/input", "/jobcell/step/input")], env={})
    assert problem in str(info.value) and "cannot be mounted" in str(info.value)
    # a comma is fine for podman/docker's --volume
    container_argv(ContainerSpec(image="x"), "podman", "podman", command=["x"],
                   mounts=[Mount("/cell,home/input", "/jobcell/step/input")], env={})


def test_other_command_line_errors() -> None:
    spec = ContainerSpec(image="docker://lab/tool:1")
    with pytest.raises(ContainerError, match="pull policy is 'never'"):
        container_argv(spec, "apptainer", "apptainer", command=["x"], mounts=[], env={},
                       pull="never")
    with pytest.raises(ContainerError, match="must be one word"):
        container_argv(spec, "podman", "podman", command=["x"], mounts=[], env={},
                       network="--privileged")
    with pytest.raises(ContainerError, match="GPU device id"):
        container_argv(spec, "podman", "podman", command=["x"], mounts=[], env={},
                       gpus=GpuRequest(("0 --privileged",), 1))
    with pytest.raises(ContainerError, match="cannot be passed into a container"):
        container_argv(spec, "docker", "docker", command=["x"], mounts=[], env={"A B": "1"})


# -- hashes ------------------------------------------------------------------------------------

def test_pull_and_runtime_are_provisioning_the_rest_of_the_container_is_not() -> None:
    base = runner()
    assert with_container(pull="never", runtime="docker").cache_hash() == base.cache_hash()
    assert with_container(pull="never").definition_hash() != base.definition_hash()
    for change in ({"image": "lab/other:1"}, {"command": "/bin/other"},
                   {"workdir": "/w"}, {"extra_args": ["--read-only"]},
                   {"args_template": ["x"]}):
        assert with_container(**change).cache_hash() != base.cache_hash(), change
    plain = runner(container=None)
    assert plain.cache_hash() != base.cache_hash()


def test_runners_without_a_container_keep_their_hashes() -> None:
    plain = RunnerDefinition.model_validate({"name": "p", "command": "true"})
    payload = plain.model_dump(mode="json",
                               exclude={"source", "description", "container", "profiles"})
    assert plain.definition_hash() == hash_value(payload)
