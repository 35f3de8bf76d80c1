"""File references: markers, returned files, staged params, client-side extraction, and
the per-step provisioning override that the task client sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobcell.client.backends import ExecutionRequest, execution_spec, node_resources
from jobcell.client.task import extract_files
from jobcell.errors import SpecError
from jobcell.fileref import (
    FileRef,
    FileRefError,
    decode_value,
    encode_returned,
    file_kind,
    is_file_annotation,
    marker,
    marker_name,
    staged_name,
    staged_value,
)
from jobcell.model.runner import RunnerDefinition
from jobcell.model.spec import compile_spec


def test_marker_round_trip_and_look_alikes() -> None:
    assert marker_name(marker("a/b.txt")) == "a/b.txt"
    for value in ({"$jobcell_file": 3}, {"$jobcell_file": "x", "other": 1}, "x", None, [1]):
        assert marker_name(value) is None
    value = {"files": [marker("a"), {"deep": marker("b")}], "n": 1}
    decoded = decode_value(value, lambda name: FileRef(name=name))
    assert decoded == {"files": [FileRef("a"), {"deep": FileRef("b")}], "n": 1}


def test_encode_returned_copies_outside_files_and_names_inside_ones(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    inside = out / "sub" / "x.txt"
    inside.write_text("in")
    outside = tmp_path / "x.txt"
    outside.write_text("out")
    (out / "x.txt").write_text("taken")
    value = encode_returned({"a": inside, "b": [outside, FileRef("y", path=str(outside))]},
                            out)
    assert value == {"a": marker("sub/x.txt"), "b": [marker("x-1.txt"), marker("x-2.txt")]}
    assert (out / "x-1.txt").read_text() == "out" and (out / "x.txt").read_text() == "taken"
    with pytest.raises(FileRefError, match="not a regular file"):
        encode_returned(tmp_path / "missing", out)


def test_staged_params_by_annotation(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "f.txt").write_text("abc")
    assert is_file_annotation(FileRef) and is_file_annotation(Path)
    assert not is_file_annotation(str)
    staged = {"p/f.txt"}
    ref = staged_value(FileRef, "p/f.txt", tmp_path, staged)
    assert isinstance(ref, FileRef) and ref.read_text() == "abc" and ref.size == 3
    assert staged_value(Path, "p/f.txt", tmp_path, staged) == tmp_path / "p" / "f.txt"
    for other in ("/etc/passwd", "../x", "p/../p/f.txt", "p/g.txt"):
        with pytest.raises(FileRefError, match="not a file staged for this step"):
            staged_value(Path, other, tmp_path, staged)


def test_file_kinds_and_staged_names() -> None:
    assert file_kind(FileRef) == ("file", FileRef)
    assert file_kind(Path | None) == ("file", Path)
    assert file_kind(list[Path]) == ("list", Path)
    assert file_kind(list[FileRef] | None) == ("list", FileRef)
    assert file_kind(list[str]) is None and file_kind(str | None) is None
    assert staged_name("src", "a.txt") == "src/a.txt"
    assert staged_name("src", "a.txt", 2) == "src/2/a.txt"
    assert staged_name("src", "run\\01\x01.txt") == "src/run_01_.txt"
    assert staged_name("src", "bad\udcff.txt") == "src/bad_.txt"
    long = staged_name("src", "x" * 300 + ".fastq")
    assert len(long) == len("src/") + 200 and long.endswith(".fastq")


def test_file_ref_errors(tmp_path: Path) -> None:
    with pytest.raises(FileRefError, match="neither a local path nor a URL"):
        FileRef("x").read_bytes()
    with pytest.raises(FileRefError, match="is gone"):
        FileRef("x", path=str(tmp_path / "gone")).read_bytes()
    with pytest.raises(FileRefError, match="no local path"):
        open(FileRef("x", url="http://example.invalid/x"))  # noqa: SIM115
    with pytest.raises(FileRefError, match="not a readable regular file"):
        FileRef.local(tmp_path)


def test_extract_files(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("1")
    ref = FileRef("out/r.csv", url="http://h/r.csv", digest="d" * 64)
    params, files = extract_files({"a": one, "b": [ref, one], "c": str(one), "n": 2},
                                  {"c"})
    assert params == {"a": "a/one.txt", "b": ["b/0/r.csv", "b/1/one.txt"], "c": "c/one.txt",
                      "n": 2}
    assert files["b/0/r.csv"] is ref and files["a/one.txt"].path == str(one)
    # Strings are files only for params annotated as files.
    assert extract_files({"c": str(one)}, set()) == ({"c": str(one)}, {})
    for nested in ({"d": {"file": one}}, {"d": [1, one]}, {"d": [[one]]}):
        with pytest.raises(TypeError, match="not nested deeper"):
            extract_files(nested, set())


def test_node_resources_and_execution_spec() -> None:
    assert node_resources({}) == {}
    assert node_resources({"vcpu": 0.5, "memory_mb": 300, "gpu": 1, "timeout_s": 90}) == \
        {"cpu_slots": 1, "memory_mb": 300, "gpus": 1, "timeout_s": 90.0}
    request = ExecutionRequest("t", "1", {"x": 1}, {"vcpu": 2.5}, "lab", "k")
    spec = execution_spec(request, fresh=True, digests={"x/f": "a" * 64})
    assert spec == {"label": "lab", "cache": False, "steps": [
        {"id": "task", "runner": "t", "params": {"x": 1}, "files": {"x/f": "a" * 64},
         "resources": {"cpu_slots": 3}}]}


def _runner(**resources: Any) -> RunnerDefinition:
    return RunnerDefinition.model_validate({
        "name": "r", "command": "/bin/true", "version": "1",
        "resources": {"memory_mb": 100, "cpu_slots": 1, **resources}})


def test_step_resources_override_the_runner_and_not_the_cache_hash() -> None:
    runners = {"r": _runner()}
    plain = compile_spec({"label": "l", "steps": [{"runner": "r"}]}, runners)
    big = compile_spec({"label": "l", "steps": [
        {"runner": "r", "resources": {"memory_mb": 900, "gpus": 1}}]}, runners)
    assert big.steps[0].resources.memory_mb == 900 and big.steps[0].resources.gpus == 1
    assert big.steps[0].resources.cpu_slots == 1            # what it leaves out stays
    assert plain.spec_hash != big.spec_hash                  # another job...
    assert plain.steps[0].runner.cache_hash() == big.steps[0].runner.cache_hash()  # same work
    assert "resources" not in plain.spec["steps"][0]
    with pytest.raises(SpecError, match="resources"):
        compile_spec({"label": "l", "steps": [{"runner": "r", "resources": {"disk": 1}}]},
                     runners)
    with pytest.raises(SpecError):
        compile_spec({"label": "l", "steps": [{"runner": "r",
                                               "resources": {"memory_mb": -1}}]}, runners)


@pytest.mark.parametrize(("hint", "value", "ok"), [
    (list[Path], [FileRef("a", path="/x/a")], True),
    (list[FileRef], [FileRef("a", path="/x/a")], True),
    (dict[str, Path], {"k": FileRef("a")}, True),
    (Path, FileRef("a"), True),
    (FileRef, "not a file", False),
    (int, "x", False),
    (list[int], [1, "two"], False),
    (str, "fine", True),
])
def test_output_checked_against_the_return_hint(hint: Any, value: Any, ok: bool) -> None:
    from jobcell.client.backends import TaskDefinition
    from jobcell.client.task import TaskOutputError, _check_return

    definition = TaskDefinition("t", "1", returns=hint)
    if ok:
        _check_return(definition, value)
    else:
        with pytest.raises(TaskOutputError, match="task 't' returned"):
            _check_return(definition, value)


def test_unreachable_url_is_a_file_ref_error() -> None:
    import socket

    with socket.socket() as sock:      # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ref = FileRef("x.txt", url=f"http://127.0.0.1:{port}/files/x")
    with pytest.raises(FileRefError, match="failed"):
        ref.read_bytes()
