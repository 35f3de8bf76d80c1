"""SQLite schema migrations. Each entry upgrades the schema by one version."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        owner TEXT NOT NULL,
        tags TEXT NOT NULL,
        priority INTEGER NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX jobs_label ON jobs (label, created_at);
    CREATE INDEX jobs_state ON jobs (state, created_at);
    CREATE INDEX jobs_owner ON jobs (owner, created_at);
    CREATE INDEX jobs_created ON jobs (created_at);
    CREATE INDEX jobs_spec_hash ON jobs (spec_hash, owner, created_at);
    CREATE INDEX jobs_cancel ON jobs (cancel_requested) WHERE cancel_requested = 1;
    CREATE TABLE job_tags (
        tag TEXT NOT NULL,
        job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
        PRIMARY KEY (tag, job_id)
    ) WITHOUT ROWID;
    CREATE INDEX job_tags_job ON job_tags (job_id);
    CREATE TABLE steps (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        runner TEXT NOT NULL,
        runner_hash TEXT NOT NULL,
        runner_def TEXT NOT NULL,
        params TEXT NOT NULL,
        inputs TEXT NOT NULL,
        input_layout TEXT NOT NULL,
        cache INTEGER NOT NULL,
        cpu_slots INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        retries INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        not_before REAL,
        started_at REAL,
        finished_at REAL,
        pid INTEGER,
        error TEXT,
        priority INTEGER NOT NULL,
        owner TEXT NOT NULL,
        UNIQUE (job_id, step_id)
    );
    CREATE INDEX steps_state ON steps (state, priority DESC, seq);
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        exit_code INTEGER,
        reason TEXT,
        pid INTEGER,
        memory_mb INTEGER,
        PRIMARY KEY (job_id, step_id, attempt)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        step_id TEXT,
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events (job_id, seq);
    CREATE TABLE outputs (
        job_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        name TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        blake3 TEXT NOT NULL,
        PRIMARY KEY (job_id, step_id, name)
    );
    CREATE TABLE scheduler_lock (
        name TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        pid INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    """,
    # version 2: GPU leases, step keys for the step cache, fair queue order, OOM cooldowns,
    # the file-hash memo
    """
    ALTER TABLE steps ADD COLUMN gpus TEXT;
    ALTER TABLE steps ADD COLUMN step_key TEXT;
    ALTER TABLE steps ADD COLUMN cache_ns TEXT NOT NULL DEFAULT '';
    UPDATE steps SET cache_ns = (SELECT label FROM jobs WHERE jobs.job_id = steps.job_id);
    CREATE INDEX steps_cache ON steps (step_key, cache_ns, state) WHERE step_key IS NOT NULL;
    CREATE INDEX steps_owner_queue ON steps (state, owner, priority DESC, seq);
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE cooldowns (
        group_name TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        job_id TEXT,
        step_id TEXT,
        started_at REAL NOT NULL,
        cooldown_until REAL NOT NULL,
        throttle_until REAL NOT NULL,
        throttle_max INTEGER NOT NULL
    );
    CREATE TABLE file_hashes (
        path TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        blake3 TEXT NOT NULL
    );
    """,
    # version 3: where a running attempt went (embedded, slurm, external) and its backend id
    """
    ALTER TABLE steps ADD COLUMN backend TEXT;
    ALTER TABLE steps ADD COLUMN backend_id TEXT;
    ALTER TABLE attempts ADD COLUMN backend TEXT;
    ALTER TABLE attempts ADD COLUMN backend_id TEXT;
    """,
    # version 4: the HTTP server's users and tokens, uploads, OGC subscriber callbacks;
    # per step the files it was given (uploads) and the resource profile chosen at submit
    """
    ALTER TABLE steps ADD COLUMN files TEXT;
    ALTER TABLE steps ADD COLUMN profile TEXT;
    CREATE INDEX jobs_owner_label ON jobs (owner, label, created_at, job_id);
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE uploads (
        digest TEXT NOT NULL,
        owner TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (digest, owner)
    ) WITHOUT ROWID;
    CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        uri TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'waiting',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL,
        last_error TEXT,
        delivered_at REAL,
        UNIQUE (job_id, kind)
    );
    -- what the callback sender reads every poll: the due rows whose time has come, and
    -- the waiting rows (the queries repeat these WHERE terms, so SQLite uses them)
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'due';
    CREATE INDEX deliveries_waiting ON deliveries (seq) WHERE state = 'waiting';
    """,
]
