"""The journal: the queue and the memory of every file and part, across restarts."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pipeline import assert_counts_agree

from cpg_daemon.journal import Counts, Discovered, FileRecord, Journal, PartRecord

pytestmark = pytest.mark.anyio

MiB = 1024**2


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
async def journal(db_path: Path, anyio_backend: str) -> AsyncIterator[Journal]:
    j = await Journal.open(db_path)
    try:
        yield j
    finally:
        await j.close()
    assert_counts_agree(db_path)


def found(rel: str, size: int = 100, mtime_ns: int = 1_000, bucket: str = "bkt") -> Discovered:
    return Discovered(rel, bucket, f"dest/{rel}", size, mtime_ns)


async def only(journal: Journal, watch: str, rel: str) -> FileRecord:
    record = await journal.get(watch, rel)
    assert record is not None
    return record


async def upload(journal: Journal, watch: str, rel: str) -> FileRecord:
    """Claim a file and mark it uploaded, as a worker does."""
    claimed = await journal.claim(100)
    (record,) = [r for r in claimed if (r.watch, r.rel_path) == (watch, rel)]
    for other in claimed:
        if other is not record:
            await journal.requeue(other.id)
    assert await journal.mark_uploaded(
        record, etag='"e"', checksum_algorithm="CRC32C", checksum="c"
    )
    return await only(journal, watch, rel)


# -- discovery -----------------------------------------------------------------------


async def test_new_file_is_queued(journal: Journal) -> None:
    assert await journal.record_discovered("w", [found("a.tif", 123, 456)]) == 1
    record = await only(journal, "w", "a.tif")
    assert record.state == "queued"
    assert (record.bucket, record.key, record.size, record.mtime_ns) == (
        "bkt",
        "dest/a.tif",
        123,
        456,
    )
    assert record.attempts == 0
    assert await journal.get("w", "other.tif") is None
    assert await journal.get("other-watch", "a.tif") is None


async def test_record_discovered_is_idempotent(journal: Journal) -> None:
    assert await journal.record_discovered("w", [found("a.tif")]) == 1
    assert await journal.record_discovered("w", [found("a.tif")]) == 0
    assert await journal.record_discovered("w", [found("a.tif"), found("a.tif")]) == 0
    records = await journal.records()
    assert len(records) == 1
    assert records[0].state == "queued"
    assert len(await journal.claim(10)) == 1


async def test_same_path_in_two_watches_is_two_files(journal: Journal) -> None:
    await journal.record_discovered("w1", [found("a.tif")])
    await journal.record_discovered("w2", [found("a.tif")])
    assert len(await journal.records()) == 2
    assert len(await journal.records("w1")) == 1


async def test_unchanged_uploaded_file_stays_uploaded(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    await upload(journal, "w", "a.tif")
    assert await journal.record_discovered("w", [found("a.tif")]) == 0
    record = await only(journal, "w", "a.tif")
    assert record.state == "uploaded"
    assert await journal.claim(10) == []


@pytest.mark.parametrize(
    "changed",
    [
        found("a.tif", size=101),
        found("a.tif", mtime_ns=2_000),
        Discovered("a.tif", "bkt", "new-dest/a.tif", 100, 1_000),
        found("a.tif", bucket="other-bkt"),
    ],
    ids=["size", "mtime", "key", "bucket"],
)
async def test_changed_uploaded_file_is_queued_again(journal: Journal, changed: Discovered) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    before = await upload(journal, "w", "a.tif")
    assert before.checksum == "c"
    assert await journal.record_discovered("w", [changed]) == 1
    record = await only(journal, "w", "a.tif")
    assert record.state == "queued"
    assert (record.bucket, record.key, record.size, record.mtime_ns) == (
        changed.bucket,
        changed.key,
        changed.size,
        changed.mtime_ns,
    )
    assert record.checksum is None  # the old checksum describes the old content
    assert record.etag is None
    (claimed,) = await journal.claim(10)
    assert claimed.id == before.id


async def test_unchanged_failed_file_stays_failed(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    (record,) = await journal.claim(1)
    await journal.mark_failed(record.id, "denied")
    assert await journal.record_discovered("w", [found("a.tif")]) == 0
    assert (await only(journal, "w", "a.tif")).state == "failed"
    # but a new version of it gets a fresh start
    assert await journal.record_discovered("w", [found("a.tif", size=5)]) == 1
    record = await only(journal, "w", "a.tif")
    assert (record.state, record.attempts, record.last_error) == ("queued", 0, None)


# -- the queue -------------------------------------------------------------------------


async def test_claim_oldest_first_and_marks_uploading(journal: Journal) -> None:
    for name in ("first.tif", "second.tif", "third.tif"):
        await journal.record_discovered("w", [found(name)])
    claimed = await journal.claim(2)
    assert [r.rel_path for r in claimed] == ["first.tif", "second.tif"]
    assert all(r.state == "queued" for r in claimed)  # as they were when claimed
    for name in ("first.tif", "second.tif"):
        assert (await only(journal, "w", name)).state == "uploading"
    assert (await only(journal, "w", "third.tif")).state == "queued"
    assert [r.rel_path for r in await journal.claim(10)] == ["third.tif"]
    assert await journal.claim(10) == []  # nothing claimed twice


async def test_claim_takes_only_the_given_watches(journal: Journal) -> None:
    await journal.record_discovered("images", [found("a.tif")])
    await journal.record_discovered("illum", [found("b.npy")])
    await journal.record_discovered("profiles", [found("c.csv")])
    claimed = await journal.claim(10, watches=["illum", "gone"])
    assert [(r.watch, r.rel_path) for r in claimed] == [("illum", "b.npy")]
    assert (await only(journal, "images", "a.tif")).state == "queued"
    assert await journal.next_due(watches=["illum"]) is None
    assert await journal.claim(10, watches=[]) == []  # everything paused
    assert await journal.next_due() == 0
    claimed = await journal.claim(10)
    assert {r.watch for r in claimed} == {"images", "profiles"}


async def test_claim_skips_files_not_yet_due(journal: Journal) -> None:
    await journal.record_discovered("w", [found("later.tif"), found("now.tif")])
    later = await only(journal, "w", "later.tif")
    await journal.claim(10)
    due_at = time.time() + 3600
    await journal.mark_retry(later.id, "timeout", due_at)
    await journal.reset_in_flight()
    assert [r.rel_path for r in await journal.claim(10)] == ["now.tif"]
    assert await journal.claim(10) == []
    assert await journal.next_due() == pytest.approx(due_at)
    await journal.mark_retry(later.id, "timeout", time.time() - 1)
    assert [r.rel_path for r in await journal.claim(10)] == ["later.tif"]


async def test_reset_in_flight_requeues_what_was_uploading(db_path: Path, journal: Journal) -> None:
    await journal.record_discovered("w", [found("a"), found("b"), found("c")])
    await journal.claim(2)
    await upload(journal, "w", "c")
    # a crash: the process ends with a and b uploading; the next start resets them
    await journal.close()
    journal = await Journal.open(db_path)
    try:
        assert await journal.reset_in_flight() == 2
        states = {r.rel_path: r.state for r in await journal.records()}
        assert states == {"a": "queued", "b": "queued", "c": "uploaded"}
        assert {r.rel_path for r in await journal.claim(10)} == {"a", "b"}
    finally:
        await journal.close()


async def test_requeue_does_not_count_an_attempt(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a")])
    (record,) = await journal.claim(1)
    await journal.requeue(record.id)
    record = await only(journal, "w", "a")
    assert (record.state, record.attempts) == ("queued", 0)


# -- one file's progress -------------------------------------------------------------


async def test_multipart_progress_round_trip(journal: Journal) -> None:
    await journal.record_discovered("w", [found("big.tif", size=40 * MiB, mtime_ns=7)])
    (record,) = await journal.claim(1)
    await journal.start_upload(record.id, "upload-1", 16 * MiB, 40 * MiB, 7)
    saved = await only(journal, "w", "big.tif")
    assert (saved.upload_id, saved.part_size, saved.upload_size, saved.upload_mtime_ns) == (
        "upload-1",
        16 * MiB,
        40 * MiB,
        7,
    )
    third = PartRecord(3, '"e3"', "AAAAAw==", 8 * MiB)
    first = PartRecord(1, '"e1"', "AAAAAQ==", 16 * MiB)
    await journal.add_part(record.id, "upload-1", third)
    await journal.add_part(record.id, "upload-1", first)
    await journal.add_part(record.id, "upload-1", first)  # a retried part is recorded once
    assert await journal.parts(record.id, "upload-1") == [first, third]
    # a re-sent part replaces the earlier one
    first_again = PartRecord(1, '"e1b"', "AAAAAQ==", 16 * MiB)
    await journal.add_part(record.id, "upload-1", first_again)
    assert await journal.parts(record.id, "upload-1") == [first_again, third]
    # parts belong to their upload id
    assert await journal.parts(record.id, "upload-2") == []

    await journal.forget_upload(record.id)
    gone = await only(journal, "w", "big.tif")
    assert (gone.upload_id, gone.part_size, gone.upload_size, gone.upload_mtime_ns) == (
        None,
        None,
        None,
        None,
    )
    assert await journal.parts(record.id, "upload-1") == []


async def test_parts_survive_a_restart(db_path: Path, journal: Journal) -> None:
    await journal.record_discovered("w", [found("big.tif", size=40 * MiB)])
    (record,) = await journal.claim(1)
    await journal.start_upload(record.id, "upload-1", 16 * MiB, 40 * MiB, 1_000)
    part = PartRecord(1, '"e1"', "AAAAAQ==", 16 * MiB)
    await journal.add_part(record.id, "upload-1", part)
    await journal.close()
    journal = await Journal.open(db_path)
    try:
        await journal.reset_in_flight()
        (resumed,) = await journal.claim(1)
        assert resumed.upload_id == "upload-1"
        assert await journal.parts(resumed.id, "upload-1") == [part]
    finally:
        await journal.close()


async def test_mark_uploaded_records_the_object_and_clears_parts(journal: Journal) -> None:
    await journal.record_discovered("w", [found("big.tif", size=40 * MiB)])
    (record,) = await journal.claim(1)
    await journal.start_upload(record.id, "u", 16 * MiB, 40 * MiB, 1_000)
    await journal.add_part(record.id, "u", PartRecord(1, '"e1"', "x", 16 * MiB))
    done = await journal.mark_uploaded(
        record, etag='"abc-3"', checksum_algorithm="CRC32C", checksum="4waSgw=="
    )
    assert done is True
    saved = await only(journal, "w", "big.tif")
    assert saved.state == "uploaded"
    assert (saved.etag, saved.checksum_algorithm, saved.checksum) == (
        '"abc-3"',
        "CRC32C",
        "4waSgw==",
    )
    assert saved.upload_id is None
    assert await journal.parts(record.id, "u") == []


@pytest.mark.parametrize(
    "changed", [found("a.tif", size=200), found("a.tif", mtime_ns=9_999)], ids=["size", "mtime"]
)
async def test_mark_uploaded_false_when_file_changed_meanwhile(
    journal: Journal, changed: Discovered
) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    (record,) = await journal.claim(1)
    await journal.start_upload(record.id, "u", 16 * MiB, 100, 1_000)
    await journal.add_part(record.id, "u", PartRecord(1, '"e1"', "x", 100))
    # the watcher sees a new version while the worker is still uploading the old one
    assert await journal.record_discovered("w", [changed]) == 1
    assert (await only(journal, "w", "a.tif")).state == "uploading"  # stays with its worker
    done = await journal.mark_uploaded(
        record, etag='"e"', checksum_algorithm="CRC32C", checksum="c"
    )
    assert done is False
    saved = await only(journal, "w", "a.tif")
    assert saved.state != "uploaded"
    assert saved.checksum is None
    assert (saved.size, saved.mtime_ns) == (changed.size, changed.mtime_ns)
    assert await journal.parts(record.id, "u") == []


async def test_mark_uploaded_false_when_not_claimed(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    record = await only(journal, "w", "a.tif")  # queued, never claimed
    assert not await journal.mark_uploaded(
        record, etag='"e"', checksum_algorithm="CRC32C", checksum="c"
    )
    assert (await only(journal, "w", "a.tif")).state == "queued"


async def test_mark_retry_counts_attempts(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    for attempt in (1, 2, 3):
        (record,) = await journal.claim(1)
        await journal.mark_retry(record.id, f"error {attempt}", 0)
        saved = await only(journal, "w", "a.tif")
        assert saved.state == "queued"
        assert saved.attempts == attempt
        assert saved.last_error == f"error {attempt}"


async def test_mark_failed_then_retry_failed(journal: Journal) -> None:
    await journal.record_discovered("w1", [found("a.tif"), found("b.tif")])
    await journal.record_discovered("w2", [found("c.tif")])
    for record in await journal.claim(10):
        await journal.mark_retry(record.id, "slow", 0)
    for record in await journal.claim(10):
        await journal.mark_failed(record.id, "AccessDenied")
    failed = await only(journal, "w1", "a.tif")
    assert (failed.state, failed.attempts, failed.last_error) == ("failed", 2, "AccessDenied")
    assert await journal.claim(10) == []  # failed files are not retried by themselves

    assert await journal.retry_failed("w2") == 1
    assert (await only(journal, "w2", "c.tif")).state == "queued"
    assert (await only(journal, "w1", "a.tif")).state == "failed"
    assert await journal.retry_failed() == 2
    again = await only(journal, "w1", "a.tif")
    assert (again.state, again.attempts, again.not_before) == ("queued", 0, 0)
    assert len(await journal.claim(10)) == 3
    assert await journal.retry_failed() == 0


async def test_rejected_file_is_failed_with_its_reason(journal: Journal) -> None:
    await journal.record_rejected("w", "bad\nname.tif", "dest/bad\nname.tif", "control characters")
    await journal.record_rejected("w", "bad\nname.tif", "dest/bad\nname.tif", "control characters")
    (record,) = await journal.records()
    assert (record.state, record.last_error) == ("failed", "control characters")
    stats = await journal.statistics()
    assert stats.total("failed").files == 1
    assert await journal.claim(10) == []


async def test_requeue_changed(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif")])
    (record,) = await journal.claim(1)
    await journal.requeue_changed(record.id, 555, 9, time.time() + 3600)
    saved = await only(journal, "w", "a.tif")
    assert (saved.state, saved.size, saved.mtime_ns) == ("queued", 555, 9)
    assert await journal.claim(1) == []  # waits to settle again


async def test_forget_deletes_the_file_and_its_parts(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a.tif"), found("b.tif")])
    a = await only(journal, "w", "a.tif")
    await journal.start_upload(a.id, "u", 16 * MiB, 100, 1_000)
    await journal.add_part(a.id, "u", PartRecord(1, '"e1"', "x", 100))
    await journal.forget(a.id)
    assert await journal.get("w", "a.tif") is None
    assert [r.rel_path for r in await journal.records()] == ["b.tif"]
    assert await journal.parts(a.id, "u") == []
    # a file that comes back is new again
    assert await journal.record_discovered("w", [found("a.tif")]) == 1


# -- reading ---------------------------------------------------------------------------


async def test_statistics_per_watch_and_state(journal: Journal) -> None:
    await journal.record_discovered("images", [found("a", 10), found("b", 20), found("c", 40)])
    await journal.record_discovered("illum", [found("d", 1000)])
    await upload(journal, "images", "a")
    await journal.reset_in_flight()
    (b,) = [r for r in await journal.claim(10) if r.rel_path == "b"]
    await journal.mark_failed(b.id, "denied")
    await journal.reset_in_flight()
    (c,) = await journal.claim(1, watches=["images"])
    assert c.rel_path == "c"

    stats = await journal.statistics()
    assert stats.by_watch == {
        "images": {
            "uploaded": Counts(1, 10),
            "failed": Counts(1, 20),
            "uploading": Counts(1, 40),
        },
        "illum": {"queued": Counts(1, 1000)},
    }
    assert stats.total("queued") == Counts(1, 1000)
    assert stats.total("uploaded") == Counts(1, 10)
    assert stats.total("uploading") == Counts(1, 40)
    assert stats.total("failed") == Counts(1, 20)


async def test_statistics_of_an_empty_journal(journal: Journal) -> None:
    stats = await journal.statistics()
    assert stats.by_watch == {}
    assert stats.total("queued") == Counts(0, 0)


# -- the database file -----------------------------------------------------------------


async def test_database_is_in_wal_mode(db_path: Path, journal: Journal) -> None:
    await journal.record_discovered("w", [found("a")])
    with sqlite3.connect(db_path) as db:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
    db.close()
    assert mode == "wal"


async def test_non_utf8_file_names_round_trip(db_path: Path, journal: Journal) -> None:
    name = os.fsdecode(b"caf\xe9.tif")
    nested = os.fsdecode(b"plate\xff/A01.tif")
    assert name != nested
    # the key is whatever printable form the caller chose; the path is the name on disk
    await journal.record_discovered("w", [Discovered(name, "bkt", "dest/caf\\xe9.tif", 100, 1_000)])
    await journal.record_rejected("w", nested, "dest/plate\\xff/A01.tif", "not valid UTF-8")
    assert (await only(journal, "w", name)).rel_path == name
    assert (await only(journal, "w", nested)).state == "failed"
    assert [r.rel_path for r in await journal.claim(10)] == [name]
    # stored as the bytes on disk, so the file is recognised again after a restart
    await journal.close()
    journal = await Journal.open(db_path)
    try:
        records = {os.fsencode(r.rel_path) for r in await journal.records()}
        assert records == {b"caf\xe9.tif", b"plate\xff/A01.tif"}
        again = Discovered(name, "bkt", "dest/caf\\xe9.tif", 100, 1_000)
        assert await journal.record_discovered("w", [again]) == 0
    finally:
        await journal.close()


async def test_reopening_keeps_every_row(db_path: Path) -> None:
    first = await Journal.open(db_path)
    assert first.created is True
    await first.record_discovered("w", [found(f"f{i}.tif", size=i) for i in range(50)])
    await upload(first, "w", "f7.tif")
    await first.close()

    second = await Journal.open(db_path)
    try:
        assert second.created is False
        records = await second.records()
        assert len(records) == 50
        assert [r.rel_path for r in records] == [f"f{i}.tif" for i in range(50)]
        states = {r.rel_path: r.state for r in records}
        assert states["f7.tif"] == "uploaded"
        assert sum(s == "queued" for s in states.values()) == 49
        assert (await second.statistics()).total("queued").bytes == sum(range(50)) - 7
    finally:
        await second.close()


async def test_open_creates_missing_folders(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "a" / "b" / "journal.sqlite3"
    journal = await Journal.open(path)
    try:
        assert path.is_file()
        assert journal.created
    finally:
        await journal.close()


# -- group commit --------------------------------------------------------------------


async def test_many_files_finishing_at_once_each_get_their_own_answer(journal: Journal) -> None:
    """Concurrent mark_uploaded calls share transactions, not outcomes."""
    names = [f"plate/f{i:03d}.tif" for i in range(60)]
    await journal.record_discovered("w", [found(n) for n in names])
    claimed = {r.rel_path: r for r in await journal.claim(100)}
    changed = names[::7]  # these files change on disk while being uploaded
    await journal.record_discovered("w", [found(n, size=200) for n in changed])
    results: dict[str, bool] = {}

    async def finish(name: str) -> None:
        results[name] = await journal.mark_uploaded(
            claimed[name], etag=f'"{name}"', checksum_algorithm="CRC32C", checksum="c"
        )

    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(finish, name)
    journal._db.set_trace_callback(None)
    commits = statements.count("COMMIT")
    assert 1 <= commits <= len(names) // 4, commits  # grouped, not one commit per file
    assert results == {n: n not in changed for n in names}
    for name in names:
        record = await only(journal, "w", name)
        if name in changed:  # not uploaded: the worker re-queues it, as _process does
            assert (record.state, record.size, record.etag) == ("uploading", 200, None)
        else:
            assert (record.state, record.etag) == ("uploaded", f'"{name}"')


async def test_one_failing_call_in_a_group_leaves_the_others_done(journal: Journal) -> None:
    await journal.record_discovered("w", [found("a"), found("b")])
    a, b = sorted(await journal.claim(10), key=lambda r: r.rel_path)

    def broken(db: sqlite3.Connection) -> None:
        db.execute("UPDATE files SET state='failed' WHERE id=?", (b.id,))
        raise sqlite3.IntegrityError("this call fails after writing")

    outcomes: dict[str, object] = {}

    async def run(name: str, call: Any) -> None:
        try:
            outcomes[name] = await call()
        except sqlite3.IntegrityError as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            run,
            "first",
            lambda: journal.mark_uploaded(a, etag='"a"', checksum_algorithm="CRC32C", checksum="c"),
        )
        tg.start_soon(run, "broken", lambda: journal._grouped(broken))
        tg.start_soon(
            run,
            "last",
            lambda: journal.mark_uploaded(b, etag='"b"', checksum_algorithm="CRC32C", checksum="c"),
        )
    assert outcomes["first"] is True and outcomes["last"] is True
    assert isinstance(outcomes["broken"], sqlite3.IntegrityError)
    assert (await only(journal, "w", "a")).state == "uploaded"
    assert (await only(journal, "w", "b")).state == "uploaded"  # the failed write was undone
