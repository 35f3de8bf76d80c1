"""Step keys and content hashing: what changes a key, what must not, and the memo."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobcell.cache import (
    STEP_KEY_VERSION,
    MemoryHashMemo,
    file_digest,
    link_or_copy_tree,
    step_key,
    tree_digest,
)


def write(path: Path, content: bytes = b"data", executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o755 if executable else 0o644)
    return path


def sample_tree(root: Path) -> Path:
    """A small tree with a nested file, an executable, an empty dir and a symlink."""
    write(root / "a.txt", b"alpha")
    write(root / "sub" / "b.bin", bytes(range(256)))
    write(root / "run.sh", b"#!/bin/sh\n", executable=True)
    (root / "empty").mkdir()
    (root / "link").symlink_to("a.txt")
    return root


def rewrite_keeping_identity(path: Path, content: bytes) -> None:
    """Change the bytes in place while keeping size, mtime_ns and inode."""
    before = path.stat()
    assert len(content) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# --- file_digest and the memo ---------------------------------------------------------------


def test_file_digest_is_blake3_of_the_content(tmp_path: Path) -> None:
    content = os.urandom(3 * (1 << 20) + 17)  # several chunks and a partial one
    path = write(tmp_path / "f", content)
    assert file_digest(path) == blake3.blake3(content).hexdigest()


def test_file_digest_of_an_empty_file(tmp_path: Path) -> None:
    assert file_digest(write(tmp_path / "e", b"")) == blake3.blake3(b"").hexdigest()


def test_second_call_is_a_memo_hit_without_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"original")
    memo = MemoryHashMemo()
    first = file_digest(path, memo)
    assert (memo.hits, memo.misses) == (0, 1)
    # Same size, same mtime_ns, same inode: the memo answers and the file is not read.
    rewrite_keeping_identity(path, b"ORIGINAL")
    assert file_digest(path, memo) == first
    assert (memo.hits, memo.misses) == (1, 1)
    assert file_digest(path) == blake3.blake3(b"ORIGINAL").hexdigest()  # no memo: re-read


def test_changed_mtime_is_a_miss(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"same")
    memo = MemoryHashMemo()
    first = file_digest(path, memo)
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime, mtime + 1_000_000))
    assert file_digest(path, memo) == first
    assert (memo.hits, memo.misses) == (0, 2)
    assert file_digest(path, memo) == first
    assert memo.hits == 1  # the new identity was recorded


def test_changed_content_is_a_miss_with_a_new_digest(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"one")
    memo = MemoryHashMemo()
    first = file_digest(path, memo)
    path.write_bytes(b"three")
    second = file_digest(path, memo)
    assert second != first
    assert second == blake3.blake3(b"three").hexdigest()
    assert memo.hits == 0


def test_replaced_file_with_the_same_size_and_mtime_is_a_miss(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"aaaa")
    memo = MemoryHashMemo()
    file_digest(path, memo)
    before = path.stat()
    other = write(tmp_path / "g", b"bbbb")
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    other.replace(path)  # a new inode at the same path
    assert file_digest(path, memo) == blake3.blake3(b"bbbb").hexdigest()


class AppendingMemo(MemoryHashMemo):
    """A memo that appends to the file right after the first stat, as a writer would."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.recorded: list[str] = []

    def lookup(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        with open(self.path, "ab") as handle:
            handle.write(b" more")
        return super().lookup(path, size, mtime_ns, inode)

    def record(self, path: str, size: int, mtime_ns: int, inode: int, digest: str) -> None:
        self.recorded.append(digest)
        super().record(path, size, mtime_ns, inode, digest)


def test_file_changed_while_read_is_not_recorded(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"partial")
    memo = AppendingMemo(path)
    file_digest(path, memo)
    assert memo.recorded == []
    assert len(memo) == 0


def test_memo_keeps_at_most_max_entries_dropping_the_least_recently_used() -> None:
    memo = MemoryHashMemo(max_entries=2)
    memo.record("a", 1, 1, 1, "da")
    memo.record("b", 1, 1, 2, "db")
    assert memo.lookup("a", 1, 1, 1) == "da"  # "a" is now the most recently used
    memo.record("c", 1, 1, 3, "dc")
    assert len(memo) == 2
    assert memo.lookup("b", 1, 1, 2) is None
    assert memo.lookup("a", 1, 1, 1) == "da"
    assert memo.lookup("c", 1, 1, 3) == "dc"


def test_memo_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryHashMemo(max_entries=0)


# --- tree_digest ------------------------------------------------------------------------------


def test_tree_digest_changes_when_a_file_content_changes(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "sub" / "b.bin").write_bytes(b"other")
    assert tree_digest(root) != before


def test_tree_digest_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "sub" / "b.bin").rename(root / "sub" / "c.bin")
    assert tree_digest(root) != before


