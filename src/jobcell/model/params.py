"""Runner parameter schemas (a small, JSON-Schema-like subset) and their validation."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ParamType = Literal["string", "integer", "number", "boolean", "array", "object"]

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


class ParamSpec(BaseModel):
    """One declared runner parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: ParamType = "string"
    default: Any = None
    required: bool | None = None
    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    enum: list[Any] | None = None
    min_length: int | None = Field(default=None, alias="minLength")
    max_length: int | None = Field(default=None, alias="maxLength")
    pattern: str | None = None

    @model_validator(mode="after")
    def _default_fits(self) -> ParamSpec:
        if self.pattern is not None:
            # A bad regex must fail here, not as a bare re.error when a step is validated.
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular "
                                 f"expression: {exc}") from None
        if self.default is not None:
            problem = type_problem(self, self.default)
            if problem:
                raise ValueError(f"default {self.default!r}: {problem}")
        return self

    @property
    def is_required(self) -> bool:
        """A param is required when it says so, or when it has no default."""
        if self.required is not None:
            return self.required
        return self.default is None


def _type_ok(expected: str, value: Any) -> bool:
    if expected in ("integer", "number") and isinstance(value, bool):
        return False
    if expected == "number" and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, _PY_TYPES[expected])


def type_problem(spec: ParamSpec, value: Any) -> str | None:
    """Why ``value`` does not satisfy ``spec``, or None when it does."""
    if not _type_ok(spec.type, value):
        return f"expected {spec.type}, got {type(value).__name__} {value!r}"
    if spec.enum is not None and value not in spec.enum:
        return f"must be one of {spec.enum}, got {value!r}"
    if spec.type in ("integer", "number"):
        if spec.minimum is not None and value < spec.minimum:
            return f"must be >= {spec.minimum:g}, got {value}"
        if spec.maximum is not None and value > spec.maximum:
            return f"must be <= {spec.maximum:g}, got {value}"
    if spec.type == "string":
        if "\x00" in value:
            return "must not contain a NUL character (it cannot be passed as an argument)"
        return _string_problem(spec, value)
    return None


def _string_problem(spec: ParamSpec, value: str) -> str | None:
    if spec.min_length is not None and len(value) < spec.min_length:
        return f"must be at least {spec.min_length} characters"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"must be at most {spec.max_length} characters"
    if spec.pattern is not None and re.fullmatch(spec.pattern, value) is None:
        return f"must match the pattern {spec.pattern!r}"
    return None


def validate_params(
    schema: dict[str, ParamSpec], values: dict[str, Any], where: str
) -> dict[str, Any]:
    """Check ``values`` against ``schema``; return them with defaults filled in.

    ``where`` names the place for error messages (e.g. ``step 'count'``).
    Raises ``ValueError`` with one clear sentence on the first problem.
    """
    unknown = sorted(set(values) - set(schema))
    if unknown:
        declared = ", ".join(sorted(schema)) or "none"
        raise ValueError(f"{where}: unknown param {unknown[0]!r} (declared params: {declared})")
    resolved: dict[str, Any] = {}
    for name, spec in schema.items():
        if name in values and values[name] is not None:
            problem = type_problem(spec, values[name])
            if problem:
                raise ValueError(f"{where}: param {name!r} {problem}")
            resolved[name] = values[name]
        elif spec.default is not None:
            resolved[name] = spec.default
        elif spec.is_required:
            raise ValueError(f"{where}: missing required param {name!r}")
    return resolved


def params_json_schema(schema: dict[str, ParamSpec]) -> dict[str, Any]:
    """The params as a JSON Schema object (for OpenAPI and OGC process descriptions)."""
    properties = {
        name: spec.model_dump(by_alias=True, exclude_none=True, exclude={"required"})
        for name, spec in schema.items()
    }
    required = sorted(name for name, spec in schema.items() if spec.is_required)
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}
