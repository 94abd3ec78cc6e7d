"""The journal's file state machine: each transition, the failure kinds, the migration.

Fast unit tests on a real SQLite file, with a ManualClock for due times and for
the wait while the disk is full.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from pipeline import assert_counts_agree
from structlog.testing import capture_logs

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.core.errors import FatalError
from cpg_daemon.journal import (
    SCHEMA_VERSION,
    Discovered,
    FileRecord,
    FileState,
    Journal,
    lock_state_dir,
    read_uploads,
)
from cpg_daemon.journal.db import UNWRITABLE_RETRY

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def journal(tmp_path: Path, clock: ManualClock, anyio_backend: str) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "journal.sqlite3", clock)
    try:
        yield j
    finally:
        await j.close()
    assert_counts_agree(tmp_path / "journal.sqlite3")


def found(rel: str, size: int = 100, bucket: str = "bkt") -> Discovered:
    return Discovered(rel, bucket, f"dest/{rel}", size, 1_000)


async def row(journal: Journal, rel: str = "a") -> FileRecord:
    record = await journal.get("w", rel)
    assert record is not None
    return record


async def in_state(journal: Journal, state: FileState, rel: str = "a") -> FileRecord:
    """A file brought into ``state`` by the transitions a worker would use."""
    await journal.record_discovered("w", [found(rel)])
    if state != "queued":
        (claimed,) = await journal.claim(1)
        if state == "uploaded":
            await journal.mark_uploaded(claimed, etag='"e"', checksum_algorithm="C", checksum="c")
        elif state == "failed":
            await journal.mark_failed(claimed.id, "boom")
    return await row(journal, rel)


Transition = Callable[[Journal, FileRecord], Awaitable[object]]

TRANSITIONS: list[tuple[str, FileState, Transition, FileState | None]] = [
    ("claim", "queued", lambda j, r: j.claim(1), "uploading"),
    ("shift_due", "queued", lambda j, r: j.shift_due(60), "queued"),
    (
        "mark_uploaded",
        "uploading",
        lambda j, r: j.mark_uploaded(r, etag='"e"', checksum_algorithm="C", checksum="c"),
        "uploaded",
    ),
    ("mark_retry", "uploading", lambda j, r: j.mark_retry(r.id, "later", 0), "queued"),
    ("mark_failed", "uploading", lambda j, r: j.mark_failed(r.id, "boom"), "failed"),
    ("requeue", "uploading", lambda j, r: j.requeue(r.id), "queued"),
    ("requeue_changed", "uploading", lambda j, r: j.requeue_changed(r.id, 7, 8, 0), "queued"),
    ("reset_in_flight", "uploading", lambda j, r: j.reset_in_flight(), "queued"),
    ("forget", "uploading", lambda j, r: j.forget(r.id), None),
    ("retry_failed", "failed", lambda j, r: j.retry_failed(), "queued"),
    (
        "changed on disk",
        "uploaded",
        lambda j, r: j.record_discovered("w", [found("a", 5)]),
        "queued",
    ),
    ("changed on disk", "failed", lambda j, r: j.record_discovered("w", [found("a", 5)]), "queued"),
    (
        "changed while uploading",
        "uploading",
        lambda j, r: j.record_discovered("w", [found("a", 5)]),
        "uploading",
    ),
    ("record_rejected", "queued", lambda j, r: j.record_rejected("w", "a", "k", "no"), "failed"),
    ("record_rejected", "uploaded", lambda j, r: j.record_rejected("w", "a", "k", "no"), "failed"),
]


@pytest.mark.parametrize(
    ("before", "transition", "after"),
    [(before, transition, after) for _, before, transition, after in TRANSITIONS],
    ids=[f"{name}: {before}" for name, before, _, _ in TRANSITIONS],
)
async def test_each_transition_leads_to_its_state(
    journal: Journal, before: FileState, transition: Transition, after: FileState | None
) -> None:
    record = await in_state(journal, before)
    assert record.state == before
    await transition(journal, record)
    now = await journal.get("w", "a")
    assert (now and now.state) == after


async def test_a_new_file_is_queued_and_its_first_claim_sees_no_failure(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a")])
    (claimed,) = await journal.claim(1)
    assert (claimed.state, claimed.failure, claimed.keys_refused) == ("queued", None, False)


async def test_due_times_follow_the_injected_clock(journal: Journal, clock: ManualClock) -> None:
    record = await in_state(journal, "uploading")
    await journal.mark_retry(record.id, "later", clock.time() + 30)
    assert await journal.claim(1) == []
    assert await journal.next_due() == clock.time() + 30
    clock.advance(30)
    assert [r.id for r in await journal.claim(1)] == [record.id]


# -- failure kinds ---------------------------------------------------------------------


async def test_an_ordinary_error_is_of_kind_error(journal: Journal) -> None:
    record = await in_state(journal, "uploading")
    await journal.mark_retry(record.id, "connection reset", 0)
    again = await row(journal)
    assert (again.last_error, again.failure, again.keys_refused) == (
        "connection reset",
        "error",
        False,
    )


async def test_a_refusal_of_the_keys_is_remembered_until_another_error(journal: Journal) -> None:
    record = await in_state(journal, "uploading")
    await journal.requeue(record.id, "credentials: expired", failure="keys")
    (claimed,) = await journal.claim(1)
    assert claimed.keys_refused  # what the scheduler asks before counting an attempt
    await journal.requeue(claimed.id)  # put back (a drain): the refusal stays
    (claimed,) = await journal.claim(1)
    assert claimed.keys_refused and claimed.last_error == "credentials: expired"
    await journal.mark_retry(claimed.id, "credentials: refused again", 0, failure="keys")
    (claimed,) = await journal.claim(1)
    assert claimed.keys_refused and claimed.attempts == 1
    await journal.mark_retry(claimed.id, "timeout", 0)
    assert not (await row(journal)).keys_refused


async def test_a_file_failed_for_its_keys_keeps_that_through_retry(journal: Journal) -> None:
    record = await in_state(journal, "uploading")
    await journal.mark_failed(record.id, "credentials: refused (after 5 attempts)", failure="keys")
    assert await journal.retry_failed() == 1
    again = await row(journal)
    assert (again.state, again.attempts, again.keys_refused) == ("queued", 0, True)


async def test_upload_and_change_clear_the_failure(journal: Journal) -> None:
    record = await in_state(journal, "uploading")
    await journal.requeue(record.id, "credentials: expired", failure="keys")
    (claimed,) = await journal.claim(1)
    await journal.mark_uploaded(claimed, etag='"e"', checksum_algorithm="C", checksum="c")
    assert ((await row(journal)).failure, (await row(journal)).last_error) == (None, None)
    await journal.record_discovered("w", [found("b")])
    (b,) = await journal.claim(1)
    await journal.mark_failed(b.id, "boom")
    await journal.record_discovered("w", [found("b", size=5)])
    assert ((await row(journal, "b")).failure, (await row(journal, "b")).state) == (None, "queued")


@pytest.mark.parametrize("kind", ["rejected", "bad-name"])
async def test_a_refused_file_is_failed_with_its_kind_and_retry_leaves_it(
    journal: Journal, kind: Any
) -> None:
    await journal.record_rejected("w", "refused", "dest/refused", "kept out", kind)
    failed = await in_state(journal, "failed", "broken")
    assert failed.failure == "error"
    refused = await row(journal, "refused")
    assert (refused.state, refused.failure, refused.last_error) == ("failed", kind, "kept out")
    assert await journal.retry_failed() == 1  # only the one that failed uploading
    assert (await row(journal, "refused")).state == "failed"
    assert (await row(journal, "broken")).state == "queued"


async def test_a_refused_file_found_acceptable_later_is_queued(journal: Journal) -> None:
    """Say the folder rules were relaxed: the same file, same key, is now wanted."""
    await journal.record_rejected("w", "a", "dest/a", 'kept out by structure = "reject": x')
    assert await journal.record_discovered("w", [found("a")]) == 1
    queued = await row(journal)
    assert (queued.state, queued.failure, queued.last_error, queued.bucket) == (
        "queued",
        None,
        None,
        "bkt",
    )
    assert await journal.record_discovered("w", [found("a")]) == 0  # and only once


# -- the machinery -----------------------------------------------------------------------


async def test_a_full_disk_makes_a_write_wait_and_say_so_once(
    journal: Journal, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = journal._tx
    failures = [sqlite3.OperationalError("database or disk is full")] * 2

    def full_then_fine(work: Callable[[sqlite3.Connection], Any]) -> Any:
        if failures:
            raise failures.pop()
        return original(work)

    monkeypatch.setattr(journal, "_tx", full_then_fine)
    asleep = [anyio.Event()]
    manual_sleep = clock.sleep

    async def sleep(seconds: float) -> None:
        asleep[0].set()
        await manual_sleep(seconds)

    monkeypatch.setattr(clock, "sleep", sleep)
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.record_discovered, "w", [found("a")])
            await asleep[0].wait()
            assert journal.write_error is not None and "disk is full" in journal.write_error
            stats = await journal.statistics()
            assert stats.write_error == journal.write_error and stats.by_watch == {}
            asleep[0] = anyio.Event()
            clock.advance(UNWRITABLE_RETRY)  # fails again, waits again
            await asleep[0].wait()
            clock.advance(UNWRITABLE_RETRY)
    assert journal.write_error is None and (await row(journal)).state == "queued"
    assert [e["event"] for e in logs] == ["journal_unwritable", "journal_writable"]
    assert logs[1]["seconds_unwritable"] == 2 * UNWRITABLE_RETRY


# -- the migration from schema 1 ---------------------------------------------------------

SCHEMA_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, watch TEXT NOT NULL, rel_path BLOB NOT NULL, bucket TEXT NOT NULL,
    key TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, state TEXT NOT NULL,
    check_remote INTEGER NOT NULL DEFAULT 0, upload_id TEXT, upload_size INTEGER,
    upload_mtime_ns INTEGER, part_size INTEGER, checksum_algorithm TEXT, checksum TEXT,
    etag TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    not_before REAL NOT NULL DEFAULT 0, discovered_at REAL NOT NULL, updated_at REAL NOT NULL,
    uploaded_at REAL, UNIQUE (watch, rel_path)
);
CREATE INDEX files_by_state ON files (state, watch, not_before);
CREATE TABLE parts (
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    upload_id TEXT NOT NULL, part_number INTEGER NOT NULL, etag TEXT NOT NULL,
    checksum TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (file_id, upload_id, part_number)
);
CREATE TABLE batches (
    watch TEXT NOT NULL, name TEXT NOT NULL, destination TEXT NOT NULL, files INTEGER NOT NULL,
    bytes INTEGER NOT NULL, first_uploaded_at REAL NOT NULL, last_uploaded_at REAL NOT NULL,
    last_change REAL NOT NULL, completed_at REAL NOT NULL, hook_state TEXT NOT NULL,
    hook_detail TEXT, PRIMARY KEY (watch, name)
);
INSERT INTO meta VALUES ('schema', '1');
"""
"""The tables as cpg-daemon wrote them up to schema version 1 (the CREATE statements
of that version, columns joined on fewer lines)."""

