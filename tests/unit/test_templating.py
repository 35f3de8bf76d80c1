"""Argument templates: each template item is exactly one argv item, never a shell word."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobcell.model.params import validate_params
from jobcell.model.runner import runner_argv
from jobcell.model.templating import (
    TemplateError,
    format_value,
    placeholders,
    render_args,
    render_item,
)

from .helpers import make_runner

HOSTILE_VALUES = [
    "it's",
    'say "hi"',
    "two words",
    "  padded  ",
    "line one\nline two",
    "carriage\rreturn",
    "tab\tseparated",
    "a; rm -rf /",
    "$(touch /tmp/jobcell-pwned)",
    "`touch /tmp/jobcell-pwned`",
    "${HOME}",
    "$HOME",
    "*",
    "/etc/*",
    "-rf",
    "--help",
    "",
    "a && b || c | d > e < f",
    "back\\slash",
    "{other}",
    "{{",
    "}",
    "ünïcødé ☃ 日本語 🚀",
    "'\"`$;|&<>(){}[]*?!#~",
]


def echo_runner() -> Any:
    """A runner that prints its own argv (after the script) as JSON."""
    return make_runner(
        "echo_args", command=sys.executable,
        args_template=["-c", "import json,sys; print(json.dumps(sys.argv[1:]))", "{value}"],
        params={"value": {"type": "string"}},
    )


def builtins(tmp: str = "/work/step") -> dict[str, str]:
    return {"input_dir": f"{tmp}/input", "output_dir": f"{tmp}/output", "step_dir": tmp,
            "runner_dir": "/runners"}


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_value_stays_exactly_one_argv_item(value: str) -> None:
    template = ["--name", "{name}", "prefix-{name}-suffix"]
    rendered = render_args(template, {"name": value})
    assert rendered == ["--name", value, f"prefix-{value}-suffix"]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_value_reaches_a_real_process_unchanged(value: str) -> None:
    runner = echo_runner()
    params = validate_params(runner.params, {"value": value}, "test")
    argv = runner_argv(runner, {**params, **builtins()})
    assert argv[0] == sys.executable
    assert len(argv) == 4
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(done.stdout) == [value]


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40))
def test_any_text_renders_to_itself(value: str) -> None:
    assert render_args(["{v}", "x{v}y"], {"v": value}) == [value, f"x{value}y"]


def test_values_are_not_expanded_again() -> None:
    # A value that looks like a placeholder is inserted literally, not substituted.
    assert render_item("{a}", {"a": "{b}", "b": "secret"}) == "{b}"


def test_double_braces_are_literal_braces() -> None:
    assert render_item("{{name}}", {"name": "x"}) == "{name}"
    assert render_item("{{{name}}}", {"name": "x"}) == "{x}"
    assert render_item("json={{\"k\": {name}}}", {"name": 1}) == 'json={"k": 1}'
    assert placeholders("{{name}}") == set()
    assert placeholders("{{{name}}}") == {"name"}


def test_several_placeholders_in_one_item() -> None:
    assert render_item("{a}/{b}.{a}", {"a": "x", "b": "y z"}) == "x/y z.x"
    assert placeholders("{a}/{b}.{a}") == {"a", "b"}


@pytest.mark.parametrize("item", ["{", "}", "{name", "name}", "{ name }", "{1abc}", "{a-b}",
                                  "{}", "{{x}", "a}b"])
def test_unbalanced_or_malformed_braces_are_errors(item: str) -> None:
    with pytest.raises(TemplateError, match="unbalanced brace"):
        placeholders(item)
    with pytest.raises(TemplateError):
        render_item(item, {"name": "x", "x": "x", "a": "x", "b": "x"})


def test_unknown_placeholder_at_render_time() -> None:
    with pytest.raises(TemplateError, match=r"unknown placeholder \{missing\}"):
        render_item("{missing}", {})


@pytest.mark.parametrize(("value", "text"), [
    (True, "true"), (False, "false"), (0, "0"), (-3, "-3"), (2.5, "2.5"), (None, ""),
    ([1, "a"], '[1,"a"]'), ({"b": 1, "a": [True]}, '{"a":[true],"b":1}'), ("s", "s"),
])
def test_format_value(value: Any, text: str) -> None:
    assert format_value(value) == text


def test_structured_values_stay_one_item() -> None:
    assert render_args(["{v}"], {"v": {"a b": "c d"}}) == ['{"a b":"c d"}']


# --- validated when a runner is defined --------------------------------------------------


@pytest.mark.parametrize(("item", "problem"), [
    ("{nope}", "unknown placeholder {nope}"),
    ("--x={input_dir}/{nope}", "unknown placeholder {nope}"),
    ("{", "unbalanced brace"),
    ("{value", "unbalanced brace"),
    ("value}", "unbalanced brace"),
])
def test_bad_templates_are_rejected_when_the_runner_is_defined(item: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem.replace("{", r"\{")):
        make_runner("bad", args_template=[item], params={"value": {"type": "string"}})


def test_builtin_and_declared_placeholders_are_accepted() -> None:
    runner = make_runner("ok", args_template=[
        "{input_dir}", "{output_dir}", "{step_dir}", "{runner_dir}/x.py", "{value}", "{{lit}}"],
        params={"value": {"type": "integer", "default": 3}})
    argv = runner_argv(runner, {"value": 3, **builtins("/s")})
    assert argv == ["true", "/s/input", "/s/output", "/s", "/runners/x.py", "3", "{lit}"]