def test_tree_digest_changes_when_a_file_moves_to_another_directory(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "sub" / "b.bin").rename(root / "empty" / "b.bin")
    (root / "sub" / "keep").mkdir()  # same set of names, different places
    assert tree_digest(root) != before


def test_tree_digest_changes_when_an_empty_directory_is_added(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "sub" / "new-empty").mkdir()
    assert tree_digest(root) != before


def test_tree_digest_changes_when_a_symlink_target_text_changes(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "link").unlink()
    (root / "link").symlink_to("./a.txt")  # same file, different text
    assert tree_digest(root) != before


def test_tree_digest_changes_when_the_exec_bit_flips(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "a.txt").chmod(0o744)
    assert tree_digest(root) != before


def test_tree_digest_ignores_other_mode_bits_and_mtimes(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    before = tree_digest(root)
    (root / "a.txt").chmod(0o600)
    os.utime(root / "sub" / "b.bin", ns=(1, 1))
    assert tree_digest(root) == before


def test_a_copy_elsewhere_has_the_same_digest(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        if not path.is_symlink():
            os.utime(path, ns=(10**9, 10**9))  # different mtimes everywhere
    assert tree_digest(copy) == tree_digest(root)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    big = write(tmp_path / "big", os.urandom(1 << 16))
    with_link, with_copy = tmp_path / "l", tmp_path / "c"
    with_link.mkdir()
    with_copy.mkdir()
    (with_link / "data").symlink_to(big)
    shutil.copy(big, with_copy / "data")
    assert tree_digest(with_link) != tree_digest(with_copy)


def test_a_symlinked_directory_is_not_descended(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "x", b"1")
    root = tmp_path / "t"
    root.mkdir()
    (root / "dir-link").symlink_to(outside, target_is_directory=True)
    before = tree_digest(root)
    write(outside / "x", b"2")
    write(outside / "y", b"new")
    assert tree_digest(root) == before


def test_a_missing_root_digests_as_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert tree_digest(tmp_path / "missing") == tree_digest(tmp_path / "empty")


def test_an_empty_tree_differs_from_one_with_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "inner").mkdir(parents=True)
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "b")


def test_a_root_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        tree_digest(write(tmp_path / "f"))


def test_a_fifo_is_recorded_by_kind_not_read(tmp_path: Path) -> None:
    with_fifo, with_file = tmp_path / "p", tmp_path / "f"
    with_fifo.mkdir()
    os.mkfifo(with_fifo / "pipe")
    write(with_file / "pipe", b"")
    assert tree_digest(with_fifo) != tree_digest(with_file)


def test_tree_digest_uses_the_memo_and_gives_the_same_digest(tmp_path: Path) -> None:
    root = sample_tree(tmp_path / "t")
    memo = MemoryHashMemo()
    plain = tree_digest(root)
    assert tree_digest(root, memo) == plain
    assert (memo.hits, memo.misses) == (0, 3)  # three regular files
    assert tree_digest(root, memo) == plain
    assert memo.hits == 3


def test_tree_digest_handles_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"x")
    assert tree_digest(root) != tree_digest(tmp_path / "missing")


# --- step_key ---------------------------------------------------------------------------------

BASE_KEY: dict[str, Any] = {
    "runner": "align", "runner_hash": "r" * 64, "params": {"k": 31, "mode": "fast"},
    "input_layout": "positional", "input_digests": ["a" * 64, "b" * 64],
}


def key_with(**changes: Any) -> str:
    return step_key(**{**BASE_KEY, **changes})


def test_step_key_is_versioned() -> None:
    key = key_with()
    assert key.startswith(f"v{STEP_KEY_VERSION}:")
    assert key.startswith("v1:")
    assert len(key) == 3 + 64


