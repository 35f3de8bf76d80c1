"""Helpers for the step-cache integration tests: runner programs that count their runs."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path
from typing import Any

from integration_support import register_tool

from jobcell.service import Cell

CACHE_TOOLS = r'''
"""Step-cache runner programs: python3 cache_tools.py MODE ARGS...

Every mode first appends "JOB STEP attempt=N" to its RUNS file, so a test can
count how often the program really ran.
"""
import hashlib, os, pathlib, sys, time

def note_run(runs):
    line = (f"{os.environ['JOBCELL_JOB_ID']} {os.environ['JOBCELL_STEP_ID']} "
            f"attempt={os.environ.get('JOBCELL_ATTEMPT', '0')}")
    with open(runs, "a") as handle:
        handle.write(line + "\n")

def wait_for_gate(gate):
    while not os.path.exists(gate):
        time.sleep(0.01)

def main(mode, runs, *args):
    note_run(runs)
    if mode == "gen":              # OUT NAME TEXT SHAPE: OUT/NAME holds TEXT
        out, name, text, shape = pathlib.Path(args[0]), args[1], args[2], args[3]
        (out / name).write_text(text)
        if shape == "empty-dir":
            (out / "empty").mkdir()
    elif mode == "gated":          # GATE OUT TEXT FAIL_FIRST: wait for GATE, then write
        gate, out, text, fail_first = args[0], pathlib.Path(args[1]), args[2], args[3]
        wait_for_gate(gate)
        first = len(pathlib.Path(runs).read_text().splitlines()) == 1
        if fail_first == "yes" and first:
            print("the first run fails on purpose", file=sys.stderr)
            sys.exit(3)
        (out / "result.txt").write_text(text)
    elif mode == "use":            # IN OUT: one line per staged entry, files by sha256
        inp, out = pathlib.Path(args[0]), pathlib.Path(args[1])
        lines = []
        for path in sorted(inp.rglob("*")):
            rel = path.relative_to(inp).as_posix()
            if path.is_dir():
                lines.append(f"{rel}/")
            else:
                lines.append(f"{rel} {hashlib.sha256(path.read_bytes()).hexdigest()}")
        (out / "used.txt").write_text("\n".join(lines) + "\n")
    elif mode == "big":            # OUT MEGABYTES: a file of that many MiB
        block = bytes(range(256)) * 4096
        with open(pathlib.Path(args[0]) / "big.bin", "wb") as handle:
            for _ in range(int(args[1])):
                handle.write(block)
    else:
        sys.exit(f"unknown mode {mode}")

if __name__ == "__main__":
    main(*sys.argv[1:])
'''

TEXT_PARAM = {"type": "string", "default": "hello"}


def write_cache_tools(directory: Path) -> Path:
    """Write the runner program ``cache_tools.py`` into ``directory``; return its path."""
    path = directory / "cache_tools.py"
    path.write_text(textwrap.dedent(CACHE_TOOLS))
    return path


def runs(path: Path) -> list[str]:
    """The runs recorded in a RUNS file: one ``"JOB STEP attempt=N"`` line per real run."""
    return path.read_text().splitlines() if path.exists() else []


def register_gen(cell: Cell, tools: Path, counter: Path, name: str = "gen",
                 extra_args: tuple[str, ...] = (), **fields: Any) -> None:
    """A runner writing ``OUT/<name param>`` with the ``text`` param (and, with
    ``shape: empty-dir``, an empty directory ``OUT/empty``); ``extra_args`` are
    passed on and ignored by the program."""
    params = {"name": {"type": "string", "default": "data.txt"}, "text": TEXT_PARAM,
              "shape": {"type": "string", "default": "plain"}}
    register_tool(cell, tools, name, ["gen", str(counter), "{output_dir}", "{name}", "{text}",
                                      "{shape}", *extra_args], params=params, **fields)


def register_use(cell: Cell, tools: Path, counter: Path, name: str = "use",
                 **fields: Any) -> None:
    """A runner listing what was staged for it in ``OUT/used.txt``."""
    register_tool(cell, tools, name, ["use", str(counter), "{input_dir}", "{output_dir}"],
                  **fields)


def register_gated(cell: Cell, tools: Path, counter: Path, gate: Path, name: str = "gated",
                   fail_first: bool = False, **fields: Any) -> None:
    """A runner that waits until ``gate`` exists, then writes ``result.txt`` (or, with
    ``fail_first``, fails when it is the first run recorded in ``counter``)."""
    register_tool(cell, tools, name, ["gated", str(counter), str(gate), "{output_dir}",
                                      "{text}", "yes" if fail_first else "no"],
                  params={"text": TEXT_PARAM}, **fields)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def step_state(cell: Cell, job_id: str, step_id: str) -> str:
    """The current state of one step."""
    return next(s["state"] for s in cell.status(job_id)["steps"] if s["id"] == step_id)


def event_kinds(cell: Cell, job_id: str, step_id: str) -> list[str]:
    """The kinds of one step's events, oldest first."""
    return [e["kind"] for e in cell.events(job_id) if e["step"] == step_id]
