"""Uploaded input files: stored once by content, staged read-only into steps, keyed by
content, and usable only by the owner who uploaded them."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from integration_support import attempt_dir, register_tool, run_worker, step_of

from jobcell.errors import SpecError
from jobcell.service import Cell


def join_job(files: dict[str, str], label: str = "imaging") -> dict:
    return {"label": label, "steps": [{"runner": "join", "files": files}]}


@pytest.fixture
def cell(cell: Cell, tools: Path) -> Cell:
    register_tool(cell, tools, "join", ["join", "{input_dir}", "{output_dir}"])
    return cell


def listing(cell: Cell, job_id: str) -> dict:
    out = attempt_dir(cell, job_id, "0-join") / "output" / "listing.json"
    return json.loads(out.read_text())


def test_an_upload_is_staged_into_the_step_that_names_it(cell: Cell) -> None:
    up = cell.upload(iter([b"pixels ", b"and more"]), owner="alice")
    assert up["size"] == 15 and len(up["digest"]) == 64
    stored = cell.home.upload_path(up["digest"])
    assert stored.read_bytes() == b"pixels and more"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    job = cell.submit(join_job({"data/in.bin": up["digest"]}), owner="alice").job_id
    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert step_of(status, "0-join")["files"] == {"data/in.bin": up["digest"]}
    seen = listing(cell, job)
    assert seen["files"] == ["data/in.bin"]
    assert seen["manifest"]["files"]["data/in.bin"].endswith("/input/data/in.bin")
    staged = attempt_dir(cell, job, "0-join") / "input" / "data" / "in.bin"
    assert staged.read_bytes() == b"pixels and more"


def test_the_same_bytes_are_one_upload_and_one_step_key(cell: Cell) -> None:
    first = cell.upload(iter([b"same"]), owner="alice")
    second = cell.upload(iter([b"sa", b"me"]), owner="alice")
    assert first == second
    assert len(list(cell.home.uploads.glob("*/*"))) == 1
    other = cell.upload(iter([b"different"]), owner="alice")
    a = cell.submit(join_job({"in.bin": first["digest"]}), owner="alice").job_id
    run_worker(cell)
    b = cell.submit(join_job({"in.bin": other["digest"]}, label="imaging"),
                    owner="alice").job_id
    run_worker(cell)
    keys = {j: cell.store.get_job(j).steps[0].step_key for j in (a, b)}
    assert keys[a] and keys[b] and keys[a] != keys[b]
    # Another job giving the same bytes under the same name is a step-cache hit.
    c = cell.submit({"label": "imaging", "pipeline": [
        {"id": "again", "runner": "join", "files": {"in.bin": first["digest"]}}]},
        owner="alice").job_id
    run_worker(cell)
    assert step_of(cell.status(c), "again")["state"] == "cached"


def test_a_job_may_name_only_its_owners_uploads(cell: Cell) -> None:
    up = cell.upload(iter([b"secret"]), owner="alice")
    with pytest.raises(SpecError, match="not an upload of yours"):
        cell.submit(join_job({"in.bin": up["digest"]}), owner="mallory")
    with pytest.raises(SpecError, match="not an upload of yours"):
        cell.submit(join_job({"in.bin": "0" * 64}), owner="alice")
    with pytest.raises(SpecError, match="BLAKE3 hex digest"):
        cell.submit(join_job({"in.bin": "not-a-digest"}), owner="alice")
    with pytest.raises(SpecError, match="relative path"):
        cell.submit(join_job({"../escape": up["digest"]}), owner="alice")
    assert cell.list() == []


def test_a_file_cannot_sit_where_an_input_node_is_staged(cell: Cell, tools: Path) -> None:
    up = cell.upload(iter([b"x"]), owner="alice")
    spec = {"label": "imaging", "pipeline": [
        {"id": "a", "runner": "join"},
        {"id": "b", "runner": "join", "inputs": ["a"], "files": {"a/x.bin": up["digest"]}}]}
    with pytest.raises(SpecError, match="where the outputs of input 'a' go"):
        cell.submit(spec, owner="alice")


def test_an_upload_over_the_limit_keeps_nothing(make_cell, tools: Path) -> None:
    cell = make_cell("small", upload_max_mb=1)
    chunk = b"x" * (512 * 1024)
    with pytest.raises(SpecError, match="upload_max_mb"):
        cell.upload(iter([chunk, chunk, b"!"]), owner="alice")
    assert list(cell.home.uploads.rglob("*")) == []
    assert cell.upload(iter([chunk, chunk]), owner="alice")["size"] == 1024 * 1024


def test_an_output_name_that_is_not_utf8_fails_the_step_not_the_worker(cell: Cell) -> None:
    write_odd_name = ("import os; os.chdir(os.environ['JOBCELL_STEP_DIR'] + '/output'); "
                      "open(b'r\\xffx.bin', 'wb').close()")
    cell.register_runner({"name": "oddname", "command": sys.executable,
                          "args_template": ["-c", write_odd_name]})
    job = cell.submit({"label": "odd", "steps": [{"runner": "oddname"}]}, owner="alice").job_id
    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "failed"
    assert "not valid UTF-8" in status["steps"][0]["error"]
    assert str(cell.home.root) not in status["steps"][0]["error"]
