"""Uploaded input files: streamed in, hashed with BLAKE3, stored once by content.

An upload is written chunk by chunk into a temporary file in the upload area (never
held in memory whole), hashed as it arrives, and then moved to its content address.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import blake3

from jobcell.errors import SpecError
from jobcell.home import CellHome
from jobcell.store import Store


class UploadTooLargeError(SpecError):
    """An upload went over the cell's size limit (option ``upload_max_mb``)."""


def too_large(max_bytes: int) -> UploadTooLargeError:
    """The error for an upload over ``max_bytes``."""
    return UploadTooLargeError(f"the upload is larger than the cell's limit of {max_bytes} "
                               "bytes (option upload_max_mb)")


class UploadWriter:
    """One upload in progress: :meth:`write` chunks, then :meth:`finish` (or :meth:`abort`).

    As a context manager it aborts unless finished, so nothing half-written is kept.
    """

    def __init__(self, home: CellHome, max_bytes: int) -> None:
        self.home = home
        self.max_bytes = max_bytes
        self.size = 0
        self._hasher = blake3.blake3()
        home.uploads.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=home.uploads)
        self._temp = Path(name)
        self._handle = os.fdopen(fd, "wb")
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Append one chunk; over the limit raises :class:`UploadTooLargeError`."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self._hasher.update(chunk)
        self._handle.write(chunk)

    def finish(self) -> tuple[str, int]:
        """Make the upload durable under its digest; answers ``(digest, size)``."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        digest = self._hasher.hexdigest()
        target = self.home.upload_path(digest)
        target.parent.mkdir(exist_ok=True)
        # Replace even when the digest is there: the fresh bytes are verified by their
        # hash, so a damaged copy is repaired by uploading again (atomic either way).
        self._temp.chmod(0o444)   # steps get copies; nothing may change the upload itself
        self._temp.replace(target)
        self._done = True
        return digest, self.size

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._done:
            self._handle.close()
            self._temp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> UploadWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


def store_upload(home: CellHome, store: Store, chunks: Iterable[bytes], owner: str,
                 max_bytes: int) -> dict[str, int | str]:
    """Write ``chunks`` into the cell's upload area; answer ``{"digest", "size"}``.

    The file lands under its BLAKE3 digest, read-only (steps get copies of it), and
    is recorded as an upload of ``owner``: a job may name only its owner's uploads. A
    body over ``max_bytes`` is refused (:class:`UploadTooLargeError`) and nothing is kept.
    """
    with UploadWriter(home, max_bytes) as writer:
        for chunk in chunks:
            writer.write(chunk)
        digest, size = writer.finish()
    store.record_upload(digest, owner, size, time.time())
    return {"digest": digest, "size": size}


class Upload:
    """An upload a front end feeds chunk by chunk (e.g. from an HTTP body as it arrives):
    :meth:`write`, then :meth:`finish` records it as ``owner``'s; :meth:`abort` (also
    after finish: then a no-op) drops a partial file."""

    def __init__(self, home: CellHome, store: Store, owner: str, max_bytes: int) -> None:
        self._writer = UploadWriter(home, max_bytes)
        self._store = store
        self.owner = owner

    def write(self, chunk: bytes) -> None:
        self._writer.write(chunk)

    def finish(self) -> dict[str, int | str]:
        digest, size = self._writer.finish()
        self._store.record_upload(digest, self.owner, size, time.time())
        return {"digest": digest, "size": size}

    def abort(self) -> None:
        self._writer.abort()