OLD_ROWS = [
    # rel_path, bucket, state, last_error, etag
    ("structure", "", "failed", 'kept out by structure = "reject": no plate folder', None),
    ("bad name", "", "failed", "the key is longer than 1024 bytes", None),
    ("keys queued", "bkt", "queued", "credentials: ExpiredToken", None),
    ("keys failed", "bkt", "failed", "credentials: AccessDenied (after 5 attempts)", None),
    ("broken", "bkt", "failed", "permission denied (after 5 attempts)", None),
    ("waiting", "bkt", "queued", "connection reset", None),
    ("done", "bkt", "uploaded", None, '"e"'),
]


@pytest.fixture
def old_journal(tmp_path: Path) -> Path:
    """A journal written by a cpg-daemon of schema version 1."""
    path = tmp_path / "state" / "journal.sqlite3"
    path.parent.mkdir()
    with closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_1)
        db.executemany(
            "INSERT INTO files (watch, rel_path, bucket, key, size, mtime_ns, state, last_error, "
            "etag, checksum_algorithm, checksum, discovered_at, updated_at) "
            "VALUES ('w', ?, ?, 'dest/' || ?, 10, 20, ?, ?, ?, 'CRC32C', 'c', 1, 1)",
            [
                (rel.encode(), bucket, rel, state, error, etag)
                for rel, bucket, state, error, etag in OLD_ROWS
            ],
        )
        db.commit()
    return path


