"""API users: tokens shown once, stored hashed, revocable; names checked."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from jobcell import accounts
from jobcell.errors import DuplicateError, NotFoundError, SpecError
from jobcell.store.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "state.db")


def test_a_token_authenticates_its_user_and_is_stored_only_as_a_hash(
        store: SQLiteStore, tmp_path: Path) -> None:
    added = accounts.add_user(store, "alice")
    token = added["token"]
    assert token.startswith(accounts.TOKEN_PREFIX) and len(token) > 40
    assert accounts.authenticate(store, token) == "alice"
    store.close()
    dump = "\n".join(sqlite3.connect(tmp_path / "state.db").iterdump())
    assert token not in dump
    assert accounts.token_hash(token) in dump


def test_tokens_differ_per_user_and_wrong_tokens_fail(store: SQLiteStore) -> None:
    alice = accounts.add_user(store, "alice")["token"]
    bob = accounts.add_user(store, "bob")["token"]
    assert alice != bob
    assert accounts.authenticate(store, bob) == "bob"
    for wrong in ("", alice[:-1], alice + "x", "jc_" + "A" * 43, "x" * 10_000):
        assert accounts.authenticate(store, wrong) is None


def test_revoking_stops_the_token_at_once_and_keeps_the_name(store: SQLiteStore) -> None:
    token = accounts.add_user(store, "alice")["token"]
    assert accounts.revoke_user(store, "alice") == {"name": "alice", "revoked": True}
    assert accounts.authenticate(store, token) is None
    again = accounts.revoke_user(store, "alice")
    assert again["revoked"] is False and "already" in again["reason"]
    with pytest.raises(DuplicateError, match="already exists"):
        accounts.add_user(store, "alice")
    [listed] = accounts.list_users(store)
    assert listed["name"] == "alice" and listed["active"] is False
    assert "token" not in listed and listed["revoked_at"] is not None


def test_unknown_users_and_bad_names_are_clear_errors(store: SQLiteStore) -> None:
    with pytest.raises(NotFoundError, match="no user named 'carol'"):
        accounts.revoke_user(store, "carol")
    for bad in ("", "a b", "x" * 65, "../etc", "al\nice", "ali;ce"):
        with pytest.raises(SpecError, match="user name"):
            accounts.add_user(store, bad)
    assert accounts.list_users(store) == []
