"""Runner parameter schemas: types, bounds, enums, strings, defaults, JSON Schema."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from jobcell.model.params import ParamSpec, params_json_schema, validate_params


def spec(**fields: Any) -> ParamSpec:
    return ParamSpec.model_validate(fields)


def problem(schema: dict[str, ParamSpec], values: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        validate_params(schema, values, "step 'x'")
    return str(info.value)


@pytest.mark.parametrize(("type_", "good", "bad"), [
    ("string", ["", "a", "1"], [1, 1.5, True, ["a"], {"a": 1}, b"a"]),
    ("integer", [0, -5, 10**20], [1.0, 1.5, "1", True, False, [1]]),
    ("number", [0, 1.5, -2, 10**20], ["1", True, False, float("nan"), float("inf")]),
    ("boolean", [True, False], [0, 1, 1.0, "true"]),
    ("array", [[], [1, "a"]], [(), "a", {"a": 1}]),
    ("object", [{}, {"a": [1]}], [[], "a", 1]),
])
def test_types(type_: str, good: list[Any], bad: list[Any]) -> None:
    schema = {"p": spec(type=type_)}
    for value in good:
        assert validate_params(schema, {"p": value}, "w") == {"p": value}
    for value in bad:
        assert f"expected {type_}" in problem(schema, {"p": value}), value


def test_bool_is_not_an_integer_even_though_python_says_so() -> None:
    assert isinstance(True, int)
    message = problem({"n": spec(type="integer")}, {"n": True})
    assert message == "step 'x': param 'n' expected integer, got bool True"


def test_minimum_and_maximum_are_inclusive() -> None:
    schema = {"n": spec(type="integer", minimum=1, maximum=10)}
    assert validate_params(schema, {"n": 1}, "w") == {"n": 1}
    assert validate_params(schema, {"n": 10}, "w") == {"n": 10}
    assert "must be >= 1" in problem(schema, {"n": 0})
    assert "must be <= 10" in problem(schema, {"n": 11})
    real = {"x": spec(type="number", minimum=0.5)}
    assert "must be >= 0.5" in problem(real, {"x": 0.25})


def test_enum() -> None:
    schema = {"m": spec(type="string", enum=["a", "b"])}
    assert validate_params(schema, {"m": "b"}, "w") == {"m": "b"}
    assert "must be one of ['a', 'b'], got 'c'" in problem(schema, {"m": "c"})


def test_string_pattern_must_match_the_whole_value() -> None:
    schema = {"s": spec(type="string", pattern=r"[a-z]+")}
    assert validate_params(schema, {"s": "abc"}, "w") == {"s": "abc"}
    assert "must match the pattern" in problem(schema, {"s": "abc1"})
    assert "must match the pattern" in problem(schema, {"s": "1abc"})


def test_string_length_with_json_schema_spelling() -> None:
    schema = {"s": spec(type="string", minLength=2, maxLength=3)}
    assert validate_params(schema, {"s": "ab"}, "w") == {"s": "ab"}
    assert "at least 2 characters" in problem(schema, {"s": "a"})
    assert "at most 3 characters" in problem(schema, {"s": "abcd"})
    assert spec(type="string", min_length=2).min_length == 2


def test_invalid_regex_pattern_is_rejected_when_the_param_is_declared() -> None:
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        spec(type="string", pattern="(unclosed")


def test_defaults_are_filled_and_explicit_none_means_omitted() -> None:
    schema = {"a": spec(type="integer", default=3), "b": spec(type="string", default="x"),
              "c": spec(type="string", required=False)}
    assert validate_params(schema, {}, "w") == {"a": 3, "b": "x"}
    assert validate_params(schema, {"a": None}, "w") == {"a": 3, "b": "x"}
    assert validate_params(schema, {"c": "given"}, "w") == {"a": 3, "b": "x", "c": "given"}


def test_required_rules() -> None:
    assert spec(type="string").is_required
    assert not spec(type="string", default="x").is_required
    assert spec(type="string", default="x", required=True).is_required
    assert not spec(type="string", required=False).is_required
    schema = {"name": spec(type="string")}
    assert problem(schema, {}) == "step 'x': missing required param 'name'"
    assert "missing required param" in problem(schema, {"name": None})


def test_unknown_param_lists_the_declared_ones() -> None:
    schema = {"b": spec(default=1, type="integer"), "a": spec(default=1, type="integer")}
    assert problem(schema, {"zzz": 1}) == (
        "step 'x': unknown param 'zzz' (declared params: a, b)")
    assert "(declared params: none)" in problem({}, {"zzz": 1})


@pytest.mark.parametrize("fields", [
    {"type": "integer", "default": "3"},
    {"type": "integer", "default": True},
    {"type": "integer", "default": 0, "minimum": 1},
    {"type": "string", "default": "c", "enum": ["a", "b"]},
    {"type": "float"},
    {"type": "string", "format": "uri"},
])
def test_bad_declarations_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        spec(**fields)


def test_params_json_schema_shape() -> None:
    schema = {
        "count": spec(type="integer", default=1, minimum=0, description="how many"),
        "name": spec(type="string", minLength=1, pattern="[a-z]+"),
        "mode": spec(type="string", enum=["x", "y"], required=False),
    }
    assert params_json_schema(schema) == {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "default": 1, "minimum": 0, "description": "how many"},
            "name": {"type": "string", "minLength": 1, "pattern": "[a-z]+"},
            "mode": {"type": "string", "enum": ["x", "y"]},
        },
        "required": ["name"],
        "additionalProperties": False,
    }
    assert params_json_schema({}) == {"type": "object", "properties": {}, "required": [],
                                      "additionalProperties": False}


def test_nul_in_string_param_is_refused_at_validation() -> None:
    from jobcell.model.params import ParamSpec, validate_params

    with pytest.raises(ValueError, match="NUL"):
        validate_params({"name": ParamSpec(type="string")}, {"name": "a\x00b"}, "step 'x'")
