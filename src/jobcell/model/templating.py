"""Argument templates: each template item becomes exactly one argv item.

Nothing here ever goes through a shell. ``{name}`` is replaced by the value of
``name``; ``{{`` and ``}}`` stand for literal braces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{|\}")
BUILTIN_PLACEHOLDERS = frozenset({"input_dir", "output_dir", "step_dir", "runner_dir"})


class TemplateError(ValueError):
    """A template item is malformed or names an unknown placeholder."""


def placeholders(item: str) -> set[str]:
    """The placeholder names used in one template item."""
    names: set[str] = set()
    for match in PLACEHOLDER.finditer(item):
        token = match.group(0)
        if token in ("{", "}"):
            raise TemplateError(f"unbalanced brace in template item {item!r}")
        if match.group(1):
            names.add(match.group(1))
    return names


def format_value(value: Any) -> str:
    """How a param value is written into one argv item."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if value is None:
        return ""
    return str(value)


def render_item(item: str, values: Mapping[str, Any]) -> str:
    """Substitute placeholders in one template item."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = match.group(1)
        if name is None:
            raise TemplateError(f"unbalanced brace in template item {item!r}")
        if name not in values:
            raise TemplateError(f"unknown placeholder {{{name}}} in template item {item!r}")
        return format_value(values[name])

    return PLACEHOLDER.sub(substitute, item)


def render_args(template: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """Render every template item; the result has exactly ``len(template)`` items."""
    return [render_item(item, values) for item in template]
