"""The journal: one SQLite database (WAL) that remembers every file and every part.

It is the single source of truth for what is queued, in flight, uploaded or
failed, and the queue itself: workers claim the next file from it, so memory
does not grow with the number of queued files. One connection, used only from
one worker thread at a time (never on the event loop). Each state change is one
short transaction and is idempotent: doing it twice leaves the same row.

When the journal cannot be written (the disk holding the state directory is
full, or answers with I/O errors) a change is not lost and the daemon does not
stop: the transaction is rolled back and the call waits, trying again every few
seconds, until the write succeeds. While it waits nothing new is claimed, so
the daemon takes no new work; ``write_error`` says why, for status and logs.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Generic, Literal, ParamSpec, TypeVar, cast

import anyio
import anyio.to_thread
import structlog

from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.threads import Threads

FileState = Literal["queued", "uploading", "uploaded", "failed"]
FILE_STATES: tuple[FileState, ...] = ("queued", "uploading", "uploaded", "failed")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL,
    rel_path BLOB NOT NULL,          -- os.fsencode() of the path below the watch root
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
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
"""

P = ParamSpec("P")
T = TypeVar("T")

log = structlog.get_logger(__name__)

UNWRITABLE_RETRY = 5.0
"""Seconds between attempts to write a journal whose disk is full or failing."""
_UNWRITABLE_CODES = (13, 10)
"""SQLITE_FULL and SQLITE_IOERR (primary result codes)."""
_UNWRITABLE_MESSAGES = ("database or disk is full", "disk i/o error")


_DAMAGED_CODES = (11, 26)
"""SQLITE_CORRUPT and SQLITE_NOTADB."""
RECOVER_HINT = (
    "Recover with `cpg-daemon recover-journal` (give it the daemon's -c CONFIG): it moves "
    "the damaged file aside, and the next start lists each destination on S3, so files "
    "already uploaded are not sent again"
)


def _says(exc: BaseException, codes: tuple[int, ...], messages: tuple[str, ...]) -> bool:
    """Whether an SQLite error has one of these primary result codes (or, before
    Python 3.11, which does not give the code, one of these messages)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+: the extended result code
    if code is not None:
        return code & 0xFF in codes
    return any(m in str(exc).lower() for m in messages)


def _damaged(exc: BaseException) -> bool:
    """Whether ``exc`` says the journal file is corrupt or not a database at all."""
    return isinstance(exc, sqlite3.DatabaseError) and _says(
        exc, _DAMAGED_CODES, ("malformed", "not a database")
    )


def _problems(rows: list[Any]) -> str:
    """An integrity check's answer as one line: ``ok``, or the problems it lists."""
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows)


def damaged_error(path: Path, problem: object) -> FatalError:
    return FatalError(f"the journal {path} is damaged ({problem}). {RECOVER_HINT}")


def check_integrity(path: Path) -> str:
    """``ok``, or the first problem SQLite's full integrity check finds in the journal."""
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            rows = db.execute("PRAGMA integrity_check(10)").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return _problems(rows)


def move_aside(path: Path, suffix: str) -> Path:
    """Rename the journal and its -wal/-shm files to ``<name><suffix>``; returns the new path."""
    for extra in ("-wal", "-shm"):
        companion = path.with_name(path.name + extra)
        if companion.exists():
            companion.rename(path.with_name(path.name + suffix + extra))
    target = path.with_name(path.name + suffix)
    path.rename(target)
    return target


def _unwritable(exc: BaseException) -> bool:
    """Whether ``exc`` says the journal's disk is full or failing (not a bug, not corruption)."""
    return isinstance(exc, sqlite3.OperationalError) and _says(
        exc, _UNWRITABLE_CODES, _UNWRITABLE_MESSAGES
    )


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
    not_before: float
    updated_at: float


@dataclass(frozen=True)
class PartRecord:
    number: int
    etag: str
    checksum: str
    size: int


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


