"""The journal: one SQLite database (WAL) that remembers every file, part and batch.

It is the single source of truth for what is queued, in flight, uploaded or
failed, and the queue itself: workers claim the next file from it, so memory
does not grow with the number of queued files. ``Journal`` is the one object
the daemon uses; it is made of the machinery (db.py), the file state machine
(files.py) and the batch table (batches.py), over one connection and thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio.to_thread

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.errors import FatalError
from cpg_daemon.journal import schema
from cpg_daemon.journal.batches import BatchTable
from cpg_daemon.journal.db import connect, damaged, damaged_error, problems
from cpg_daemon.journal.files import FileTable


class Journal(FileTable, BatchTable):
    """The SQLite journal. Open it with ``await Journal.open(path)``."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        created: bool,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(connection, path, clock)
        self.created = created
        """True when this run created the journal (first start, or the old one was lost)."""

    @classmethod
    async def open(cls, path: Path, clock: Clock = SYSTEM_CLOCK) -> Journal:
        return await anyio.to_thread.run_sync(cls.open_sync, path, clock)

    @classmethod
    def open_sync(cls, path: Path, clock: Clock = SYSTEM_CLOCK) -> Journal:
        """Open (or create) the journal, migrate an older schema, refuse a damaged file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        try:
            db = connect(path)
            schema.prepare(db, path)
            # About 0.5 s per million files: cheap next to uploading from a damaged queue.
            found = problems(db.execute("PRAGMA quick_check(10)").fetchall())
            if found != "ok":
                raise damaged_error(path, found)
        except sqlite3.DatabaseError as exc:
            if damaged(exc):
                raise damaged_error(path, exc) from exc
            raise FatalError(f"cannot open the journal {path}: {exc}") from exc
        return cls(db, path, created, clock)
