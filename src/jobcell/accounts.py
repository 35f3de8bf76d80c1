"""API users and their bearer tokens. A token is shown once; only its SHA-256 is kept."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

from jobcell.errors import DuplicateError, NotFoundError, SpecError
from jobcell.store import ConflictError, Store

TOKEN_PREFIX = "jc_"
_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_user_name(name: str) -> str:
    """A user name is 1-64 of ``A-Z a-z 0-9 _ . @ -`` (it becomes the jobs' owner)."""
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
        raise SpecError(f"user name {str(name)[:80]!r} must be 1-64 characters of letters, "
                        "digits, '_', '.', '@' and '-'")
    return name


def token_hash(token: str) -> str:
    """The stored form of a token. Tokens are 256 random bits, so one SHA-256 suffices
    (nothing to brute-force) and lookups stay a single indexed read."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def add_user(store: Store, name: str) -> dict[str, Any]:
    """Create a user; answers ``{"name", "token", "created_at"}`` (the token only here)."""
    check_user_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    try:
        store.add_user(name, token_hash(token), now)
    except ConflictError:
        raise DuplicateError(f"a user named {name!r} already exists (revoked users keep "
                             "their name so their jobs stay theirs)") from None
    return {"name": name, "token": token, "created_at": now}


def list_users(store: Store) -> list[dict[str, Any]]:
    """Every user with when they were added and revoked (never a token)."""
    return [{"name": u.name, "created_at": u.created_at, "revoked_at": u.revoked_at,
             "active": u.revoked_at is None} for u in store.users()]


def revoke_user(store: Store, name: str) -> dict[str, Any]:
    """Revoke a user's token at once; their jobs stay."""
    check_user_name(name)
    if not store.revoke_user(name, time.time()):
        known = {u.name: u for u in store.users()}
        if name in known:
            return {"name": name, "revoked": False, "reason": "already revoked"}
        raise NotFoundError(f"no user named {name!r}")
    return {"name": name, "revoked": True}


def authenticate(store: Store, token: str) -> str | None:
    """The name of the active user holding ``token``, or None."""
    if not token or len(token) > 256:
        return None
    user = store.user_by_token_hash(token_hash(token))
    if user is None or user.revoked_at is not None:
        return None
    return user.name