@dataclass(frozen=True)
class BatchRecord:
    """A batch's completion, as remembered in the ``batches`` table."""

    watch: str
    name: str
    destination: str
    files: int
    bytes: int
    first_uploaded_at: float
    last_uploaded_at: float
    last_change: float
    completed_at: float
    hook_state: str
    hook_detail: str | None = None


@dataclass(frozen=True)
class BatchProgress:
    """The files of one batch (a top-level folder of a watch) as the journal has them."""

    files: int
    uploaded: int
    bytes: int
    first_uploaded_at: float | None
    last_uploaded_at: float | None
    last_change: float | None
    """The latest ``updated_at`` of its files."""
    recorded: BatchRecord | None
    """Its last recorded completion, if any."""


_BATCH_COLUMNS = (
    "watch, name, destination, files, bytes, first_uploaded_at, last_uploaded_at, last_change, "
    "completed_at, hook_state, hook_detail"
)


def _batch_range(name: str) -> tuple[bytes, bytes]:
    """Bounds of the rel_paths under a top-level folder: ``name/`` <= rel_path < ``name0``.

    ``0`` is the byte after ``/``, so the range is exactly the folder's files,
    and one range scan of the (watch, rel_path) index finds them.
    """
    folder = os.fsencode(name)
    return folder + b"/", folder + b"0"


_COLUMNS = (
    "id, watch, rel_path, bucket, key, size, mtime_ns, state, check_remote, upload_id, "
    "upload_size, upload_mtime_ns, part_size, checksum_algorithm, checksum, etag, attempts, "
    "last_error, not_before, updated_at"
)


def _only(watches: Iterable[str] | None) -> tuple[str, tuple[str, ...]]:
    """An SQL condition (and its parameters) restricting rows to some watches."""
    if watches is None:
        return "", ()
    names = tuple(watches)
    return f"AND watch IN ({','.join('?' * len(names))})", names


def _record(row: Sequence[object]) -> FileRecord:
    values = list(row)
    values[2] = os.fsdecode(cast("bytes", values[2]))
    values[8] = bool(values[8])
    return FileRecord(*values)  # type: ignore[arg-type]


class _Grouped(Generic[T]):
    """One call waiting in the journal's group commit."""

    __slots__ = ("error", "finished", "value", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], T]) -> None:
        self.work = work
        self.value: T | None = None
        self.error: Exception | None = None
        self.finished = False

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


