"""The journal's SQLite machinery: one connection, one thread, group commit, bad disks.

One connection, used only from one worker thread at a time (never on the
event loop). Each change is one short transaction (``_write``) or one
savepoint in a shared transaction (``_grouped``), so doing it twice leaves
the same row. What the rows mean lives elsewhere (files.py, batches.py).

When the journal cannot be written (the disk holding the state directory is
full, or answers with I/O errors) a change is not lost and the daemon does not
stop: the transaction is rolled back and the call waits, trying again every few
seconds, until the write succeeds. While it waits nothing new is claimed, so
the daemon takes no new work; ``write_error`` says why, for status and logs.

A damaged file (corrupt, or not a database) is reported as a ``FatalError``
that says how to recover (``damaged_error``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar, cast

import anyio
import structlog

from cpg_daemon.core.clock import Clock
from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.threads import Threads

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


def damaged(exc: BaseException) -> bool:
    """Whether ``exc`` says the journal file is corrupt or not a database at all."""
    return isinstance(exc, sqlite3.DatabaseError) and _says(
        exc, _DAMAGED_CODES, ("malformed", "not a database")
    )


def unwritable(exc: BaseException) -> bool:
    """Whether ``exc`` says the journal's disk is full or failing (not a bug, not corruption)."""
    return isinstance(exc, sqlite3.OperationalError) and _says(
        exc, _UNWRITABLE_CODES, _UNWRITABLE_MESSAGES
    )


def problems(rows: list[Any]) -> str:
    """An integrity check's answer as one line: ``ok``, or the problems it lists."""
    lines = [str(r[0]) for r in rows]
    return "ok" if lines == ["ok"] else "; ".join(lines)


def damaged_error(path: Path, problem: object) -> FatalError:
    return FatalError(f"the journal {path} is damaged ({problem}). {RECOVER_HINT}")


def check_integrity(path: Path) -> str:
    """``ok``, or the first problem SQLite's full integrity check finds in the journal."""
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            rows = db.execute("PRAGMA integrity_check(10)").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return problems(rows)


def move_aside(path: Path, suffix: str) -> Path:
    """Rename the journal and its -wal/-shm files to ``<name><suffix>``; returns the new path."""
    for extra in ("-wal", "-shm"):
        companion = path.with_name(path.name + extra)
        if companion.exists():
            companion.rename(path.with_name(path.name + suffix + extra))
    target = path.with_name(path.name + suffix)
    path.rename(target)
    return target


def connect(path: Path) -> sqlite3.Connection:
    """The journal's connection: WAL, autocommit (transactions are explicit), rows by name."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    return db


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


class Database:
    """An open journal connection and the one thread that uses it.

    Reads go through ``_run``; writes through ``_write`` (a transaction of their
    own) or ``_grouped`` (group commit). Both writes wait while the disk is full.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path, clock: Clock) -> None:
        self._db = connection
        self.path = path
        self.clock = clock
        """Stamps (updated_at, due times) and the wait while the disk is full."""
        self._lock = threading.Lock()
        self._thread = Threads("cpg-journal", 1)
        """One thread: SQLite work runs one call at a time, in order."""
        self._group: list[_Grouped[Any]] = []
        self._group_lock = anyio.Lock()
        self.write_error: str | None = None
        """Why the journal cannot be written just now (None: it can)."""
        self.write_error_since: float | None = None

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown()

    async def _run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``func`` in the journal's thread (a damaged file becomes ``damaged_error``)."""

        def call() -> T:
            with self._lock:
                try:
                    return func(*args, **kwargs)
                except sqlite3.DatabaseError as exc:
                    if damaged(exc):
                        raise damaged_error(self.path, exc) from exc
                    raise

        return await self._thread.run(call)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in the journal's thread, outside any transaction of ours."""
        return await self._run(work, self._db)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in a transaction of its own, waiting while the journal is unwritable."""
        while True:
            try:
                result = await self._run(self._tx, work)
            except sqlite3.OperationalError as exc:
                if not unwritable(exc):
                    raise
                await self._wait_writable(exc)  # rolled back: safe to run again
                continue
            self._writable()
            return result

    async def _wait_writable(self, exc: BaseException) -> None:
        """A write failed for want of space (or an I/O error): say so once, then wait."""
        if self.write_error is None:
            self.write_error = f"cannot write the journal {self.path}: {exc}"
            self.write_error_since = self.clock.time()
            log.error(
                "journal_unwritable",
                journal=str(self.path),
                error=str(exc),
                hint=f"free space on the disk holding {self.path.parent}; no new uploads "
                "start until the journal can be written, then they resume by themselves",
            )
        await self.clock.sleep(UNWRITABLE_RETRY)

    def _writable(self) -> None:
        if self.write_error is not None:
            now = self.clock.time()
            log.warning(
                "journal_writable",
                journal=str(self.path),
                seconds_unwritable=round(now - (self.write_error_since or now)),
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
            if entry.error is None or not unwritable(entry.error):
                if entry.error is None:
                    self._writable()
                elif damaged(entry.error):
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
