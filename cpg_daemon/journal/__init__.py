"""The journal: the SQLite state of every file, part and batch; it is the queue."""

from cpg_daemon.journal.journal import (
    FILE_STATES,
    BatchProgress,
    BatchRecord,
    Counts,
    Discovered,
    FileRecord,
    FileState,
    Journal,
    JournalStatistics,
    PartRecord,
    check_integrity,
    damaged_error,
    move_aside,
)

__all__ = [
    "FILE_STATES",
    "BatchProgress",
    "BatchRecord",
    "Counts",
    "Discovered",
    "FileRecord",
    "FileState",
    "Journal",
    "JournalStatistics",
    "PartRecord",
    "check_integrity",
    "damaged_error",
    "move_aside",
]
