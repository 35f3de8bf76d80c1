"""Attempt artifacts: log tails, outputs that must be regular files, staged inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobcell import artifacts
from jobcell.artifacts import tail_lines

# --- tail_lines ----------------------------------------------------------------------------


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def numbered(count: int) -> str:
    return "".join(f"line {i}\n" for i in range(count))


@pytest.mark.parametrize(("text", "count", "expected"), [
    (numbered(1000), 3, ["line 997", "line 998", "line 999"]),
    (numbered(3), 10, ["line 0", "line 1", "line 2"]),
    (numbered(3), 3, ["line 0", "line 1", "line 2"]),
    ("a\nb\nlast without newline", 2, ["b", "last without newline"]),
    ("only line", 5, ["only line"]),
    ("", 5, []),
    ("\n\n", 5, ["", ""]),
    (numbered(3), 0, []),
])
def test_tail_lines_returns_the_last_lines(tmp_path: Path, text: str, count: int,
                                           expected: list[str]) -> None:
    assert tail_lines(write(tmp_path / "log", text), count) == expected


def test_tail_lines_across_many_read_chunks(tmp_path: Path) -> None:
    # ~1.9 MB: the last 20,000 lines span many 64 KiB chunks read from the end
    log = write(tmp_path / "log", numbered(200_000))
    lines = tail_lines(log, 20_000)
    assert lines == [f"line {i}" for i in range(180_000, 200_000)]


def test_tail_lines_of_a_missing_file_or_a_directory_is_empty(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "nowhere.log", 5) == []
    assert tail_lines(tmp_path, 5) == []


def test_tail_of_a_50_mb_line_without_newline_is_one_bounded_line(tmp_path: Path) -> None:
    log = tmp_path / "huge.log"
    with log.open("wb") as handle:
        handle.write(b"x" * (50 << 20))
        handle.write(b"END")
    lines = tail_lines(log, 10)
    assert len(lines) == 1
    assert len(lines[0]) == 4096 and lines[0].endswith("xEND")   # the end of the line


def test_every_returned_line_is_cut_to_4096_characters(tmp_path: Path) -> None:
    log = write(tmp_path / "log", "a" * 10_000 + "\nshort\n" + "b" * 5_000 + "tail")
    assert [len(line) for line in tail_lines(log, 3)] == [4096, 5, 4096]
    assert tail_lines(log, 1)[0].endswith("btail")


def test_tail_lines_reads_at_most_max_bytes_from_the_end(tmp_path: Path) -> None:
    log = write(tmp_path / "log", numbered(1000))
    # the last lines are still right with a small window ...
    assert tail_lines(log, 3, max_bytes=100) == ["line 997", "line 998", "line 999"]
    # ... and nothing before the window is read, however many lines are asked for
    lines = tail_lines(log, 1000, max_bytes=100)
    assert sum(len(line) + 1 for line in lines) <= 100
    assert lines[-1] == "line 999" and len(lines) < 20
    assert tail_lines(log, 1000, max_bytes=1 << 20) == numbered(1000).splitlines()


def test_tail_lines_decodes_invalid_utf8_with_replacement(tmp_path: Path) -> None:
    log = write(tmp_path / "log", b"ok\n\xff\xfe broken\n")
    assert tail_lines(log, 2) == ["ok", "\ufffd\ufffd broken"]


# --- outputs must be regular files ----------------------------------------------------------


def test_symlinks_under_the_output_dir_are_found(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    secret = write(tmp_path / "secret.txt", "s")
    (out / "regular.txt").write_text("r")
    os.symlink(secret, out / "output.json")
    os.symlink(secret, out / "sub" / "inner.txt")
    os.symlink(tmp_path, out / "dir-link")
    os.symlink(tmp_path / "gone", out / "dangling")
    assert artifacts.linked_outputs(out) == ["dangling", "dir-link", "output.json",
                                                "sub/inner.txt"]
    assert artifacts.linked_outputs(tmp_path / "no-output") == []


def test_a_symlinked_declared_output_is_not_missing(tmp_path: Path) -> None:
    # so the step fails for the link (the real reason), not for a "missing" output
    out = tmp_path / "output"
    out.mkdir()
    os.symlink(tmp_path / "gone", out / "declared.txt")
    assert artifacts.missing_outputs(out, ["declared.txt", "absent.txt"]) == ["absent.txt"]


def test_a_symlinked_value_is_never_read(tmp_path: Path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    secret = write(tmp_path / "secret.json", json.dumps({"secret": "hunter2"}))
    os.symlink(secret, out / "output.json")
    assert artifacts.read_value(out) is None
    assert artifacts.register_outputs(out) == []


# --- staged inputs -----------------------------------------------------------------------------


def staged_attempt(tmp_path: Path) -> tuple[Path, Path]:
    upstream = tmp_path / "up" / "output"
    (upstream / "sub").mkdir(parents=True)
    (upstream / "data.txt").write_text("data\n")
    (upstream / "sub" / "more.txt").write_text("more\n")
    (upstream / "keep.txt").write_text("keep\n")
    os.symlink(tmp_path / "elsewhere", upstream / "link.txt")
    root = tmp_path / "attempt-1"
    artifacts.prepare_attempt(root, {}, {"a": upstream}, "nested")
    return root, root / "input" / "a"


def test_symlinks_of_an_upstream_step_are_not_staged(tmp_path: Path) -> None:
    root, staged = staged_attempt(tmp_path)
    assert sorted(p.name for p in staged.rglob("*") if not p.is_dir()) == [
        "data.txt", "keep.txt", "more.txt"]
    manifest = json.loads((root / "inputs.json").read_text())["inputs"]["a"]
    assert sorted(f["path"] for f in manifest["files"]) == ["data.txt", "keep.txt",
                                                             "sub/more.txt"]


def test_staged_inputs_changed_in_place_are_reported(tmp_path: Path) -> None:
    root, staged = staged_attempt(tmp_path)
    assert artifacts.modified_inputs(root) == []
    with (staged / "sub" / "more.txt").open("a") as handle:   # in place: upstream changes too
        handle.write("appended\n")
    (staged / "data.txt").unlink()                             # deleting changes nothing
    (staged / "keep.txt").with_name("new").write_text("new\n")
    os.replace(staged / "new", staged / "keep.txt")           # nor does replacing
    assert artifacts.modified_inputs(root) == ["a/sub/more.txt"]

