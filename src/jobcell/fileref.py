"""File references: files a task returns, or takes as input.

A task's JSON value names a file with a marker object, ``{"$jobcell_file": NAME}``,
where NAME is the file's path under the step's output folder (in a result) or
under its input folder (in params, where the value is a plain string). The
client turns the markers of a result into :class:`FileRef` objects: a local path
for a local cell, a signed URL for a ``jobcell serve``. Inside a Python runner,
params annotated ``FileRef`` (or ``pathlib.Path``) arrive as references to the
staged file, and a returned ``FileRef`` or ``Path`` is copied into the output
folder when it is not there already.

This module is imported by the runner's child interpreter: standard library only
at import time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

MARKER = "$jobcell_file"
CHUNK = 1 << 20


class FileRefError(Exception):
    """A file reference cannot be read (expired link, missing file, bad marker)."""


@dataclass(frozen=True)
class FileRef:
    """A file produced by (or given to) a task.

    ``name``: the file's path under its step's output (or input) folder.
    ``path``: where it lies on this machine (local cell, or inside a runner).
    ``url``: a signed download link (REST backend), valid until ``expires_at``.
    ``execution_id`` / ``step``: the execution and step that produced it.
    ``digest`` (BLAKE3 hex) and ``size`` when known.
    """

    name: str
    path: str | None = None
    url: str | None = None
    execution_id: str | None = None
    step: str | None = None
    digest: str | None = None
    size: int | None = None
    expires_at: str | None = None
    # TLS verification for ``url``: the backend's setting (a CA bundle path, an
    # ``ssl.SSLContext``, or False).
    verify: Any = field(default=True, repr=False, compare=False)

    @classmethod
    def local(cls, path: str | os.PathLike[str]) -> FileRef:
        """A file on this machine, to pass as a task input (staged or uploaded)."""
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():
            raise FileRefError(f"{resolved} is not a readable regular file")
        return cls(name=resolved.name, path=str(resolved), size=resolved.stat().st_size)

    @property
    def basename(self) -> str:
        """The last part of the name."""
        return self.name.rsplit("/", 1)[-1]

    def with_path(self, path: str | os.PathLike[str]) -> FileRef:
        """A copy that lies at ``path``."""
        return replace(self, path=str(path))

    def _check(self) -> None:
        if self.path is None and self.url is None:
            raise FileRefError(f"file {self.name!r} has neither a local path nor a URL")

    def _open_url(self) -> Any:
        import httpx

        assert self.url is not None
        client = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), verify=self.verify)
        try:
            response = client.send(client.build_request("GET", self.url), stream=True)
        except httpx.HTTPError as exc:
            client.close()
            raise FileRefError(f"downloading {self.name!r} from {self.url} failed: "
                               f"{exc}") from None
        if response.status_code == 403:
            response.close()
            client.close()
            raise FileRefError(
                f"the download link of {self.name!r} was refused (403): it has expired or "
                "was tampered with; await the task that produced it again to get fresh "
                "links (a client-cache hit, no new execution)")
        if response.status_code != 200:
            response.close()
            client.close()
            raise FileRefError(f"downloading {self.name!r} failed: HTTP "
                               f"{response.status_code}")
        return client, response

    def chunks(self) -> Iterator[bytes]:
        """The content, chunk by chunk."""
        self._check()
        if self.path is not None and (self.url is None or os.path.exists(self.path)):
            try:
                with open(self.path, "rb") as handle:
                    while chunk := handle.read(CHUNK):
                        yield chunk
            except FileNotFoundError:
                raise FileRefError(f"file {self.name!r} is gone from {self.path}") from None
            return
        client, response = self._open_url()
        try:
            yield from response.iter_bytes(CHUNK)
        finally:
            response.close()
            client.close()

    def read_bytes(self) -> bytes:
        """The whole content (for small files; use :meth:`open` or :meth:`download`)."""
        return b"".join(self.chunks())

    def read_text(self, encoding: str = "utf-8") -> str:
        """The whole content decoded."""
        return self.read_bytes().decode(encoding)

    def open(self) -> IO[bytes]:
        """A binary file object: the local file, or the download spooled to a temp file."""
        self._check()
        if self.path is not None and (self.url is None or os.path.exists(self.path)):
            try:
                return open(self.path, "rb")
            except FileNotFoundError:
                raise FileRefError(f"file {self.name!r} is gone from {self.path}") from None
        spool = tempfile.SpooledTemporaryFile(max_size=8 * CHUNK)  # noqa: SIM115 (returned)
        for chunk in self.chunks():
            spool.write(chunk)
        spool.seek(0)
        return spool  # type: ignore[return-value]

    def download(self, path: str | os.PathLike[str]) -> Path:
        """Write the content to ``path`` (a folder: the file's base name in it); written
        to a temporary name first, so a failed download leaves nothing half-written."""
        target = Path(path).expanduser()
        if target.is_dir():
            target = target / self.basename
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".jobcell-download-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in self.chunks():
                    handle.write(chunk)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return target

    def __fspath__(self) -> str:
        if self.path is None:
            raise FileRefError(f"file {self.name!r} has no local path (it is at {self.url}); "
                               "use read_bytes(), open() or download()")
        return self.path


def marker(name: str) -> dict[str, str]:
    """The JSON form of a file reference."""
    return {MARKER: name}


def marker_name(value: Any) -> str | None:
    """The name in a marker object, or None when ``value`` is not one."""
    if isinstance(value, dict) and len(value) == 1 and MARKER in value and \
            isinstance(value[MARKER], str):
        return value[MARKER]
    return None


def decode_value(value: Any, resolve: Callable[[str], FileRef]) -> Any:
    """``value`` with every marker object replaced by ``resolve(name)``."""
    name = marker_name(value)
    if name is not None:
        return resolve(name)
    if isinstance(value, list):
        return [decode_value(v, resolve) for v in value]
    if isinstance(value, dict):
        return {k: decode_value(v, resolve) for k, v in value.items()}
    return value


RESERVED = frozenset({"output.json"})   # the step's JSON value is written there


def _unique(output_dir: Path, name: str) -> Path:
    target = output_dir / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists() or target.name in RESERVED:
        target = output_dir / f"{stem}-{n}{suffix}"
        n += 1
    return target


def encode_returned(value: Any, output_dir: Path) -> Any:
    """Inside a runner: ``value`` with each returned ``FileRef`` / ``Path`` made a marker.

    A file already under ``output_dir`` is named by its relative path; any other is
    copied into ``output_dir`` first (under its base name, made unique).
    """
    if isinstance(value, (FileRef, os.PathLike)) and not isinstance(value, (str, bytes)):
        source = Path(os.fspath(value)).resolve()
        root = output_dir.resolve()
        if not source.is_file():
            raise FileRefError(f"the task returned {source}, which is not a regular file")
        if source.is_relative_to(root):
            name = source.relative_to(root).as_posix()
            if name in RESERVED:
                raise FileRefError(f"the task returned {source}: a returned file may not be "
                                   f"named {name!r} in the output folder (the step's JSON "
                                   "value is written there)")
            return marker(name)
        target = _unique(root, source.name)
        shutil.copyfile(source, target)
        return marker(target.relative_to(root).as_posix())
    if isinstance(value, (list, tuple)):
        return [encode_returned(v, output_dir) for v in value]
    if isinstance(value, dict):
        return {k: encode_returned(v, output_dir) for k, v in value.items()}
    return value


def is_file_annotation(annotation: Any) -> bool:
    """Whether a parameter annotation asks for a staged file (FileRef or a Path type)."""
    if annotation in ("FileRef", "Path", "pathlib.Path"):
        return True
    return isinstance(annotation, type) and issubclass(annotation, (FileRef, os.PathLike))


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (``Optional[X]``); else the annotation itself."""
    args = getattr(annotation, "__args__", None)
    if args and type(None) in args and len(args) == 2 and \
            getattr(annotation, "__origin__", None) is not list:
        return next(a for a in args if a is not type(None))
    return annotation


def file_kind(annotation: Any) -> tuple[str, Any] | None:
    """``("file", item)`` for a file annotation, ``("list", item)`` for a list of them
    (either optionally ``| None``), else None; ``item`` is the file type."""
    annotation = _without_none(annotation)
    if is_file_annotation(annotation):
        return "file", annotation
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is list and args and \
            is_file_annotation(_without_none(args[0])):
        return "list", _without_none(args[0])
    return None


def staged_name(param: str, basename: str, index: int | None = None) -> str:
    """The name a file given as param ``param`` is staged under: ``param/[index/]base``,
    with the base name made safe for a job spec (no backslash, control character or
    undecodable byte; at most 200 characters, keeping the extension)."""
    safe = "".join("_" if c == "\\" or ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF else c
                   for c in basename).strip() or "file"
    if safe in (".", ".."):
        safe = "file"
    if len(safe) > 200:
        stem, dot, ext = safe.rpartition(".")
        safe = (stem[: 200 - len(ext) - 1] + dot + ext) if dot and len(ext) < 20 \
            else safe[:200]
    return f"{param}/{safe}" if index is None else f"{param}/{index}/{safe}"


def staged_value(annotation: Any, name: str, input_dir: Path,
                 staged: frozenset[str] | set[str]) -> Any:
    """Inside a runner: the param value for the staged file ``name``, which must be one
    of the step's ``staged`` files (a param can never name another file)."""
    if name not in staged:
        raise FileRefError(f"the param value {name[:200]!r} is not a file staged for this "
                           "step (pass a FileRef or a path; the client stages it)")
    path = input_dir / name
    if (isinstance(annotation, type) and issubclass(annotation, FileRef)) or \
            annotation == "FileRef":
        return FileRef(name=name, path=str(path), size=path.stat().st_size
                       if path.exists() else None)
    return path


__all__ = ["MARKER", "FileRef", "FileRefError", "decode_value", "encode_returned",
           "file_kind", "is_file_annotation", "marker", "marker_name", "staged_name",
           "staged_value"]
