"""Pure helpers of the dashboard: safe redirect targets, the DAG layout, display formats.

Nothing here does I/O; :mod:`jobcell.server.ui` calls the cell and renders templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from jobcell.model.states import JobState, StepState

UI_PREFIX = "/ui"
JOB_STATES = tuple(s.value for s in JobState)
ACTIVE_JOB_STATES = frozenset({JobState.QUEUED.value, JobState.RUNNING.value})
ACTIVE_STEP_STATES = frozenset({StepState.QUEUED.value, StepState.RUNNING.value,
                                StepState.WAITING_CACHE.value})

# DAG drawing (SVG user units).
NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 176, 62, 56, 14, 8
MAX_GRAPH_STEPS = 150


def safe_next(value: str | None, root_path: str = "") -> str:
    """Where to go after logging in: a local dashboard path, else the jobs table.

    Only relative paths under ``/ui`` are accepted (no scheme, no host, no ``//`` or
    backslash tricks), so ``?next=`` cannot send a user to another site.
    """
    home = root_path + UI_PREFIX
    if not value or len(value) > 2000:
        return home
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return home
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith("//"):
        return home
    path = parts.path
    under = path == home or path.startswith(home + "/")
    if not under or path.startswith(home + "/login") or path.startswith(home + "/static"):
        return home
    return value


def query_string(**params: Any) -> str:
    """``?a=1&b=2`` of the parameters that are set (empty when none)."""
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def clean(value: str | None) -> str | None:
    """A filter value from a form: stripped, ``None`` when blank."""
    if value is None:
        return None
    value = value.strip()
    return value or None


# -- display formats ---------------------------------------------------------------------

def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def when(value: str | None) -> str:
    """An ISO time as ``2025-01-31 12:34:56 UTC`` (``—`` when unset)."""
    moment = parse_iso(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def duration(start: str | None, end: str | None) -> str:
    """The time between two ISO times, as ``1 h 02 min``, ``3 min 04 s`` or ``5.2 s``."""
    first, last = parse_iso(start), parse_iso(end)
    if first is None or last is None:
        return ""
    return seconds_text((last - first).total_seconds())


def seconds_text(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size_text(size: int | None) -> str:
    """Bytes as ``512 B``, ``1.5 KiB``, ``3.2 MiB``..."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"   # pragma: no cover - the loop returns at GiB


def memory_text(mb: int | float | None) -> str:
    if mb is None:
        return ""
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{int(mb)} MiB"


def percent(used: float, total: float) -> float:
    """``used`` as a percentage of ``total``, clamped to 0..100."""
    if total <= 0:
        return 0.0
    return round(min(max(used / total * 100.0, 0.0), 100.0), 1)


def event_details(event: dict[str, Any]) -> list[tuple[str, str]]:
    """The event's own data (beyond seq, kind, step, at) as short ``(key, value)`` pairs."""
    details = []
    for key, value in event.items():
        if key in ("seq", "kind", "step", "at") or value is None:
            continue
        text = value if isinstance(value, str) else repr(value)
        details.append((str(key), text if len(text) <= 300 else text[:300] + "…"))
    return details


