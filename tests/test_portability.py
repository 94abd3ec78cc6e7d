"""The one-shot commands on systems other than Linux: macOS and Windows.

What a contributor runs on a laptop (``upload``, ``verify``, ``check``,
``check-dataset``) must not need what only POSIX systems have; the daemon's own
commands must say so, early, where they cannot run. Here (Linux) that is shown by
running the commands in a fresh interpreter with those modules made unimportable
(``tests/posixless.py``), against the real local S3 server; the key mapping is shown
with Windows paths as pure paths; the control socket's peer check with the structure
macOS and FreeBSD return.

This file is what .github/workflows/portability.yml runs on macOS and Windows.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from cpg_daemon.core.config import CredentialsConfig, S3Config
from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine import oneshot
from cpg_daemon.journal import hold_lock

# -- the upload's lock, in this process's own branch ---------------------------------------


def test_an_upload_whose_journal_is_locked_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_bytes(b"a")
    watch = oneshot.source_watch(src, S3Location("bucket", "p/"))
    journal = oneshot.journal_path(tmp_path, watch.path / watch.include[0], watch.destination)
    lock = hold_lock(journal.with_suffix(".lock"), "held by the test")
    try:
        with pytest.raises(FatalError, match=r"another cpg-daemon upload of .* is running"):
            anyio.run(oneshot.upload, watch, S3Config(), CredentialsConfig(), tmp_path)
    finally:
        os.close(lock)
    assert not journal.exists()  # refused before the journal was opened
