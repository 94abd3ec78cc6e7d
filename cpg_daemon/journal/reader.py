"""Reading a journal without owning it: a read-only connection, for ``verify``.

A running daemon owns the journal (and holds the state-dir lock); a command
beside it may still read it, through a connection that cannot write, migrate
or lock it. Only columns every schema version has are read, so a journal an
older daemon wrote is readable before the daemon has opened (and migrated) it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Upload:
    """What the journal recorded when a file was uploaded."""

    rel_path: str
    key: str
    size: int
    mtime_ns: int
    etag: str
    checksum_algorithm: str
    checksum: str
    uploaded_at: float | None = None
    """Unix time of the upload."""


def read_uploads(path: Path, watch: str, folder: str = "") -> dict[str, Upload] | None:
    """The uploaded files of a watch (or of one folder of it) by rel_path; None when there
    is no readable journal.

    Blocking: run it in a thread.
    """
    if not path.is_file():
        return None
    try:
        return {upload.rel_path: upload for upload in iter_uploads(path, watch, folder)}
    except sqlite3.Error as exc:
        log.warning("journal_not_read", journal=str(path), error=str(exc))
        return None


def iter_uploads(path: Path, watch: str, folder: str = "") -> Iterator[Upload]:
    """The uploaded files of a watch (or one folder of it) in rel_path order, one at a
    time: a million rows cost no more memory than one. Raises sqlite3.Error.

    Blocking: run it in a thread.
    """
    with closing(_connect(path)) as db:
        yield from _uploads(db, *_uploaded(watch, folder))


@contextmanager
def counted_uploads(
    path: Path, watch: str, folder: str = ""
) -> Iterator[tuple[int, int, Iterator[Upload]]]:
    """``iter_uploads`` with its count and bytes first, all read from one snapshot of
    the journal (a daemon writing meanwhile changes neither): ``(files, bytes, rows)``,
    the rows valid inside the ``with``. Raises sqlite3.Error. Blocking.
    """
    with closing(_connect(path)) as db:
        db.execute("BEGIN")  # one read transaction: the totals and the rows agree
        where, arguments = _uploaded(watch, folder)
        files, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0)" + where, arguments
        ).fetchone()
        yield files, size, _uploads(db, where, arguments)


def _connect(path: Path) -> sqlite3.Connection:
    # as_uri: a '?', '#' or '%' in a folder's name, and a Windows path (file:///C:/...).
    uri = f"{path.absolute().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


def _uploaded(watch: str, folder: str) -> tuple[str, tuple[object, ...]]:
    """The FROM and WHERE of a watch's (or a folder's) uploaded rows, and their arguments."""
    where = " FROM files WHERE watch=? AND state='uploaded'"
    arguments: tuple[object, ...] = (watch,)
    if folder:  # one range of the (watch, rel_path) index: "folder/" to "folder0"
        where += " AND rel_path>=? AND rel_path<?"
        arguments += (os.fsencode(folder) + b"/", os.fsencode(folder) + b"0")
    return where, arguments


def _uploads(db: sqlite3.Connection, where: str, arguments: tuple[object, ...]) -> Iterator[Upload]:
    query = (
        "SELECT rel_path, key, size, mtime_ns, etag, checksum_algorithm, checksum, uploaded_at"
        + where
        + " ORDER BY rel_path"
    )
    for row in db.execute(query, arguments):
        yield Upload(
            os.fsdecode(row["rel_path"]),
            row["key"],
            row["size"],
            row["mtime_ns"],
            row["etag"] or "",
            row["checksum_algorithm"] or "",
            row["checksum"] or "",
            row["uploaded_at"],
        )