@pytest.mark.parametrize("changes", [
    {"params": {"k": 32, "mode": "fast"}},
    {"params": {"k": 31}},
    {"runner_hash": "s" * 64},
    {"runner": "align2"},
    {"input_digests": ["a" * 64, "c" * 64]},
    {"input_digests": ["b" * 64, "a" * 64]},
    {"input_digests": ["a" * 64]},
    {"input_layout": "named"},
], ids=["param value", "param removed", "runner hash", "runner name", "input digest",
        "input order", "input count", "layout"])
def test_step_key_changes_with(changes: dict[str, Any]) -> None:
    assert key_with(**changes) != key_with()


def test_step_key_is_stable_across_dict_key_order() -> None:
    assert key_with(params={"mode": "fast", "k": 31}) == key_with()
    assert key_with(input_digests=("a" * 64, "b" * 64)) == key_with()


def test_step_key_rejects_a_single_string_as_inputs() -> None:
    with pytest.raises(TypeError, match="sequence"):
        key_with(input_digests="a" * 64)


# --- link_or_copy_tree ------------------------------------------------------------------------


def test_files_are_hard_linked_and_the_tree_reproduced(tmp_path: Path) -> None:
    source = sample_tree(tmp_path / "src")
    target = tmp_path / "out" / "step"
    link_or_copy_tree(source, target)
    for name in ["a.txt", "sub/b.bin", "run.sh"]:
        assert (target / name).stat().st_ino == (source / name).stat().st_ino
    assert (target / "empty").is_dir()
    assert not any((target / "empty").iterdir())
    assert os.readlink(target / "link") == "a.txt"
    assert tree_digest(target) == tree_digest(source)


def test_files_are_copied_when_links_fail(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(*args: Any, **kwargs: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    source = sample_tree(tmp_path / "src")
    target = tmp_path / "step"
    link_or_copy_tree(source, target)
    assert (target / "a.txt").stat().st_ino != (source / "a.txt").stat().st_ino
    assert (target / "run.sh").stat().st_mode & stat.S_IXUSR
    assert tree_digest(target) == tree_digest(source)


def test_an_existing_target_is_an_error_and_left_alone(tmp_path: Path) -> None:
    source = sample_tree(tmp_path / "src")
    target = tmp_path / "step"
    write(target / "keep", b"mine")
    with pytest.raises(FileExistsError):
        link_or_copy_tree(source, target)
    assert (target / "keep").read_bytes() == b"mine"


def test_a_partial_target_is_removed_on_failure(tmp_path: Path) -> None:
    source = sample_tree(tmp_path / "src")
    os.mkfifo(source / "sub" / "pipe")  # cannot be materialised, found after other entries
    target = tmp_path / "step"
    with pytest.raises(ValueError, match="cannot reuse"):
        link_or_copy_tree(source, target)
    assert not target.exists()
    assert (source / "a.txt").read_bytes() == b"alpha"


def test_a_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        link_or_copy_tree(tmp_path / "missing", tmp_path / "step")
    assert not (tmp_path / "step").exists()


# --- property: a copy of any small tree has the same digest -----------------------------------

names = st.text(alphabet="abcdefgh0123._-", min_size=1, max_size=6).filter(
    lambda name: name not in {".", ".."})
files = st.tuples(st.binary(max_size=64), st.booleans())  # (content, executable)
symlinks = st.text(alphabet="abc./", min_size=1, max_size=8)  # target text, maybe dangling
trees = st.recursive(files | symlinks,
                     lambda children: st.dictionaries(names, children, max_size=4),
                     max_leaves=12)


def build(path: Path, node: Any) -> None:
    if isinstance(node, dict):
        path.mkdir()
        for name, child in node.items():
            build(path / name, child)
    elif isinstance(node, str):
        path.symlink_to(node)
    else:
        write(path, node[0], executable=node[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(names, trees, max_size=5))
def test_a_copied_tree_has_the_same_digest(tree: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        original, copy = Path(scratch) / "original", Path(scratch) / "copy"
        build(original, tree)
        shutil.copytree(original, copy, symlinks=True)
        assert tree_digest(copy) == tree_digest(original)
        linked = Path(scratch) / "linked"
        link_or_copy_tree(original, linked)
        assert tree_digest(linked) == tree_digest(original)
