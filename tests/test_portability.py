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
import socket
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpg_daemon.core.config import CredentialsConfig, S3Config
from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.objectkeys import S3Location, object_key, relative_key_path
from cpg_daemon.engine import oneshot
from cpg_daemon.journal import hold_lock
from cpg_daemon.ops import client, platforms

# -- without Unix sockets (Windows) ------------------------------------------------------


def test_without_unix_sockets_the_control_commands_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delattr(socket, "AF_UNIX", raising=False)
    said = platforms.unsupported("status")
    assert said is not None and "Unix socket" in said and "`cpg-daemon status`" in said
    with pytest.raises(client.NoUnixSocketsError, match="machine the daemon runs on"):
        client.request(tmp_path / "control.sock", "pause")
    daemon = platforms.unsupported("run")
    assert daemon is not None and "Unix sockets" in daemon
    for command in ("upload", "verify", "check", "check-dataset", "manifest"):
        assert platforms.unsupported(command) is None


# -- Windows paths become keys with "/" ----------------------------------------------------

# Names Windows allows (no \ / : * ? " < > |), never "." or "..".
names = st.text(
    st.characters(codec="utf-8", categories=("L", "N"), include_characters=" -_.,é日"),
    min_size=1,
    max_size=12,
).filter(lambda name: name.strip(".") != "")


@given(st.lists(names, min_size=1, max_size=6))
def test_a_relative_path_of_either_flavour_is_its_parts_joined_with_slashes(
    parts: list[str],
) -> None:
    expected = "/".join(parts)
    for flavour, root in ((PureWindowsPath, "D:\\Lab data"), (PurePosixPath, "/lab data")):
        relative: PurePath = flavour(*parts)
        assert object_key("p/", relative) == "p/" + expected
        assert relative_key_path(flavour(root), flavour(root, *parts)) == expected


def test_windows_paths_map_to_keys() -> None:
    windows = PureWindowsPath("D:\\Acquisitions\\Batch8")
    event = PureWindowsPath("d:\\acquisitions\\BATCH8\\Plate1\\r01c01f01p01-ch1.tiff")
    assert relative_key_path(windows, event) == "Plate1/r01c01f01p01-ch1.tiff"  # case-blind
    assert (
        object_key("cpg0000-x/", PureWindowsPath("Plate1\\a b.tiff")) == "cpg0000-x/Plate1/a b.tiff"
    )
    # A walk's "/"-separated text: a backslash in it is part of a (Linux) name.
    assert object_key("p/", "Plate1/a\\b.tiff") == "p/Plate1/a\\b.tiff"
    for outside in (
        PureWindowsPath("C:\\Batch8\\a.tiff"),  # another drive
        PureWindowsPath("\\Batch8\\a.tiff"),  # from the drive's root
        PureWindowsPath("C:a.tiff"),  # relative to the drive's current folder
        PureWindowsPath("..\\a.tiff"),
        PurePosixPath("/Batch8/a.tiff"),
    ):
        with pytest.raises(ValueError):
            object_key("p/", outside)
    for not_below in (windows, PureWindowsPath("D:\\Acquisitions\\Batch9\\a.tiff")):
        with pytest.raises(ValueError):
            relative_key_path(windows, not_below)


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
