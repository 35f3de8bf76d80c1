"""Content-addressed step keys: the pure part of the server-side step cache.

A step key says "this step, run again, would compute the same thing". Two steps
with equal keys are twins: a completed twin's outputs can be reused
(``step_cached``) and a running twin can be waited on (``step_cache_wait``).

What is in a step key:

- the runner's name and the hash of its definition without provisioning
  (``RunnerDefinition.cache_hash``), so a changed command, script, env or
  image gives a new key;
- the step's params, as canonical JSON (dict key order does not matter);
- the input layout (how upstream outputs are presented to the step);
- the *contents* of each upstream output directory (a tree digest), in the
  order of the step's input list, each named by the path it is staged under
  (the caller passes ``"<node id>/<digest>"`` where the layout puts a tree
  under its node id).

What is deliberately not in it:

- the step's own node id, job ids and owners: an identical step in another
  job or at another place in a DAG is still a twin;
- cache flags (``cache: false``, ``cacheable: false``): they decide whether
  the key is used, not what it is;
- provisioning (cpu slots, memory, gpu, timeout, retries, concurrency): they
  change how a step runs, not what it computes;
- file metadata other than the executable bit (mtimes, owners, other mode
  bits): a copied tree has the same digest as its original.

File digests are BLAKE3 of the content, memoised by file identity (path, size,
mtime in ns, inode) so unchanged large inputs are read once. Like ``make`` and
``rsync``, the memo trusts that identity: a file rewritten in place with the
same size and the same mtime keeps its old digest.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import blake3

from jobcell.model.canonical import canonical_json

STEP_KEY_VERSION = 1

CHUNK_BYTES = 1 << 20
DEFAULT_MEMO_ENTRIES = 100_000

_OTHER_KINDS = (
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char-device"),
    (stat.S_ISBLK, "block-device"),
)


class HashMemo(Protocol):
    """Remembers file digests by identity so unchanged files are not re-read."""

    def lookup(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        """The digest recorded for this exact identity, else None."""
        ...

    def record(self, path: str, size: int, mtime_ns: int, inode: int, digest: str) -> None:
        """Remember ``digest`` for this identity (replacing what ``path`` had)."""
        ...


class _Identity(NamedTuple):
    size: int
    mtime_ns: int
    inode: int


class MemoryHashMemo:
    """A bounded, thread-safe, in-process :class:`HashMemo`.

    Keeps one identity per path and at most ``max_entries`` paths; when full,
    the least recently used path is dropped. ``hits`` and ``misses`` count
    lookups (for tests and benchmarks).
    """

    def __init__(self, max_entries: int = DEFAULT_MEMO_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[_Identity, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        """The digest recorded for this exact identity, else None."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None or entry[0] != _Identity(size, mtime_ns, inode):
                self.misses += 1
                return None
            self._entries.move_to_end(path)
            self.hits += 1
            return entry[1]

    def record(self, path: str, size: int, mtime_ns: int, inode: int, digest: str) -> None:
        """Remember ``digest`` for this identity, dropping the least recently used path."""
        with self._lock:
            self._entries[path] = (_Identity(size, mtime_ns, inode), digest)
            self._entries.move_to_end(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def _identity(status: os.stat_result) -> _Identity:
    return _Identity(status.st_size, status.st_mtime_ns, status.st_ino)


def _hash_content(path: Path) -> str:
    """BLAKE3 hex of the file's bytes, read in 1 MiB chunks into one reused buffer."""
    # One thread: benchmarks/bench_hashing.py measured max_threads=AUTO on 1 MiB
    # chunks at ~0.9x of one thread (2 cores, file in page cache), and the worker
    # should not take every core from the steps it runs. mmap would be faster
    # but a file truncated while mapped kills the process with SIGBUS.
    hasher = blake3.blake3()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def _digest_with_status(path: Path, status: os.stat_result, memo: HashMemo | None) -> str:
    """The digest of the file ``status`` describes, via ``memo`` when it knows it."""
    if memo is None:
        return _hash_content(path)
    key, before = str(path), _identity(status)
    known = memo.lookup(key, *before)
    if known is not None:
        return known
    digest = _hash_content(path)
    # A file being written while we read it must not be remembered under either identity.
    if _identity(os.stat(path)) == before:
        memo.record(key, *before, digest)
    return digest


def file_digest(path: Path, memo: HashMemo | None = None) -> str:
    """BLAKE3 hex digest of a file's content.

    With ``memo``, a file whose (path, size, mtime_ns, inode) is unchanged since
    it was last hashed is not read again. Pass absolute paths so the memo key
    does not depend on the working directory.
    """
    return _digest_with_status(path, os.stat(path), memo)


def _other_kind(mode: int) -> str:
    return next((name for test, name in _OTHER_KINDS if test(mode)), "unknown")


def _tree_entries(root: Path, memo: HashMemo | None) -> Iterator[list[Any]]:
    """Every entry under ``root`` (not ``root`` itself), unsorted; symlinks never followed."""
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as scan:
            for entry in scan:
                relpath = prefix + entry.name
                status = entry.stat(follow_symlinks=False)
                mode = status.st_mode
                if stat.S_ISLNK(mode):
                    yield ["l", relpath, os.readlink(entry.path)]
                elif stat.S_ISDIR(mode):
                    yield ["d", relpath]
                    pending.append((Path(entry.path), relpath + "/"))
                elif stat.S_ISREG(mode):
                    digest = _digest_with_status(Path(entry.path), status, memo)
                    yield ["f", relpath, digest, bool(mode & stat.S_IXUSR)]
                else:
                    yield ["o", relpath, _other_kind(mode)]


def _encode(value: Any) -> bytes:
    # surrogatepass: names that are not valid UTF-8 (os.fsdecode gives lone
    # surrogates) still hash, deterministically.
    return canonical_json(value).encode("utf-8", "surrogatepass")


def tree_digest(root: Path, memo: HashMemo | None = None) -> str:
    """Content address of the directory tree at ``root``.

    Covers every entry below ``root`` with its relative POSIX path and type:
    regular files by content digest and executable bit, symlinks by their
    target text (never followed), directories including empty ones, and other
    kinds (fifo, socket, device) by kind. Mtimes, owners and other mode bits
    are not covered. A missing ``root`` (or a dangling symlink) digests as an
    empty directory; a ``root`` that is not a directory raises
    :class:`NotADirectoryError`.
    """
    hasher = blake3.blake3()
    # One canonical-JSON line per entry: JSON escapes newlines, so lines cannot blur.
    hasher.update(_encode({"v": STEP_KEY_VERSION, "kind": "tree"}) + b"\n")
    if os.path.exists(root):
        for entry in sorted(_tree_entries(root, memo), key=lambda item: item[1]):
            hasher.update(_encode(entry) + b"\n")
    return hasher.hexdigest()


def step_key(*, runner: str, runner_hash: str, params: Mapping[str, Any], input_layout: str,
             input_digests: Sequence[str]) -> str:
    """The step key: ``"v1:"`` + BLAKE3 hex of the canonical JSON of what the step computes.

    ``input_digests`` are the tree digests of the step's upstream output
    directories in the order of the step's input list, each prefixed with the
    path it is staged under when there is one. The step's own node id, cache
    flags and provisioning are not part of the key; see the module docstring.
    """
    if isinstance(input_digests, str):
        raise TypeError("input_digests must be a sequence of digests, not one string")
    document = {"v": STEP_KEY_VERSION, "runner": runner, "runner_hash": runner_hash,
                "params": dict(params), "layout": input_layout,
                "inputs": list(input_digests)}
    return f"v{STEP_KEY_VERSION}:" + blake3.blake3(_encode(document)).hexdigest()


class _Materialiser:
    """Copies one tree, hard-linking files until the filesystem refuses."""

    def __init__(self) -> None:
        self.linking = True

    def place_file(self, source: str, target: str) -> None:
        if self.linking:
            try:
                os.link(source, target)
                return
            except OSError:
                # EXDEV (another filesystem), EPERM, EMLINK, ...: links will keep failing.
                self.linking = False
        shutil.copy2(source, target, follow_symlinks=False)

    def copy_tree(self, source: Path, target: Path) -> None:
        pending = [(source, target)]
        while pending:
            from_dir, to_dir = pending.pop()
            with os.scandir(from_dir) as scan:
                for entry in scan:
                    pending.extend(self.place(entry, to_dir / entry.name))

    def place(self, entry: os.DirEntry[str], target: Path) -> list[tuple[Path, Path]]:
        """Recreate one entry; a directory comes back as more work to do."""
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(target)
            return [(Path(entry.path), target)]
        elif entry.is_file(follow_symlinks=False):
            self.place_file(entry.path, str(target))
        else:
            raise ValueError(f"cannot reuse {entry.path}: only files, directories and "
                             "symlinks can be materialised from the step cache")
        return []


def link_or_copy_tree(source: Path, target: Path) -> None:
    """Materialise the output directory ``source`` of a cached twin at ``target``.

    Regular files are hard-linked (copied when the filesystem refuses, e.g.
    across devices), directories are recreated including empty ones, and
    symlinks are recreated with the same target text. ``target`` must not
    exist (:class:`FileExistsError`); its parent is created if needed. On any
    failure the partial ``target`` is removed and the error re-raised.

    Hard-linked files share their inode with the cached twin: writing to them
    in place would change the twin's outputs too.
    """
    if not source.is_dir():
        raise NotADirectoryError(f"cached output directory {source} is missing")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir()
    try:
        _Materialiser().copy_tree(source, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
