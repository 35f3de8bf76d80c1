"""Attempt directories: layout, input staging with a manifest, output registration."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from jobcell.model.canonical import canonical_json

VALUE_FILE = "output.json"
STAGED_FILE = ".staged.json"  # identity of each staged input, to detect in-place changes
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AttemptPaths:
    """Where one attempt keeps its files."""

    root: Path

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr.log"


@dataclass(frozen=True)
class OutputFile:
    """One registered output file."""

    name: str
    path: Path
    size: int
    blake3: str


def file_blake3(path: Path) -> str:
    """BLAKE3 hex digest of a file's content."""
    hasher = blake3.blake3()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _link_tree(source: Path, target: Path, staged: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Mirror ``source`` into ``target`` with hardlinks (symlinks as a fallback)."""
    files: list[dict[str, Any]] = []
    target.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        return files
    for dirpath, dirnames, filenames in os.walk(source):
        rel_dir = Path(dirpath).relative_to(source)
        for name in dirnames:
            (target / rel_dir / name).mkdir(exist_ok=True)
        for name in filenames:
            src, dst = Path(dirpath) / name, target / rel_dir / name
            if src.is_symlink():
                continue  # never registered as an output (see linked_outputs)
            try:
                os.link(src, dst)
            except OSError:
                os.symlink(src, dst)
            files.append({"path": str(rel_dir / name), "size": src.lstat().st_size})
            staged[str(dst)] = _identity(src)
    return files


def _read_value(output_dir: Path) -> Any:
    if (output_dir / VALUE_FILE).is_symlink():
        return None  # a link could point at any file on the server
    try:
        return json.loads((output_dir / VALUE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stage_files(files: Mapping[str, Path], input_dir: Path) -> dict[str, str]:
    """Copy uploaded files to ``input/<name>``.

    A copy, not a link: the upload area is shared by every job that names the same
    bytes, so a step that writes into its input must change only its own copy. (On
    Linux the copy is done in the kernel; names were checked at submit.)
    """
    placed: dict[str, str] = {}
    for name, source in files.items():
        target = input_dir / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(target):
                raise FileExistsError
            shutil.copyfile(source, target)
        except FileNotFoundError:
            raise ValueError(f"uploaded file {name!r} is missing from the cell's upload "
                             "area") from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise ValueError(f"file {name!r} clashes with a staged input of the same "
                             "name") from None
        placed[name] = str(target)
    return placed


def prepare_attempt(root: Path, params: Mapping[str, Any], upstream: Mapping[str, Path],
                    layout: str, step_input: bool = True,
                    files: Mapping[str, Path] | None = None) -> AttemptPaths:
    """Create the attempt directory and stage upstream outputs under ``input/``.

    ``upstream`` maps each input node id to that node's output directory. In the
    ``nested`` layout (pipelines) each goes to ``input/<node_id>/``; in the
    ``flat`` layout (ordered steps) the single predecessor's files go to ``input/``.
    An ``inputs.json`` manifest lists every staged file. With ``step_input`` (Python
    runners), ``input.json`` also gives the params and paths.
    """
    uploads = dict(files or {})
    paths = AttemptPaths(root)
    root.mkdir(parents=True, exist_ok=False)
    paths.output_dir.mkdir()
    manifest: dict[str, Any] = {}
    staged: dict[str, list[int]] = {}
    for node_id, source in upstream.items():
        target = paths.input_dir if layout == "flat" else paths.input_dir / node_id
        files = _link_tree(source, target, staged)
        manifest[node_id] = {"dir": str(target), "files": files, "value": _read_value(source)}
    paths.input_dir.mkdir(exist_ok=True)
    placed = _stage_files(uploads, paths.input_dir)
    (root / "inputs.json").write_text(canonical_json({"inputs": manifest, "files": placed}),
                                      encoding="utf-8")
    (root / STAGED_FILE).write_text(canonical_json(staged), encoding="utf-8")
    if step_input:
        data = {"params": dict(params), "input_dir": str(paths.input_dir),
                "output_dir": str(paths.output_dir), "inputs": manifest, "files": placed}
        (root / "input.json").write_text(canonical_json(data), encoding="utf-8")
    return paths


def modified_inputs(attempt_dir: Path) -> list[str]:
    """Staged inputs the attempt changed in place.

    Inputs are hard links to upstream outputs, so writing into one would silently change
    the upstream step's registered output; a replaced or deleted input changes nothing.
    """
    try:
        staged = json.loads((attempt_dir / STAGED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    changed = []
    for path, (inode, size, mtime_ns) in staged.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_ino == inode and (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            changed.append(str(Path(path).relative_to(attempt_dir / "input")))
    return sorted(changed)


def missing_outputs(output_dir: Path, declared: list[str]) -> list[str]:
    """Declared outputs that the attempt did not produce."""
    return [name for name in declared if not os.path.lexists(output_dir / name)]


def linked_outputs(output_dir: Path) -> list[str]:
    """Links under ``output_dir``: symlinks, and files with more than one hard link.

    Outputs must be files the step wrote itself, so that nothing outside the step (a
    server file, another job's data) can pass as one, and registering an output never
    changes a file elsewhere.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(output_dir):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink() or (name in filenames and path.stat().st_nlink > 1):
                found.append(str(path.relative_to(output_dir)))
    return sorted(found)


def register_outputs(output_dir: Path) -> list[OutputFile]:
    """Every file under ``output_dir`` with size and digest; files become read-only.
    A name that is not UTF-8 raises :class:`ValueError` (it could not be stored)."""
    found: list[OutputFile] = []
    for dirpath, _dirnames, filenames in os.walk(output_dir):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            relative = str(path.relative_to(output_dir))
            try:
                relative.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"output file name {relative!r} is not valid UTF-8 (outputs "
                                 "must have UTF-8 names)") from None
            mode = path.stat().st_mode
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            found.append(OutputFile(relative, path, path.stat().st_size, file_blake3(path)))
    return sorted(found, key=lambda f: f.name)


def read_value(output_dir: Path) -> Any:
    """The step's JSON value (``output.json``), or None."""
    return _read_value(output_dir)


def read_error_report(attempt_dir: Path) -> dict[str, Any] | None:
    """The error report a Python runner wrote, or None."""
    try:
        data = json.loads((attempt_dir / "error.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


TAIL_MAX_BYTES = 4 << 20
_LINE_MAX = 4096


def tail_lines(path: Path, count: int, max_bytes: int = TAIL_MAX_BYTES) -> list[str]:
    """The last ``count`` lines of a text file, read from the end.

    Reads at most ``max_bytes`` (linear in what it reads), and cuts each line to
    4,096 characters, so a huge log or one without newlines cannot stall the caller.
    """
    if count <= 0:
        return []
    chunks: list[bytes] = []
    newlines = 0
    try:
        with path.open("rb") as handle:
            position = handle.seek(0, os.SEEK_END)
            floor = max(position - max_bytes, 0)
            while position > floor and newlines <= count:
                step = min(64 * 1024, position - floor)
                position -= step
                handle.seek(position)
                chunk = handle.read(step)
                newlines += chunk.count(b"\n")
                chunks.append(chunk)
    except OSError:
        return []
    data = b"".join(reversed(chunks))
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line[-_LINE_MAX:] for line in lines[-count:]]