async def test_a_schema_1_journal_opens_with_its_failures_named(
    old_journal: Path, anyio_backend: str
) -> None:
    journal = await Journal.open(old_journal)
    try:
        rows = {r.rel_path: r for r in await journal.records()}
        assert {rel: (r.state, r.failure) for rel, r in rows.items()} == {
            "structure": ("failed", "rejected"),
            "bad name": ("failed", "bad-name"),
            "keys queued": ("queued", "keys"),
            "keys failed": ("failed", "keys"),
            "broken": ("failed", "error"),
            "waiting": ("queued", "error"),
            "done": ("uploaded", None),
        }
        assert rows["keys queued"].keys_refused and not rows["waiting"].keys_refused
        # retry leaves refused files alone, as it did by their empty bucket
        assert await journal.retry_failed() == 2
        assert (await journal.get("w", "structure")).state == "failed"  # type: ignore[union-attr]
        # and the journal keeps working
        await journal.record_discovered("w", [found("new")])
        assert {r.rel_path for r in await journal.claim(10)} >= {"new", "keys queued"}
    finally:
        await journal.close()
    with closing(sqlite3.connect(old_journal)) as db:
        assert db.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (
            str(SCHEMA_VERSION),
        )
    reopened = await Journal.open(old_journal)  # a migrated journal opens as it is
    await reopened.close()
    assert_counts_agree(old_journal)  # the files there before the migration are counted


