"""The journal's tables, and the step from each older schema to this one.

Version 1 kept two states out of sight: a failed row with an empty bucket was
a file refused at discovery (``retry`` skipped it), and a ``last_error``
starting with ``credentials:`` meant the keys had been refused for the file.
Version 2 says both in the ``failure`` column (files.py lists its values).
Version 3 keeps the number and bytes of files per watch and state in ``counts``,
maintained by triggers in the same transaction as every change of ``files``:
``status``, the metrics endpoint and systemd's ``STATUS=`` line read a few rows
instead of counting the whole journal (0.3 s of the journal's one thread per call
at 1,000,000 files, which an unprivileged scraper could repeat at will).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cpg_daemon.core.errors import FatalError

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL,
    rel_path BLOB NOT NULL,          -- os.fsencode() of the path below the watch root
    bucket TEXT NOT NULL,            -- '' for a file refused at discovery (no destination)
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,             -- queued, uploading, uploaded, failed (files.py)
    check_remote INTEGER NOT NULL DEFAULT 0,  -- look for an identical object before uploading
    upload_id TEXT,                  -- open multipart upload, journaled right after creation
    upload_size INTEGER,             -- size and mtime of the file that upload belongs to
    upload_mtime_ns INTEGER,
    part_size INTEGER,
    checksum_algorithm TEXT,
    checksum TEXT,                   -- whole-object checksum as S3 reports it
    etag TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    failure TEXT,                    -- what kind of failure last_error is (files.Failure)
    not_before REAL NOT NULL DEFAULT 0,
    discovered_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    uploaded_at REAL,
    UNIQUE (watch, rel_path)
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, watch, not_before);
CREATE TABLE IF NOT EXISTS parts (
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    upload_id TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    checksum TEXT NOT NULL,          -- base64 of the part's raw checksum ('' when none)
    size INTEGER NOT NULL,
    PRIMARY KEY (file_id, upload_id, part_number)
);
CREATE TABLE IF NOT EXISTS batches (  -- the last completion of each batch (batches.py)
    watch TEXT NOT NULL,
    name TEXT NOT NULL,              -- the top-level folder below the watch root
    destination TEXT NOT NULL,       -- s3://bucket/prefix/name/
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    first_uploaded_at REAL NOT NULL,
    last_uploaded_at REAL NOT NULL,
    last_change REAL NOT NULL,       -- latest updated_at of its files: a later one is news
    completed_at REAL NOT NULL,
    hook_state TEXT NOT NULL,        -- none, queued, running, ok or failed
    hook_detail TEXT,
    PRIMARY KEY (watch, name)
);
CREATE TABLE IF NOT EXISTS counts (  -- files per watch and state, kept by the triggers below
    watch TEXT NOT NULL,
    state TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (watch, state)
);
CREATE TRIGGER IF NOT EXISTS counts_insert AFTER INSERT ON files BEGIN
    INSERT INTO counts (watch, state, files, bytes) VALUES (NEW.watch, NEW.state, 1, NEW.size)
    ON CONFLICT (watch, state) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS counts_delete AFTER DELETE ON files BEGIN
    UPDATE counts SET files = files - 1, bytes = bytes - OLD.size
    WHERE watch = OLD.watch AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS counts_update AFTER UPDATE OF watch, state, size ON files
WHEN OLD.watch IS NOT NEW.watch OR OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size
BEGIN
    UPDATE counts SET files = files - 1, bytes = bytes - OLD.size
    WHERE watch = OLD.watch AND state = OLD.state;
    INSERT INTO counts (watch, state, files, bytes) VALUES (NEW.watch, NEW.state, 1, NEW.size)
    ON CONFLICT (watch, state) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;
"""

_FROM_1 = """
ALTER TABLE files ADD COLUMN failure TEXT;
UPDATE files SET failure = CASE
    WHEN state = 'failed' AND bucket = '' AND last_error LIKE 'kept out by structure%'
        THEN 'rejected'
    WHEN state = 'failed' AND bucket = '' THEN 'bad-name'
    WHEN last_error LIKE 'credentials:%' THEN 'keys'
    WHEN last_error IS NOT NULL THEN 'error'
END
WHERE last_error IS NOT NULL OR (state = 'failed' AND bucket = '');
"""
"""Version 1 to 2: the kinds of failure v1 told by the bucket and the error's text."""

_FROM_2 = """
DELETE FROM counts;
INSERT INTO counts (watch, state, files, bytes)
    SELECT watch, state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY watch, state;
"""
"""Version 2 to 3: the counts of the files already there (the triggers keep them since)."""

MIGRATIONS = {1: _FROM_1, 2: _FROM_2}
"""The script that takes a journal from a version to the next one."""


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new journal, or bring an older one up to ``SCHEMA_VERSION``.

    Each step runs in one transaction with the version it reaches, so a step
    cut short (a crash, a full disk) leaves the journal at the version before.
    """
    db.executescript(SCHEMA)
    row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        return
    version = int(row[0])
    while version < SCHEMA_VERSION and version in MIGRATIONS:
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[version]} "
                f"UPDATE meta SET value='{version + 1}' WHERE name='schema'; COMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        version += 1
    if version != SCHEMA_VERSION:
        raise FatalError(
            f"journal {path} has schema version {row[0]}, this cpg-daemon reads {SCHEMA_VERSION}"
        )
