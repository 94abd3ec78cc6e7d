"""The ``batches`` table: the last completion of each batch (a top-level folder of a watch).

engine/batches.py decides when a batch is complete and runs its hook; this
module only reads the batch's files and remembers each completion.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import astuple, dataclass, fields

from cpg_daemon.journal.db import Database


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


_FIELDS = tuple(f.name for f in fields(BatchRecord))
_COLUMNS = ", ".join(_FIELDS)


def _batch(row: sqlite3.Row) -> BatchRecord:
    return BatchRecord(**{name: row[name] for name in _FIELDS})


def _batch_range(name: str) -> tuple[bytes, bytes]:
    """Bounds of the rel_paths under a top-level folder: ``name/`` <= rel_path < ``name0``.

    ``0`` is the byte after ``/``, so the range is exactly the folder's files,
    and one range scan of the (watch, rel_path) index finds them.
    """
    folder = os.fsencode(name)
    return folder + b"/", folder + b"0"


class BatchTable(Database):
    """Batches: their files' progress (from ``files``) and their recorded completions."""

    async def batch_names(self, watch: str) -> list[str]:
        """The top-level folders of a watch that hold files.

        A skip scan of the (watch, rel_path) index: one short lookup per folder,
        whatever the number of files in it.
        """

        def work(db: sqlite3.Connection) -> list[str]:
            names: list[str] = []
            after = b""
            while True:
                row = db.execute(
                    "SELECT rel_path FROM files WHERE watch=? AND rel_path>=? "
                    "AND instr(rel_path, X'2F') > 0 ORDER BY rel_path LIMIT 1",
                    (watch, after),
                ).fetchone()
                if row is None:
                    return names
                folder = bytes(row["rel_path"]).partition(b"/")[0]
                names.append(os.fsdecode(folder))
                after = folder + b"0"

        return await self._read(work)

    async def batch_progress(self, watch: str, name: str) -> BatchProgress:
        """Counts, bytes and times of a batch's files, and its last recorded completion."""
        low, high = _batch_range(name)

        def work(db: sqlite3.Connection) -> BatchProgress:
            files = db.execute(
                "SELECT COUNT(*) AS files, COALESCE(SUM(state='uploaded'), 0) AS uploaded, "
                "COALESCE(SUM(size), 0) AS bytes, MIN(uploaded_at) AS first, "
                "MAX(uploaded_at) AS last, MAX(updated_at) AS change FROM files "
                "WHERE watch=? AND rel_path>=? AND rel_path<?",
                (watch, low, high),
            ).fetchone()
            row = db.execute(
                f"SELECT {_COLUMNS} FROM batches WHERE watch=? AND name=?", (watch, name)
            ).fetchone()
            return BatchProgress(
                files["files"],
                files["uploaded"],
                files["bytes"],
                files["first"],
                files["last"],
                files["change"],
                None if row is None else _batch(row),
            )

        return await self._read(work)

    async def record_batch(self, batch: BatchRecord) -> None:
        """Remember a batch's completion, in place of the one before."""
        values = astuple(batch)

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT OR REPLACE INTO batches ({_COLUMNS}) "
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

        def work(db: sqlite3.Connection) -> list[BatchRecord]:
            where, args = ("WHERE hook_state=?", (hook_state,)) if hook_state else ("", ())
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM batches {where} ORDER BY completed_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_batch(row) for row in rows]

        return await self._read(work)
