"""The journal: the SQLite state of every file, part and batch; it is the queue.

- db.py: the machinery (one connection and thread, group commit, disk-full wait, damage)
- schema.py: the tables and the migrations from older versions
- files.py: the file state machine (states, failure kinds, transitions)
- batches.py: the batch table
- journal.py: ``Journal``, the one object the daemon uses (all of the above)
- reader.py: a read-only reader for commands beside a running daemon (``verify``)
- lock.py: the locks on journals (a daemon's state directory, an upload's journal) and
  the journal's file name
"""

from cpg_daemon.journal.batches import BatchProgress, BatchRecord
from cpg_daemon.journal.db import check_integrity, damaged_error, move_aside
from cpg_daemon.journal.files import (
    FAILURES,
    FILE_STATES,
    REFUSALS,
    Counts,
    Discovered,
    Failure,
    FileRecord,
    FileState,
    JournalStatistics,
    PartRecord,
    Refusal,
    Uploaded,
)
from cpg_daemon.journal.journal import Journal
from cpg_daemon.journal.lock import JOURNAL_NAME, LOCK_NAME, hold_lock, lock_state_dir
from cpg_daemon.journal.reader import Upload, counted_uploads, iter_uploads, read_uploads
from cpg_daemon.journal.schema import SCHEMA_VERSION

__all__ = [
    "FAILURES",
    "FILE_STATES",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "REFUSALS",
    "SCHEMA_VERSION",
    "BatchProgress",
    "BatchRecord",
    "Counts",
    "Discovered",
    "Failure",
    "FileRecord",
    "FileState",
    "Journal",
    "JournalStatistics",
    "PartRecord",
    "Refusal",
    "Upload",
    "Uploaded",
    "check_integrity",
    "counted_uploads",
    "damaged_error",
    "hold_lock",
    "iter_uploads",
    "lock_state_dir",
    "move_aside",
    "read_uploads",
]
