"""Uploaded input files: streamed in, hashed with BLAKE3, stored once by content."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import blake3

from jobcell.errors import SpecError
from jobcell.home import CellHome
from jobcell.store import Store


def store_upload(home: CellHome, store: Store, chunks: Iterable[bytes], owner: str,
                 max_bytes: int) -> dict[str, int | str]:
    """Write ``chunks`` into the cell's upload area; answer ``{"digest", "size"}``.

    The file lands under its BLAKE3 digest, read-only (steps get hard links to it), and
    is recorded as an upload of ``owner``: a job may name only its owner's uploads. A
    body over ``max_bytes`` is refused and nothing is kept.
    """
    home.uploads.mkdir(parents=True, exist_ok=True)
    hasher = blake3.blake3()
    size = 0
    fd, temp_name = tempfile.mkstemp(prefix=".upload-", dir=home.uploads)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise SpecError(f"the upload is larger than the cell's limit of "
                                    f"{max_bytes} bytes (option upload_max_mb)")
                hasher.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        digest = hasher.hexdigest()
        target = home.upload_path(digest)
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            temp.unlink()
        else:
            temp.chmod(0o444)
            temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    store.record_upload(digest, owner, size, time.time())
    return {"digest": digest, "size": size}