async def test_statistics_read_a_few_rows_however_many_files_there_are(
    tmp_path: Path, anyio_backend: str
) -> None:
    """What status, metrics and STATUS= ask for costs the same at 20 files and 20,000:
    SQLite's own step counter, not a stopwatch (a loaded machine changes no count)."""
    path = tmp_path / "journal.sqlite3"
    journal = await Journal.open(path)
    calls = [0]

    def step() -> int:
        calls[0] += 1
        return 0  # go on

    def counting(on: bool) -> Callable[[sqlite3.Connection], None]:
        return lambda db: db.set_progress_handler(step if on else None, 100)

    steps = []
    try:
        for count in (20, 20_000):
            await journal.record_discovered("w", [found(f"{count}-{i}") for i in range(count)])
            calls[0] = 0
            await journal._read(counting(True))
            stats = await journal.statistics()
            await journal._read(counting(False))
            steps.append(calls[0])
            assert stats.total("queued").files == (20 if count == 20 else 20_020)
    finally:
        await journal.close()
    assert steps[1] <= steps[0] + 1, steps  # a GROUP BY over the files took ~2,000


async def test_a_journal_of_a_newer_schema_is_refused(
    old_journal: Path, anyio_backend: str
) -> None:
    with closing(sqlite3.connect(old_journal)) as db:
        db.execute("UPDATE meta SET value='99' WHERE name='schema'")
        db.commit()
    with pytest.raises(FatalError, match="has schema version 99"):
        await Journal.open(old_journal)


def test_the_state_dir_lock_admits_one_holder(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path / "state")
    try:
        with pytest.raises(FatalError, match="another cpg-daemon is already running"):
            lock_state_dir(tmp_path / "state")
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path / "state"))  # free again once closed


# -- the read-only reader (verify) -----------------------------------------------------


def test_the_reader_reads_uploads_of_any_schema_without_changing_it(old_journal: Path) -> None:
    before = old_journal.read_bytes()
    uploads = read_uploads(old_journal, "w")
    assert uploads is not None and list(uploads) == ["done"]
    done = uploads["done"]
    assert (done.key, done.size, done.mtime_ns, done.etag, done.checksum) == (
        "dest/done",
        10,
        20,
        '"e"',
        "c",
    )
    assert read_uploads(old_journal, "other watch") == {}
    assert old_journal.read_bytes() == before  # not migrated, not written


def test_the_reader_answers_none_for_a_missing_or_unreadable_journal(tmp_path: Path) -> None:
    assert read_uploads(tmp_path / "none.sqlite3", "w") is None
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    with capture_logs() as logs:
        assert read_uploads(garbage, "w") is None
    assert [e["event"] for e in logs] == ["journal_not_read"]
