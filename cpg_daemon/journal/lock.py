"""The state directory's lock: one daemon (or ``recover-journal``) per journal."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cpg_daemon.core.errors import FatalError

JOURNAL_NAME = "journal.sqlite3"
"""The journal's file name in ``daemon.state_dir``."""
LOCK_NAME = "daemon.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory: one daemon per journal.

    The control socket only catches a second daemon with the same socket; one with a
    socket of its own would share the journal. The kernel drops the lock when the
    process dies, so a crash leaves nothing stale. Returns the descriptor to close.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FatalError(
            f"another cpg-daemon is already running on the state directory {state_dir}; "
            "stop it first (or give this one its own daemon.state_dir)"
        ) from None
    return fd
