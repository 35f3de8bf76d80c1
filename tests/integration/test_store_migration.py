"""A cell created by an older jobcell opens with this one: its schema is upgraded in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from jobcell.model.states import StepState
from jobcell.store.schema import MIGRATIONS
from jobcell.store.sqlite import SQLiteStore


def make_v1_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO jobs (job_id, label, owner, tags, priority, state, spec, spec_hash, "
        "created_at, updated_at) VALUES ('j1', 'imaging', 'alice', '[]', 0, 'succeeded', "
        "'{}', 'h', 1.0, 2.0)")
    conn.execute(
        "INSERT INTO steps (job_id, step_id, idx, runner, runner_hash, runner_def, params, "
        "inputs, input_layout, cache, cpu_slots, memory_mb, timeout_s, retries, state, "
        "priority, owner) VALUES ('j1', 's0', 0, 'r', 'rh', '{}', '{}', '[]', 'flat', 1, 1, "
        "100, 60, 0, 'succeeded', 0, 'alice')")
    conn.commit()
    conn.close()


def test_a_version_1_cell_is_upgraded_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_v1_database(path)
    store = SQLiteStore(path)
    try:
        assert store.schema_version() == len(MIGRATIONS) == 4
        job = store.get_job("j1")
        assert job is not None and job.label == "imaging"
        [step] = job.steps
        assert step.state == StepState.SUCCEEDED
        # Old steps join the step cache in their job's label; they have no key yet.
        assert (step.cache_ns, step.step_key, step.gpus) == ("imaging", None, None)
        # Old steps ran on the embedded executor; they have no backend recorded.
        assert (step.backend, step.backend_id) == (None, None)
        # Old steps were given no uploaded files and no resource profile.
        assert (step.files, step.profile) == ({}, None)
        assert store.users() == [] and store.open_deliveries() == []
        assert store.attempts("j1") == []
        assert store.cooldowns() == [] and store.file_hash("/x") is None
    finally:
        store.close()
    reopened = SQLiteStore(path)        # the second open only reads
    try:
        assert reopened.schema_version() == 4
    finally:
        reopened.close()
