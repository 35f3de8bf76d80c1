"""The session plane: short runners run inline in the call, through the same wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pyrunners_demo
import pytest
from integration_support import pid_gone, register_tool, wait_for

from jobcell.errors import NotFoundError, SpecError
from jobcell.service import Cell

HOSTILE = "it's \"$(rm -rf ~)\"; `id` *\nline two"


def test_session_runner_returns_its_value_inline_without_a_job(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "echo", ["write", "{output_dir}", "output.json", "{text}"],
                  plane="session", params={"text": {"type": "string"}})
    answer = cell.run_session("echo", {"text": json.dumps({"said": HOSTILE})})
    assert answer["succeeded"] is True
    assert answer["exit_code"] == 0
    assert answer["value"] == {"said": HOSTILE}            # one argv item, no shell
    assert answer["runner_hash"] == cell.runner("echo").definition_hash()
    assert cell.store.count_jobs() == 0                    # nothing was queued
    assert list(cell.home.staging.iterdir()) == []         # its attempt dir is gone


def test_python_session_runner_and_its_exception(cell: Cell) -> None:
    cell.register_runner(pyrunners_demo.add, plane="session",
                         params={"a": {"type": "integer"}, "b": {"type": "integer"}})
    assert cell.run_session("add", {"a": 2, "b": 3})["value"] == {"sum": 5, "attempt": 1}
    cell.register_runner(pyrunners_demo.boom, plane="session",
                         params={"message": {"type": "string"}})
    failed = cell.run_session("boom", {"message": "no such slice"})
    assert failed["succeeded"] is False
    assert "no such slice" in failed["error"]
    assert failed["value"] is None


def test_failing_session_runner_reports_exit_code_and_stderr(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "bad", ["exit", "5"], plane="session")
    answer = cell.run_session("bad")
    assert answer["succeeded"] is False
    assert answer["exit_code"] == 5
    assert "exit code 5" in answer["error"]
    assert answer["stderr"] == ["exiting with 5"]


def test_session_runner_past_its_timeout_is_stopped_with_its_children(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids.json"
    register_tool(cell, tools, "hang", ["grandchild", str(pids)], plane="session")
    answer = cell.run_session("hang", timeout_s=1.0)
    assert answer["succeeded"] is False
    assert "timed out after 1 s" in answer["error"]
    recorded = json.loads(pids.read_text())
    wait_for(lambda: pid_gone(recorded["runner"]) and pid_gone(recorded["grandchild"]), 5,
             "the session runner and its TERM-ignoring grandchild to be gone")


def test_session_plane_refuses_bad_calls(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "queued_only", ["exit", "0"])
    register_tool(cell, tools, "needs", ["exit", "0"], plane="session",
                  params={"n": {"type": "integer"}})
    with pytest.raises(SpecError, match="artifact-plane runner"):
        cell.run_session("queued_only")
    with pytest.raises(SpecError, match="missing required param 'n'"):
        cell.run_session("needs")
    with pytest.raises(SpecError, match="expected integer"):
        cell.run_session("needs", {"n": "three"})
    with pytest.raises(NotFoundError, match="no runner named 'ghost'"):
        cell.run_session("ghost")
