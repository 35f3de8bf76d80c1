"""Runner definitions: validation, definition_hash and runner_argv."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from jobcell.model.runner import RunnerDefinition, check_relative_path, runner_argv

from .helpers import make_runner

BUILTINS = {"input_dir": "/s/input", "output_dir": "/s/output", "step_dir": "/s",
            "runner_dir": "/r"}


def rejected(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        RunnerDefinition.model_validate(data)
    return str(info.value)


def test_a_full_definition_from_the_issue_is_accepted() -> None:
    runner = RunnerDefinition.model_validate({
        "name": "word_count", "version": "1.0", "plane": "artifact", "command": "python3",
        "args_template": ["{runner_dir}/wc.py", "--input", "{input_dir}", "--output",
                          "{output_dir}", "--min-length", "{min_length}"],
        "params": {"min_length": {"type": "integer", "default": 1, "minimum": 0}},
        "env": {"LC_ALL": "C.UTF-8"},
        "resources": {"memory_mb": 256, "cpu_slots": 1, "timeout_s": 600},
        "concurrency_group": "text", "cacheable": True, "retries": 2,
        "outputs": ["counts.json"],
    })
    assert runner.group == "text"
    assert runner.resources.timeout_s == 600
    assert runner.params["min_length"].default == 1


def test_group_defaults_to_the_runner_name() -> None:
    assert make_runner("solo").group == "solo"


def test_numeric_version_becomes_text() -> None:
    assert make_runner(version=2).version == "2"


@pytest.mark.parametrize(("data", "problem"), [
    ({"name": "x"}, "exactly one of 'command' or 'python'"),
    ({"name": "x", "command": "true", "python": "m:f"}, "exactly one of 'command' or 'python'"),
    ({"name": "x", "python": "not a callable"}, "must look like 'package.module:function'"),
    ({"name": "x", "python": "pkg.mod"}, "must look like 'package.module:function'"),
    ({"name": "x", "python": "pkg.mod:f", "args_template": ["a"]},
     "'args_template' is not used with 'python' runners"),
    ({"name": "x", "command": "true", "shell": True}, "Extra inputs are not permitted"),
    ({"name": "x", "command": "true", "plane": "cloud"}, "plane"),
    ({"name": "x", "command": "true", "retries": -1}, "retries"),
    ({"name": "x", "command": "true", "max_concurrent": 0}, "max_concurrent"),
    ({"name": "x", "command": "true", "resources": {"memory_mb": -1}}, "memory_mb"),
    ({"name": "x", "command": "true", "resources": {"timeout_s": 0}}, "timeout_s"),
    ({"name": "x", "command": "true", "resources": {"gpus": -1}}, "gpus"),
    ({"name": "x", "command": "true", "cache_scope": "world"}, "cache_scope"),
    ({"name": "x", "command": "true", "resources": {"timeout_s": float("inf")}}, "timeout_s"),
    ({"name": "x", "command": "true", "resources": {"timeout_s": float("nan")}}, "timeout_s"),
    ({"name": "x", "command": "true", "resources": {"timeout_s": 1e12}}, "timeout_s"),
    ({"name": "x", "command": "true", "resources": {"memory_mb": 2**63}}, "memory_mb"),
    ({"name": "x", "command": "true", "resources": {"cpu_slots": 10**12}}, "cpu_slots"),
    ({"name": "x", "command": "true", "env": {"A": "x\x00y"}}, "NUL"),
    ({"name": "x", "command": "true", "env": {"A\x00": "x"}}, "NUL"),
    ({"name": "x", "command": "true", "env": {"A=B": "x"}}, "variable 'A=B'"),
    ({"name": "x", "command": "true", "env": {"": "x"}}, "non-empty"),
])
def test_invalid_definitions(data: dict[str, Any], problem: str) -> None:
    assert problem in rejected(data)


def test_bounded_resources_and_plain_env_are_accepted() -> None:
    runner = make_runner(resources={"timeout_s": 366 * 86400, "memory_mb": 2**40,
                                    "cpu_slots": 1_000_000},
                         env={"LC_ALL": "C.UTF-8", "EMPTY": "", "WITH_EQUALS": "a=b"})
    assert runner.resources.timeout_s == 366 * 86400
    assert runner.env["WITH_EQUALS"] == "a=b"


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "a b", "../x", "x\n", "naïve", "a:b"])
def test_invalid_runner_names(name: str) -> None:
    assert "runner name" in rejected({"name": name, "command": "true"})


@pytest.mark.parametrize("name", ["a", "word_count", "v1.2-beta", "A.B_c-9", "..."])
def test_valid_runner_names(name: str) -> None:
    assert make_runner(name).name == name


@pytest.mark.parametrize("param", ["input_dir", "output_dir", "step_dir", "runner_dir"])
def test_builtin_placeholder_names_are_reserved(param: str) -> None:
    message = rejected({"name": "x", "command": "true",
                        "params": {param: {"type": "string", "default": "a"}}})
    assert "reserved for a built-in placeholder" in message


@pytest.mark.parametrize("param", ["1x", "a-b", "a b", ""])
def test_param_names_must_be_identifiers(param: str) -> None:
    assert "must be an identifier" in rejected(
        {"name": "x", "command": "true", "params": {param: {"default": "a"}}})


@pytest.mark.parametrize("output", ["../x", "/abs", "a/../../b", "", "a//b", "a/", "..",
                                    "..\\x"])
def test_declared_outputs_must_stay_inside_the_output_dir(output: str) -> None:
    assert "must be a relative path inside its directory" in rejected(
        {"name": "x", "command": "true", "outputs": [output]})


@pytest.mark.parametrize("output", ["counts.json", "sub/dir/file.txt", "./x"])
def test_valid_declared_outputs(output: str) -> None:
    assert check_relative_path(output, "declared output") == output
    assert make_runner(outputs=[output]).outputs == [output]


# --- definition_hash ---------------------------------------------------------------------


def test_definition_hash_is_stable() -> None:
    first = make_runner("r", args_template=["{x}"], params={"x": {"default": "a"}})
    second = make_runner("r", params={"x": {"default": "a"}}, args_template=["{x}"])
    assert first.definition_hash() == second.definition_hash()
    assert first.definition_hash() == first.definition_hash()
    assert len(first.definition_hash()) == 64


def test_definition_hash_ignores_description_and_source() -> None:
    base = make_runner("r")
    assert make_runner("r", description="docs").definition_hash() == base.definition_hash()
    assert make_runner("r", source="/a/r.yaml").definition_hash() == base.definition_hash()


@pytest.mark.parametrize("change", [
    {"version": "2"},
    {"command": "false"},
    {"command_path": "/usr/bin/true"},
    {"args_template": ["-v"]},
    {"params": {"x": {"default": "a"}}},
    {"env": {"A": "1"}},
    {"resources": {"memory_mb": 512}},
    {"retries": 1},
    {"outputs": ["o.txt"]},
    {"plane": "session"},
    {"cacheable": False},
    {"concurrency_group": "g"},
    {"runner_dir": "/elsewhere"},
])
def test_definition_hash_changes_with_what_the_runner_does(change: dict[str, Any]) -> None:
    assert make_runner("r", **change).definition_hash() != make_runner("r").definition_hash()


# --- runner_argv -------------------------------------------------------------------------


def test_command_runner_argv_prefers_the_resolved_command_path() -> None:
    runner = make_runner("r", command="python3", command_path="/usr/bin/python3",
                         args_template=["{runner_dir}/wc.py", "--out", "{output_dir}",
                                        "--n", "{n}"],
                         params={"n": {"type": "integer", "default": 1}})
    assert runner_argv(runner, {"n": 4, **BUILTINS}) == [
        "/usr/bin/python3", "/r/wc.py", "--out", "/s/output", "--n", "4"]
    unresolved = runner.model_copy(update={"command_path": None})
    assert runner_argv(unresolved, {"n": 4, **BUILTINS})[0] == "python3"


def test_python_runner_argv_runs_the_callable_through_pyrunner() -> None:
    runner = make_runner("py", python="pkg.mod:main", params={"n": {"default": 1,
                                                                     "type": "integer"}})
    assert runner.command is None
    assert runner_argv(runner, {"n": 1, **BUILTINS}) == [
        "python3", "-m", "jobcell.pyrunner", "pkg.mod:main", "/s"]
    resolved = runner.model_copy(update={"command_path": "/venv/bin/python"})
    assert runner_argv(resolved, BUILTINS)[0] == "/venv/bin/python"
