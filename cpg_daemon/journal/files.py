"""The file state machine: each journal row is one file, in one of four states.

States (``FileState``) and the transitions between them, each one method below::

    (new)      record_discovered  -> queued      a settled file the journal did not have
    any        record_discovered  -> queued      its size, mtime, key or bucket changed, or it
                                                 had been refused (an uploading file keeps
                                                 its state: its worker sees the change)
    any        record_rejected    -> failed      refused at discovery (failure rejected/bad-name)
    queued     claim              -> uploading   due, handed to a worker
    queued     shift_due          -> queued      the wall clock was set: due times move with it
    uploading  mark_uploaded      -> uploaded    the object is complete
    uploading  mark_retry         -> queued      an attempt failed; tried again later
    uploading  mark_failed        -> failed      no more attempts
    uploading  requeue            -> queued      put back without counting an attempt
    uploading  requeue_changed    -> queued      the file changed under its upload
    uploading  reset_in_flight    -> queued      left uploading by a stop or a crash
    uploading  forget             -> (deleted)   the file vanished
    failed     retry_failed       -> queued      ``cpg-daemon retry`` (not refused files)

``failure`` says what kind of error ``last_error`` is (``Failure``); it is kept
and cleared with ``last_error``, so the scheduler can ask whether the keys were
refused for a file before (``FileRecord.keys_refused``) and ``retry`` can leave
refused files alone.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

from cpg_daemon.journal.db import Database

FileState = Literal["queued", "uploading", "uploaded", "failed"]
FILE_STATES: tuple[FileState, ...] = ("queued", "uploading", "uploaded", "failed")

Failure = Literal["error", "keys", "rejected", "bad-name"]
"""The kind of a file's last error.

- ``error``: an upload attempt failed (retried later while queued; ``retry`` re-queues it).
- ``keys``: S3 refused the keys (or none could be had) for this file.
- ``rejected``: the watch's folder rules (``structure = "reject"``) keep the file out.
- ``bad-name``: S3 cannot take the file's name as a key.
"""
FAILURES: tuple[Failure, ...] = ("error", "keys", "rejected", "bad-name")
Refusal = Literal["rejected", "bad-name"]
REFUSALS: tuple[Refusal, ...] = ("rejected", "bad-name")
"""Failures decided at discovery: the file cannot be uploaded as it is, so ``retry``
leaves it alone; it is queued again only when discovery finds it acceptable."""


@dataclass(frozen=True)
class Discovered:
    """A settled file found under a watch."""

    rel_path: str
    bucket: str
    key: str
    size: int
    mtime_ns: int
    check_remote: bool = False


@dataclass(frozen=True)
class FileRecord:
    """One row of the journal."""

    id: int
    watch: str
    rel_path: str
    bucket: str
    key: str
    size: int
    mtime_ns: int
    state: FileState
    check_remote: bool
    upload_id: str | None
    upload_size: int | None
    upload_mtime_ns: int | None
    part_size: int | None
    checksum_algorithm: str | None
    checksum: str | None
    etag: str | None
    attempts: int
    last_error: str | None
    failure: Failure | None
    """The kind of ``last_error`` (None when there is none)."""
    not_before: float
    updated_at: float

    @property
    def keys_refused(self) -> bool:
        """Whether the file's last error is a refusal of its keys (it was refused before)."""
        return self.failure == "keys"


@dataclass(frozen=True)
class PartRecord:
    number: int
    etag: str
    checksum: str
    size: int


@dataclass(frozen=True)
class Uploaded:
    """A file whose object is complete, as ``mark_uploaded`` records it."""

    record: FileRecord
    etag: str
    checksum_algorithm: str
    checksum: str


@dataclass(frozen=True)
class Counts:
    files: int
    bytes: int


@dataclass(frozen=True)
class JournalStatistics:
    """Files and bytes per watch and state."""

    by_watch: dict[str, dict[FileState, Counts]]
    path: str = ""
    write_error: str | None = None
    """Why the journal cannot be written just now; no new uploads start meanwhile."""
    write_error_since: float | None = None

    def total(self, state: FileState) -> Counts:
        files = sum(states[state].files for states in self.by_watch.values() if state in states)
        size = sum(states[state].bytes for states in self.by_watch.values() if state in states)
        return Counts(files, size)


_FIELDS = tuple(f.name for f in fields(FileRecord))
_COLUMNS = ", ".join(_FIELDS)
_REFUSED = f"failure IN ({', '.join(repr(r) for r in REFUSALS)})"
"""SQL: the row was refused at discovery."""


