"""Locks on journals: one daemon (or ``recover-journal``) per state directory, one
``upload`` per source and destination.

The lock is the operating system's: ``flock`` where there is ``fcntl`` (Linux, macOS),
``msvcrt.locking`` on Windows. Either is dropped when the process ends, so a crash
leaves nothing stale; closing the descriptor drops it too.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from cpg_daemon.core.errors import FatalError

JOURNAL_NAME = "journal.sqlite3"
"""The journal's file name in ``daemon.state_dir``."""
LOCK_NAME = "daemon.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory: one daemon per journal.

    The control socket only catches a second daemon with the same socket; one with a
    socket of its own would share the journal. Returns the descriptor to close.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    return hold_lock(
        state_dir / LOCK_NAME,
        f"another cpg-daemon is already running on the state directory {state_dir}; "
        "stop it first (or give this one its own daemon.state_dir)",
    )


def hold_lock(path: Path, held_elsewhere: str) -> int:
    """An exclusive lock on the file ``path`` (made if missing), taken without waiting;
    the descriptor to close. FatalError with ``held_elsewhere`` when another process
    holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited (PEP 446)
    try:
        taken = _try_lock(fd)
    except BaseException:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        raise FatalError(held_elsewhere)
    return fd


def _try_lock(fd: int) -> bool:
    """Whether this process now holds the lock on ``fd`` (False: another one does).

    Chosen by what the interpreter has, not by the platform's name, so that the
    Windows branch also runs in the tests that make ``fcntl`` unimportable.
    """
    try:
        import fcntl
    except ImportError:
        return _try_lock_windows(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _try_lock_windows(fd: int) -> bool:
    """``msvcrt.locking`` of the file's first byte (from its position, 0 here): a
    byte-range lock that other processes' attempts fail on at once with LK_NBLCK."""
    # Imported by name: mypy checks this module for Linux, where typeshed's msvcrt is empty.
    msvcrt = importlib.import_module("msvcrt")
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # EACCES (or EDEADLOCK) while another process holds the byte
        return False
    return True
