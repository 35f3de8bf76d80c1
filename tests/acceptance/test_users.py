"""API users through the real command: ``jobcell users add | list | revoke``."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from .helpers import Cli, assert_clean_error


def _texts_in_database(db: Path) -> list[str]:
    """Every text and blob value of every table (WAL included: sqlite3 reads through it)."""
    conn = sqlite3.connect(db)
    try:
        values: list[str] = []
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # names from sqlite_master
                for value in row:
                    if isinstance(value, str):
                        values.append(value)
                    elif isinstance(value, bytes):
                        values.append(value.decode("utf-8", "replace"))
        return values
    finally:
        conn.close()


def test_add_prints_the_token_once_and_stores_only_its_hash(bare_cli: Cli) -> None:
    added = bare_cli.ok("users", "add", "alice")
    lines = added.stdout.strip().splitlines()
    token = lines[-1].strip()
    assert token.startswith("jc_") and len(token) > 40, str(added)
    assert "will not be shown again" in added.stdout
    assert "alice" in lines[0]

    listed = bare_cli.ok("users", "list")
    assert "alice" in listed.stdout and token not in listed.stdout
    as_json = bare_cli.run("users", "list", "--json")
    assert token not in as_json.stdout

    db = bare_cli.home / "state.db"
    texts = _texts_in_database(db)
    assert not [t for t in texts if token in t], "the token itself is stored"
    assert hashlib.sha256(token.encode()).hexdigest() in texts, "its hash is not stored"
    # Nor in any file of the home on disk (the database, its WAL, logs, keys...).
    for path in bare_cli.home.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"the token is in {path}"


def test_json_shapes_and_revoke(cli: Cli) -> None:
    alice = cli.json("users", "add", "alice")
    assert set(alice) == {"name", "token", "created_at"}
    assert alice["name"] == "alice" and alice["token"].startswith("jc_")
    assert alice["created_at"].endswith("Z")
    bob = cli.json("users", "add", "bob.smith@lab")
    assert bob["token"] != alice["token"]

    listed = cli.json("users", "list")
    assert [u["name"] for u in listed] == ["alice", "bob.smith@lab"]
    for user in listed:
        assert set(user) == {"name", "created_at", "revoked_at", "active"}
        assert user["active"] is True and user["revoked_at"] is None

    assert cli.json("users", "revoke", "alice") == {"name": "alice", "revoked": True}
    again = cli.json("users", "revoke", "alice")
    assert again == {"name": "alice", "revoked": False, "reason": "already revoked"}
    human = cli.ok("users", "revoke", "alice")
    assert "already revoked" in human.stdout

    after = {u["name"]: u for u in cli.json("users", "list")}
    assert after["alice"]["active"] is False and after["alice"]["revoked_at"].endswith("Z")
    assert after["bob.smith@lab"]["active"] is True
    table = cli.ok("users", "list").stdout
    assert "alice" in table and "bob.smith@lab" in table


def test_errors_are_one_clear_sentence(cli: Cli) -> None:
    cli.json("users", "add", "alice")
    results = cli.run_many({
        "duplicate": ["users", "add", "alice"],
        "duplicate_json": ["users", "add", "alice", "--json"],
        "bad_name": ["users", "add", "not a name!"],
        "too_long": ["users", "add", "x" * 65],
        "unknown": ["users", "revoke", "nobody"],
        "bad_revoke": ["users", "revoke", "../etc"],
    })
    assert_clean_error(results["duplicate"], "alice", "already exists")
    assert_clean_error(results["duplicate_json"], "already exists")
    assert_clean_error(results["bad_name"], "user name", "'not a name!'")
    assert_clean_error(results["too_long"], "1-64 characters")
    assert_clean_error(results["unknown"], "no user named 'nobody'")
    assert_clean_error(results["bad_revoke"], "user name")
    # A revoked user's name stays taken (their jobs stay theirs).
    cli.json("users", "revoke", "alice")
    assert_clean_error(cli.run("users", "add", "alice"), "already exists")


def test_empty_list(bare_cli: Cli) -> None:
    assert bare_cli.json("users", "list") == []
    assert "no users yet" in bare_cli.ok("users", "list").stdout