def _record(row: sqlite3.Row) -> FileRecord:
    values = {name: row[name] for name in _FIELDS}
    values["rel_path"] = os.fsdecode(row["rel_path"])
    values["check_remote"] = bool(row["check_remote"])
    return FileRecord(**values)


def _only(watches: Iterable[str] | None) -> tuple[str, tuple[str, ...]]:
    """An SQL condition (and its parameters) restricting rows to some watches."""
    if watches is None:
        return "", ()
    names = tuple(watches)
    return f"AND watch IN ({','.join('?' * len(names))})", names


class FileTable(Database):
    """The ``files`` and ``parts`` tables: one row per file, moved by named transitions."""

    # -- discovery -------------------------------------------------------------------

    async def record_discovered(self, watch: str, found: Sequence[Discovered]) -> int:
        """Reconcile settled files with the journal; returns how many were queued.

        A new file is queued. A known file whose size, mtime or key changed is
        queued again (even if it was uploaded: it must be uploaded again), and
        so is one refused at discovery before (it is acceptable now). A known,
        unchanged file keeps its state, failed included.
        """
        return await self._write(lambda db: self._record_discovered(db, watch, found))

    def _record_discovered(
        self, db: sqlite3.Connection, watch: str, found: Sequence[Discovered]
    ) -> int:
        now = self.clock.time()
        queued = 0
        for item in found:
            rel = os.fsencode(item.rel_path)
            row = db.execute(
                f"SELECT id, size, mtime_ns, key, bucket, {_REFUSED} AS refused FROM files "
                "WHERE watch=? AND rel_path=?",
                (watch, rel),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO files (watch, rel_path, bucket, key, size, mtime_ns, state, "
                    "check_remote, discovered_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (
                        watch,
                        rel,
                        item.bucket,
                        item.key,
                        item.size,
                        item.mtime_ns,
                        int(item.check_remote),
                        now,
                        now,
                    ),
                )
                queued += 1
            elif row["refused"] or (row["size"], row["mtime_ns"], row["key"], row["bucket"]) != (
                item.size,
                item.mtime_ns,
                item.key,
                item.bucket,
            ):
                db.execute(
                    # A file being uploaded right now stays with its worker, which sees the
                    # new size when it marks the upload done, and queues it again.
                    "UPDATE files SET size=?, mtime_ns=?, key=?, bucket=?, "
                    "state=CASE state WHEN 'uploading' THEN 'uploading' ELSE 'queued' END, "
                    "attempts=0, last_error=NULL, failure=NULL, not_before=0, checksum=NULL, "
                    "etag=NULL, uploaded_at=NULL, updated_at=? WHERE id=?",
                    (item.size, item.mtime_ns, item.key, item.bucket, now, row["id"]),
                )
                queued += 1
        return queued

    async def record_rejected(
        self, watch: str, rel_path: str, key: str, error: str, failure: Refusal = "rejected"
    ) -> None:
        """A file that can never be uploaded as it is (say, a name S3 cannot take): failed.

        ``failure`` says why (``REFUSALS``): ``retry`` and a restart leave such
        rows alone, and discovery queues the file once it is acceptable.
        """

        def work(db: sqlite3.Connection) -> None:
            now = self.clock.time()
            db.execute(
                "INSERT INTO files (watch, rel_path, bucket, key, size, mtime_ns, state, "
                "last_error, failure, discovered_at, updated_at) "
                "VALUES (?, ?, '', ?, 0, 0, 'failed', ?, ?, ?, ?) "
                "ON CONFLICT (watch, rel_path) DO UPDATE SET state='failed', bucket='', "
                "key=excluded.key, last_error=excluded.last_error, failure=excluded.failure, "
                "updated_at=excluded.updated_at",
                (watch, os.fsencode(rel_path), key, error, failure, now, now),
            )

        await self._write(work)

    # -- the queue -------------------------------------------------------------------

    async def claim(self, limit: int, watches: Iterable[str] | None = None) -> list[FileRecord]:
        """Up to ``limit`` queued files that are due, oldest first, now marked uploading.

        ``watches`` limits the claim to those watches (the ones configured and
        not paused); None means every watch.
        """
        only, names = _only(watches)

        def work(db: sqlite3.Connection) -> list[FileRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE state='queued' AND not_before<=? {only} "
                "ORDER BY not_before, id LIMIT ?",
                (self.clock.time(), *names, limit),
            ).fetchall()
            now = self.clock.time()
            db.executemany(
                "UPDATE files SET state='uploading', updated_at=? WHERE id=?",
                [(now, row["id"]) for row in rows],
            )
            return [_record(row) for row in rows]

        return await self._write(work)

    async def next_due(self, watches: Iterable[str] | None = None) -> float | None:
        """When the earliest queued file (of ``watches``, None = all) becomes due, or None."""
        only, names = _only(watches)

        def work(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                f"SELECT MIN(not_before) FROM files WHERE state='queued' {only}", names
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(work)

    async def reset_in_flight(self) -> int:
        """After a stop or crash: files left uploading go back to the queue (resumed later)."""

        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE files SET state='queued', updated_at=? WHERE state='uploading'",
                (self.clock.time(),),
            ).rowcount

        return await self._write(work)

    async def requeue(
        self, file_id: int, error: str | None = None, *, failure: Failure = "error"
    ) -> None:
        """Put an in-flight file back without counting an attempt (shutdown, credentials).

        ``error``, when given, is remembered as the file's last error, of kind ``failure``.
        """
        if error is None:
            await self._update(file_id, "state='queued'", ())
        else:
            await self._update(file_id, "state='queued', last_error=?, failure=?", (error, failure))

    async def retry_failed(self, watch: str | None = None) -> int:
        """Failed files back to the queue with fresh attempts (``cpg-daemon retry``).

        Files refused at discovery stay failed: trying again cannot change them.
        """

        def work(db: sqlite3.Connection) -> int:
            where = f"state='failed' AND NOT coalesce({_REFUSED}, 0)"
            args: tuple[object, ...] = (self.clock.time(),)
            if watch is not None:
                where += " AND watch=?"
                args += (watch,)
            return db.execute(
                f"UPDATE files SET state='queued', attempts=0, not_before=0, updated_at=? "
                f"WHERE {where}",
                args,
            ).rowcount

        return await self._write(work)

    # -- one file's progress -----------------------------------------------------------

    async def _update(self, file_id: int, assignments: str, args: tuple[object, ...]) -> int:
        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                f"UPDATE files SET {assignments}, updated_at=? WHERE id=?",
                (*args, self.clock.time(), file_id),
            ).rowcount

        return await self._write(work)

    async def start_upload(
        self, file_id: int, upload_id: str, part_size: int, size: int, mtime_ns: int
    ) -> None:
        """Remember a new multipart upload the moment it exists, so it is never orphaned."""
        await self._update(
            file_id,
            "upload_id=?, part_size=?, upload_size=?, upload_mtime_ns=?",
            (upload_id, part_size, size, mtime_ns),
        )

    async def forget_upload(self, file_id: int) -> None:
        """The multipart upload was completed, aborted or lost: drop it and its parts."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM parts WHERE file_id=?", (file_id,))
            db.execute(
                "UPDATE files SET upload_id=NULL, upload_size=NULL, upload_mtime_ns=NULL, "
                "part_size=NULL, updated_at=? WHERE id=?",
                (self.clock.time(), file_id),
            )

        await self._write(work)

    async def add_part(self, file_id: int, upload_id: str, part: PartRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO parts (file_id, upload_id, part_number, etag, checksum, "
                "size) VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, upload_id, part.number, part.etag, part.checksum, part.size),
            )

        await self._grouped(work)

    async def parts(self, file_id: int, upload_id: str) -> list[PartRecord]:
        def work(db: sqlite3.Connection) -> list[PartRecord]:
            rows = db.execute(
                "SELECT part_number, etag, checksum, size FROM parts "
                "WHERE file_id=? AND upload_id=? ORDER BY part_number",
                (file_id, upload_id),
            ).fetchall()
            return [PartRecord(r["part_number"], r["etag"], r["checksum"], r["size"]) for r in rows]

        return await self._read(work)

    async def mark_uploaded(
        self,
        record: FileRecord,
        *,
        etag: str,
        checksum_algorithm: str,
        checksum: str,
    ) -> bool:
        """The object is complete. False when the row changed meanwhile (file re-queued).

        A row changes under an upload when the file changed, or when a reload
        gave its watch another destination (the object went to the old key).
        """
        return await self._grouped(
            lambda db: self._uploaded(db, Uploaded(record, etag, checksum_algorithm, checksum))
        )

    async def mark_uploaded_many(self, done: Sequence[Uploaded]) -> list[bool]:
        """``mark_uploaded`` for several files, in one trip to the journal's thread."""
        return await self._grouped(lambda db: [self._uploaded(db, one) for one in done])

    def _uploaded(self, db: sqlite3.Connection, done: Uploaded) -> bool:
        record = done.record
        now = self.clock.time()
        changed = db.execute(
            "UPDATE files SET state='uploaded', etag=?, checksum_algorithm=?, checksum=?, "
            "upload_id=NULL, upload_size=NULL, upload_mtime_ns=NULL, part_size=NULL, "
            "check_remote=0, last_error=NULL, failure=NULL, uploaded_at=?, updated_at=? "
            "WHERE id=? AND state='uploading' AND size=? AND mtime_ns=? AND bucket=? "
            "AND key=?",
            (
                done.etag,
                done.checksum_algorithm,
                done.checksum,
                now,
                now,
                record.id,
                record.size,
                record.mtime_ns,
                record.bucket,
                record.key,
            ),
        ).rowcount
        # The upload is complete either way: it is no longer an open upload.
        db.execute(
            "UPDATE files SET upload_id=NULL, upload_size=NULL, upload_mtime_ns=NULL, "
            "part_size=NULL WHERE id=?",
            (record.id,),
        )
        db.execute("DELETE FROM parts WHERE file_id=?", (record.id,))
        return changed == 1

    async def shift_due(self, seconds: float) -> int:
        """Move every queued file's due time by ``seconds``, as the clock just moved.

        A file that was due stays due, one that was waiting waits as long as it
        would have. Returns how many files moved.
        """

        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE files SET not_before=not_before+? WHERE state='queued' AND not_before>0",
                (seconds,),
            ).rowcount

        return await self._write(work)

    async def mark_retry(
        self, file_id: int, error: str, not_before: float, *, failure: Failure = "error"
    ) -> None:
        """A failed attempt (of kind ``failure``) that will be tried again after ``not_before``."""
        await self._update(
            file_id,
            "state='queued', attempts=attempts+1, last_error=?, failure=?, not_before=?",
            (error, failure, not_before),
        )

    async def mark_failed(self, file_id: int, error: str, *, failure: Failure = "error") -> None:
        """No more attempts: failed, visible, until ``retry``."""
        await self._update(
            file_id,
            "state='failed', attempts=attempts+1, last_error=?, failure=?",
            (error, failure),
        )

    async def requeue_changed(
        self, file_id: int, size: int, mtime_ns: int, not_before: float
    ) -> None:
        """The file changed under us: queue it again with its new size and mtime."""
        await self._update(
            file_id,
            "state='queued', size=?, mtime_ns=?, not_before=?",
            (size, mtime_ns, not_before),
        )

    async def forget(self, file_id: int) -> None:
        """The file vanished before it was uploaded: it is no longer ours to upload."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM files WHERE id=?", (file_id,))

        await self._write(work)

    # -- reading ---------------------------------------------------------------------

    async def get_by_id(self, file_id: int) -> FileRecord | None:
        def work(db: sqlite3.Connection) -> FileRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM files WHERE id=?", (file_id,)).fetchone()
            return None if row is None else _record(row)

        return await self._read(work)

    async def get(self, watch: str, rel_path: str) -> FileRecord | None:
        def work(db: sqlite3.Connection) -> FileRecord | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE watch=? AND rel_path=?",
                (watch, os.fsencode(rel_path)),
            ).fetchone()
            return None if row is None else _record(row)

        return await self._read(work)

    async def records(self, watch: str | None = None) -> list[FileRecord]:
        def work(db: sqlite3.Connection) -> list[FileRecord]:
            if watch is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM files WHERE watch=? ORDER BY id", (watch,)
                ).fetchall()
            return [_record(row) for row in rows]

        return await self._read(work)

    async def statistics(self) -> JournalStatistics:
        def work(db: sqlite3.Connection) -> JournalStatistics:
            by_watch: dict[str, dict[FileState, Counts]] = {}
            for row in db.execute(  # kept by triggers (schema.py): a few rows, not a count
                "SELECT watch, state, files, bytes FROM counts WHERE files > 0"
            ):
                by_watch.setdefault(row["watch"], {})[row["state"]] = Counts(
                    row["files"], row["bytes"]
                )
            return JournalStatistics(
                by_watch, str(self.path), self.write_error, self.write_error_since
            )

        return await self._read(work)
