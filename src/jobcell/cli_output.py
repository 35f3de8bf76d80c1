"""How the CLI shows things: JSON, tables and progress bars. No logic of its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)

_STATE_STYLE = {"succeeded": "green", "cached": "green", "failed": "red", "cancelled": "yellow",
                "running": "cyan", "queued": "white", "pending": "dim"}


def styled_state(state: str) -> str:
    style = _STATE_STYLE.get(state, "white")
    return f"[{style}]{state}[/{style}]"


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A simple table of rows."""
    grid = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*["" if cell is None else str(cell) for cell in row])
    console.print(grid)


def show_status(status: dict[str, Any]) -> None:
    """A job's status for people."""
    line = (f"job [bold]{status['job_id']}[/bold]  {styled_state(status['state'])}  "
            f"label={status['label']}  owner={status['owner']}")
    if status.get("tags"):
        line += "  tags=" + ",".join(status["tags"])
    console.print(line)
    if status.get("error"):
        console.print(f"[red]error:[/red] {status['error']}")
    rows = [[s["id"], s["runner"], styled_state(s["state"]), s["attempt"], s["exit_code"],
             ",".join(s["inputs"]), s["error"] or ""] for s in status["steps"]]
    table(None, ["step", "runner", "state", "attempt", "exit", "inputs", "error"], rows)


def show_jobs(jobs: list[dict[str, Any]]) -> None:
    """A list of jobs for people."""
    if not jobs:
        console.print("no jobs")
        return
    rows = [[j["job_id"], styled_state(j["state"]), j["label"], j["owner"], ",".join(j["tags"]),
             j["created_at"]] for j in jobs]
    table(None, ["job", "state", "label", "owner", "tags", "created"], rows)


def show_logs(logs: dict[str, Any]) -> None:
    for entry in logs["steps"]:
        console.print(f"[bold]== step {entry['step']} (attempt {entry['attempt']}) ==[/bold]")
        for name in ("stdout", "stderr"):
            if entry[name]:
                console.print(f"[dim]-- {name} --[/dim]")
                for text in entry[name]:
                    console.out(text, highlight=False)


def show_outputs(outputs: list[dict[str, Any]]) -> None:
    if not outputs:
        console.print("no outputs")
        return
    rows = [[o["step"], o["name"], o["size"], o["blake3"][:16], o["path"]] for o in outputs]
    table(None, ["step", "name", "bytes", "blake3", "path"], rows)


def show_mapping(title: str, mapping: dict[str, Any]) -> None:
    rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value]
            for key, value in mapping.items()]
    table(title, ["key", "value"], rows)


def _describe(status: dict[str, Any]) -> str:
    running = [s["id"] for s in status["steps"] if s["state"] == "running"]
    text = f"{status['job_id']} {status['state']}"
    return text + (f" (running: {', '.join(running[:3])})" if running else "")


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A live progress bar of a job's steps; a no-op callback when not on a terminal."""
    if not enabled:
        yield lambda _status: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=error_console, transient=False) as progress:
        task = progress.add_task("waiting", total=None)

        def update(status: dict[str, Any]) -> None:
            done = sum(1 for s in status["steps"]
                       if s["state"] in ("succeeded", "cached", "failed", "cancelled"))
            progress.update(task, total=status["progress"]["total"], completed=done,
                            description=_describe(status))

        yield update
