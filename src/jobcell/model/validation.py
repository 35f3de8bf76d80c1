"""Turn pydantic validation errors into one clear sentence."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One sentence naming the field and the problem of the first error (and a count)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    lead = f"{prefix}: " if prefix else ""
    return f"{lead}field '{location}': {message}{more}"
