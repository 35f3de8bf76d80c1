"""Signed, expiring download URLs: HMAC-SHA256 over the path and the expiry time.

A signed URL is its own credential (it can be handed to a browser or another tool
without the bearer token), so it names one file and stops working at ``expires``.
The key lives in the cell home (``locks/url-signing.key``, mode 0600) and is created
on first use; deleting it revokes every URL handed out.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from jobcell.errors import ConfigError
from jobcell.home import CellHome

KEY_FILE = "url-signing.key"
_SIG = re.compile(r"[0-9a-f]{64}")


def load_signing_key(home: CellHome) -> bytes:
    """The cell's URL-signing key, created (atomically, 0600) when missing."""
    path = home.locks / KEY_FILE
    if not path.exists():
        temp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
            handle.flush()
            os.fsync(handle.fileno())   # never a linked, empty key after a crash
        try:
            os.link(temp, path)   # first writer wins; a racing server reads the winner's key
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    key = Path(path).read_bytes()
    if len(key) < 32:
        raise ConfigError(f"the URL-signing key {path} is damaged ({len(key)} bytes); delete "
                          "it and a new one is made (download URLs handed out stop working)")
    return key


class UrlSigner:
    """Signs and checks paths such as ``/api/v1/files/<job>/<step>/<name>``."""

    def __init__(self, key: bytes, ttl_s: float) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def _mac(self, path: str, expires: int) -> str:
        message = f"{path}\n{expires}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, now: float | None = None) -> tuple[str, int]:
        """``(path?expires=..&sig=.., expires)`` for a URL path (unquoted)."""
        expires = math.ceil((time.time() if now is None else now) + self.ttl_s)
        query = f"expires={expires}&sig={self._mac(path, expires)}"
        return f"{quote(path)}?{query}", expires

    def check(self, path: str, expires: str | None, sig: str | None,
              now: float | None = None) -> str | None:
        """None when the signature is valid and unexpired, else why it is refused."""
        if not expires or not sig:
            return "the download URL is not signed (ask the outputs or result endpoint " \
                   "for a fresh URL)"
        try:
            when = int(expires)
        except ValueError:
            return "the download URL's 'expires' is not a number"
        if not _SIG.fullmatch(sig) or not hmac.compare_digest(
                self._mac(path, when).encode(), sig.encode()):
            return "the download URL's signature does not match (tampered or from another " \
                   "cell)"
        if when < (time.time() if now is None else now):
            return "the download URL has expired; ask the outputs or result endpoint for a " \
                   "fresh one"
        return None