class Journal:
    """The SQLite journal. Open it with ``await Journal.open(path)``."""

    def __init__(self, connection: sqlite3.Connection, path: Path, created: bool) -> None:
        self._db = connection
        self.path = path
        self.created = created
        """True when this run created the journal (first start, or the old one was lost)."""
        self._lock = threading.Lock()
        self._thread = Threads("cpg-journal", 1)
        """One thread: SQLite work runs one call at a time, in order."""
        self._group: list[_Grouped[Any]] = []
        self._group_lock = anyio.Lock()
        self.write_error: str | None = None
        """Why the journal cannot be written just now (None: it can)."""
        self.write_error_since: float | None = None

    @classmethod
    async def open(cls, path: Path) -> Journal:
        return await anyio.to_thread.run_sync(cls.open_sync, path)

    @classmethod
    def open_sync(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise FatalError(
                    f"journal {path} has schema version {row[0]}, this cpg-daemon reads "
                    f"{SCHEMA_VERSION}"
                )
            # About 0.5 s per million files: cheap next to uploading from a damaged queue.
            problems = _problems(db.execute("PRAGMA quick_check(10)").fetchall())
            if problems != "ok":
                raise damaged_error(path, problems)
        except sqlite3.DatabaseError as exc:
            if _damaged(exc):
                raise damaged_error(path, exc) from exc
            raise FatalError(f"cannot open the journal {path}: {exc}") from exc
        return cls(db, path, created)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown()

    async def _run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def call() -> T:
            with self._lock:
                try:
                    return func(*args, **kwargs)
                except sqlite3.DatabaseError as exc:
                    if _damaged(exc):
                        raise damaged_error(self.path, exc) from exc
                    raise

        return await self._thread.run(call)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in a transaction of its own, waiting while the journal is unwritable."""
        while True:
            try:
                result = await self._run(self._tx, work)
            except sqlite3.OperationalError as exc:
                if not _unwritable(exc):
                    raise
                await self._wait_writable(exc)  # rolled back: safe to run again
                continue
            self._writable()
            return result

    async def _wait_writable(self, exc: BaseException) -> None:
        """A write failed for want of space (or an I/O error): say so once, then wait."""
        if self.write_error is None:
            self.write_error = f"cannot write the journal {self.path}: {exc}"
            self.write_error_since = time.time()
            log.error(
                "journal_unwritable",
                journal=str(self.path),
                error=str(exc),
                hint=f"free space on the disk holding {self.path.parent}; no new uploads "
                "start until the journal can be written, then they resume by themselves",
            )
        await anyio.sleep(UNWRITABLE_RETRY)

    def _writable(self) -> None:
        if self.write_error is not None:
            log.warning(
                "journal_writable",
                journal=str(self.path),
                seconds_unwritable=round(time.time() - (self.write_error_since or time.time())),
            )
            self.write_error = None
            self.write_error_since = None

    async def _grouped(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one transaction with the other grouped calls that queued meanwhile.

        Group commit: while one group runs in the journal's thread, later calls
        queue up, and the first of them then runs them all in one transaction,
        each in a savepoint of its own (one that fails changes nothing of the
        others). With thousands of small files finishing, that saves a trip to
        the thread and a commit per file. Shielded, like every journal call: a
        cancelled caller's work is still done, or reported failed, never half done.
        """
        while True:
            entry = _Grouped(work)
            self._group.append(entry)
            with anyio.CancelScope(shield=True):
                async with self._group_lock:
                    if not entry.finished:
                        group, self._group = self._group, []
                        await self._run(self._tx_group, group)
            if entry.error is None or not _unwritable(entry.error):
                if entry.error is None:
                    self._writable()
                elif _damaged(entry.error):
                    raise damaged_error(self.path, entry.error) from entry.error
                return entry.result()
            await self._wait_writable(entry.error)  # its savepoint was rolled back

    def _tx_group(self, group: list[_Grouped[Any]]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for entry in group:
                db.execute("SAVEPOINT grouped")
                try:
                    entry.value = entry.work(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO grouped")
                    entry.error = exc
                db.execute("RELEASE grouped")
            db.execute("COMMIT")
        except Exception as exc:  # the transaction itself failed (disk full, I/O error)
            if db.in_transaction:
                db.execute("ROLLBACK")
            for entry in group:
                entry.error = exc
        finally:
            for entry in group:
                entry.finished = True

    def _tx(self, func: Callable[[sqlite3.Connection], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = func(self._db)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                self._db.execute("ROLLBACK")
            raise
        return result

    # -- discovery -------------------------------------------------------------------

    async def record_discovered(self, watch: str, found: Sequence[Discovered]) -> int:
        """Reconcile settled files with the journal; returns how many were queued.

        A new file is queued. A known file whose size, mtime or key changed is
        queued again (even if it was uploaded: it must be uploaded again). A
        known, unchanged file keeps its state, failed included.
        """
        return await self._write(lambda db: self._record_discovered(db, watch, found))

    @staticmethod
    def _record_discovered(db: sqlite3.Connection, watch: str, found: Sequence[Discovered]) -> int:
        now = time.time()
        queued = 0
        for item in found:
            rel = os.fsencode(item.rel_path)
            row = db.execute(
                "SELECT id, size, mtime_ns, key, bucket, state FROM files "
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
            elif (row[1], row[2], row[3], row[4]) != (
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
                    "attempts=0, last_error=NULL, not_before=0, checksum=NULL, etag=NULL, "
                    "uploaded_at=NULL, updated_at=? WHERE id=?",
                    (item.size, item.mtime_ns, item.key, item.bucket, now, row[0]),
                )
                queued += 1
        return queued

    async def record_rejected(self, watch: str, rel_path: str, key: str, error: str) -> None:
        """A file that can never be uploaded as it is (say, a name S3 cannot take): failed.

        The empty bucket marks it: ``retry`` and a restart leave such rows alone.
        """

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "INSERT INTO files (watch, rel_path, bucket, key, size, mtime_ns, state, "
                "last_error, discovered_at, updated_at) VALUES (?, ?, '', ?, 0, 0, 'failed', ?, "
                "?, ?) ON CONFLICT (watch, rel_path) DO UPDATE SET state='failed', bucket='', "
                "key=excluded.key, last_error=excluded.last_error, "
                "updated_at=excluded.updated_at",
                (watch, os.fsencode(rel_path), key, error, now, now),
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
                (time.time(), *names, limit),
            ).fetchall()
            now = time.time()
            db.executemany(
                "UPDATE files SET state='uploading', updated_at=? WHERE id=?",
                [(now, row[0]) for row in rows],
            )
            return [_record(row) for row in rows]

        return await self._write(work)

    async def next_due(self, watches: Iterable[str] | None = None) -> float | None:
        """When the earliest queued file (of ``watches``, None = all) becomes due, or None."""
        only, names = _only(watches)

        def work() -> float | None:
            row = self._db.execute(
                f"SELECT MIN(not_before) FROM files WHERE state='queued' {only}", names
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(work)

    async def reset_in_flight(self) -> int:
        """After a stop or crash: files left uploading go back to the queue (resumed later)."""

        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE files SET state='queued', updated_at=? WHERE state='uploading'",
                (time.time(),),
            ).rowcount

        return await self._write(work)

    async def requeue(self, file_id: int, error: str | None = None) -> None:
        """Put an in-flight file back without counting an attempt (shutdown, credentials).

        ``error``, when given, is remembered as the file's last error.
        """
        if error is None:
            await self._update(file_id, "state='queued'", ())
        else:
            await self._update(file_id, "state='queued', last_error=?", (error,))

    async def retry_failed(self, watch: str | None = None) -> int:
        """Failed files back to the queue with fresh attempts (``cpg-daemon retry``)."""

        def work(db: sqlite3.Connection) -> int:
            where = "state='failed' AND bucket != ''"
            args: tuple[object, ...] = (time.time(),)
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
                (*args, time.time(), file_id),
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
                (time.time(), file_id),
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
        def work() -> list[PartRecord]:
            rows = self._db.execute(
                "SELECT part_number, etag, checksum, size FROM parts "
                "WHERE file_id=? AND upload_id=? ORDER BY part_number",
                (file_id, upload_id),
            ).fetchall()
            return [PartRecord(*row) for row in rows]

        return await self._run(work)

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

        def work(db: sqlite3.Connection) -> bool:
            now = time.time()
            changed = db.execute(
                "UPDATE files SET state='uploaded', etag=?, checksum_algorithm=?, checksum=?, "
                "upload_id=NULL, upload_size=NULL, upload_mtime_ns=NULL, part_size=NULL, "
                "check_remote=0, last_error=NULL, uploaded_at=?, updated_at=? "
                "WHERE id=? AND state='uploading' AND size=? AND mtime_ns=? AND bucket=? "
                "AND key=?",
                (
                    etag,
                    checksum_algorithm,
                    checksum,
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

        return await self._grouped(work)

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

    async def mark_retry(self, file_id: int, error: str, not_before: float) -> None:
        """A failed attempt that will be tried again after ``not_before``."""
        await self._update(
            file_id,
            "state='queued', attempts=attempts+1, last_error=?, not_before=?",
            (error, not_before),
        )

    async def mark_failed(self, file_id: int, error: str) -> None:
        """No more attempts: failed, visible, until ``retry``."""
        await self._update(file_id, "state='failed', attempts=attempts+1, last_error=?", (error,))

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
        def work() -> FileRecord | None:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE id=?", (file_id,)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._run(work)

    async def get(self, watch: str, rel_path: str) -> FileRecord | None:
        def work() -> FileRecord | None:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE watch=? AND rel_path=?",
                (watch, os.fsencode(rel_path)),
            ).fetchone()
            return None if row is None else _record(row)

        return await self._run(work)

    async def records(self, watch: str | None = None) -> list[FileRecord]:
        def work() -> list[FileRecord]:
            if watch is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM files WHERE watch=? ORDER BY id", (watch,)
                ).fetchall()
            return [_record(row) for row in rows]

        return await self._run(work)

    async def statistics(self) -> JournalStatistics:
        def work() -> JournalStatistics:
            by_watch: dict[str, dict[FileState, Counts]] = {}
            for watch, state, files, size in self._db.execute(
                "SELECT watch, state, COUNT(*), COALESCE(SUM(size), 0) FROM files "
                "GROUP BY watch, state"
            ):
                by_watch.setdefault(watch, {})[state] = Counts(files, size)
            return JournalStatistics(
                by_watch, str(self.path), self.write_error, self.write_error_since
            )

        return await self._run(work)

    # -- batches (top-level folders of a watch; batches.py) ----------------------------

    async def batch_names(self, watch: str) -> list[str]:
        """The top-level folders of a watch that hold files.

        A skip scan of the (watch, rel_path) index: one short lookup per folder,
        whatever the number of files in it.
        """

        def work() -> list[str]:
            names: list[str] = []
            after = b""
            while True:
                row = self._db.execute(
                    "SELECT rel_path FROM files WHERE watch=? AND rel_path>=? "
                    "AND instr(rel_path, X'2F') > 0 ORDER BY rel_path LIMIT 1",
                    (watch, after),
                ).fetchone()
                if row is None:
                    return names
                folder = bytes(row[0]).partition(b"/")[0]
                names.append(os.fsdecode(folder))
                after = folder + b"0"

        return await self._run(work)

    async def batch_progress(self, watch: str, name: str) -> BatchProgress:
        """Counts, bytes and times of a batch's files, and its last recorded completion."""
        low, high = _batch_range(name)

        def work() -> BatchProgress:
            files, uploaded, size, first, last, change = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(state='uploaded'), 0), COALESCE(SUM(size), 0), "
                "MIN(uploaded_at), MAX(uploaded_at), MAX(updated_at) FROM files "
                "WHERE watch=? AND rel_path>=? AND rel_path<?",
                (watch, low, high),
            ).fetchone()
            row = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE watch=? AND name=?", (watch, name)
            ).fetchone()
            recorded = None if row is None else BatchRecord(*row)
            return BatchProgress(files, uploaded, size, first, last, change, recorded)

        return await self._run(work)

    async def record_batch(self, batch: BatchRecord) -> None:
        """Remember a batch's completion, in place of the one before."""
        values = astuple(batch)

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT OR REPLACE INTO batches ({_BATCH_COLUMNS}) "
                f"VALUES ({','.join('?' * len(values))})",
                values,
            )

        await self._write(work)

    async def set_batch_hook(self, batch: BatchRecord, state: str, detail: str | None) -> bool:
        """Where a completion's hook stands; False once a later completion replaced it."""

        def work(db: sqlite3.Connection) -> bool:
            return (
                db.execute(
                    "UPDATE batches SET hook_state=?, hook_detail=? "
                    "WHERE watch=? AND name=? AND completed_at=?",
                    (state, detail, batch.watch, batch.name, batch.completed_at),
                ).rowcount
                == 1
            )

        return await self._write(work)

    async def completed_batches(
        self, *, hook_state: str | None = None, limit: int = -1
    ) -> list[BatchRecord]:
        """Recorded completions, latest first (those whose hook is in ``hook_state``)."""

        def work() -> list[BatchRecord]:
            where, args = ("WHERE hook_state=?", (hook_state,)) if hook_state else ("", ())
            rows = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches {where} ORDER BY completed_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [BatchRecord(*row) for row in rows]

        return await self._run(work)