def short(text: str | None, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the DAG as layered columns ------------------------------------------------------------

@dataclass
class Node:
    step: dict[str, Any]
    depth: int
    row: int = 0
    x: float = 0.0
    y: float = 0.0


@dataclass
class Layout:
    """Steps in columns by dependency depth, positioned for an inline SVG."""

    columns: list[list[Node]] = field(default_factory=list)
    edges: list[tuple[Node, Node, str]] = field(default_factory=list)   # with the SVG path
    width: float = 0.0
    height: float = 0.0
    node_w: int = NODE_W
    node_h: int = NODE_H

    @property
    def nodes(self) -> list[Node]:
        return [node for column in self.columns for node in column]


def depths(steps: list[dict[str, Any]]) -> dict[str, int]:
    """Each step's dependency depth: 0 without inputs, else 1 + the deepest input's."""
    ids = {s["id"] for s in steps}
    depth = {s["id"]: 0 for s in steps}
    for _ in range(len(steps) + 1):   # steps come in topological order: one pass settles
        changed = False
        for s in steps:
            inputs = [i for i in s.get("inputs") or () if i in ids and i != s["id"]]
            wanted = 1 + max(depth[i] for i in inputs) if inputs else 0
            if wanted != depth[s["id"]] and wanted <= len(steps):
                depth[s["id"]], changed = wanted, True
        if not changed:
            break
    return depth


def dag_layout(steps: list[dict[str, Any]]) -> Layout:
    """Place steps in columns by depth (index order within a column), each column
    centred vertically, with an edge from every input to the step that consumes it.

    An edge that skips columns runs along a free horizontal lane (the source's or the
    target's height, else below every node) so that it never crosses a node.
    """
    depth = depths(steps)
    layout = Layout()
    if not steps:
        return layout
    columns: list[list[Node]] = [[] for _ in range(max(depth.values()) + 1)]
    by_id: dict[str, Node] = {}
    for s in steps:
        column = columns[depth[s["id"]]]
        node = Node(s, depth[s["id"]], row=len(column))
        column.append(node)
        by_id[s["id"]] = node
    index_of = {d: i for i, d in enumerate(d for d, c in enumerate(columns) if c)}
    layout.columns = [c for c in columns if c]
    tallest = max(len(c) for c in layout.columns)
    layout.width = 2 * PAD + len(layout.columns) * NODE_W + (len(layout.columns) - 1) * GAP_X
    layout.height = 2 * PAD + tallest * NODE_H + (tallest - 1) * GAP_Y
    for index, column in enumerate(layout.columns):
        offset = (tallest - len(column)) * (NODE_H + GAP_Y) / 2
        for node in column:
            node.x = PAD + index * (NODE_W + GAP_X)
            node.y = PAD + offset + node.row * (NODE_H + GAP_Y)
    bottom_lane = layout.height - PAD + GAP_Y / 2
    for s in steps:
        for name in s.get("inputs") or ():
            if name not in by_id or name == s["id"]:
                continue
            source, target = by_id[name], by_id[s["id"]]
            between = layout.columns[index_of[source.depth] + 1:index_of[target.depth]]
            path, lane = edge_path(source, target, between, bottom_lane)
            if lane == bottom_lane:
                layout.height = max(layout.height, bottom_lane + PAD)
            layout.edges.append((source, target, path))
    return layout


def _free(lane: float, columns: list[list[Node]]) -> bool:
    return all(not node.y - 6 <= lane <= node.y + NODE_H + 6
               for column in columns for node in column)


def edge_path(source: Node, target: Node, between: list[list[Node]] | None = None,
              bottom_lane: float = 0.0) -> tuple[str, float]:
    """An SVG path from the right side of ``source`` to the left side of ``target`` and
    the height it runs at between them; ``between``: the columns it passes."""
    x1, y1 = source.x + NODE_W, source.y + NODE_H / 2
    x2, y2 = target.x - 4, target.y + NODE_H / 2
    if not between:
        bend = max((x2 - x1) / 2, 12)
        return (f"M{x1:g} {y1:g} C{x1 + bend:g} {y1:g} {x2 - bend:g} {y2:g} {x2:g} {y2:g}",
                y1)
    lane = next((y for y in (y1, y2) if _free(y, between)), bottom_lane)
    gap = GAP_X - 4
    half = gap / 2
    return (f"M{x1:g} {y1:g} C{x1 + half:g} {y1:g} {x1 + half:g} {lane:g} {x1 + gap:g} "
            f"{lane:g} L{x2 - gap:g} {lane:g} C{x2 - half:g} {lane:g} {x2 - half:g} {y2:g} "
            f"{x2:g} {y2:g}", lane)


# -- pagination ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    number: int
    size: int
    has_next: bool

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def has_previous(self) -> bool:
        return self.number > 1
