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
import struct
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
from cpg_daemon.ops import client, control, platforms

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


# -- the control socket's peer check ------------------------------------------------------


def xucred(version: int, uid: int, groups: list[int], pid: int | None = None) -> bytes:
    """A struct xucred as macOS returns it (FreeBSD's has the pid after it, 8-aligned)."""
    raw = struct.pack("=IIh2x16I", version, uid, len(groups), *groups, *[0] * (16 - len(groups)))
    return raw if pid is None else raw + struct.pack("=4xiI", pid, 0)


@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=16),
    st.one_of(st.none(), st.integers(1, 2**31 - 1)),
)
def test_xucred_gives_the_user_and_every_group(
    uid: int, groups: list[int], pid: int | None
) -> None:
    peer = control.parse_xucred(xucred(0, uid, groups, pid))
    assert peer == control.Peer(uid, groups[0], tuple(groups))


def test_an_xucred_of_another_layout_is_refused() -> None:
    for raw in (
        xucred(1, 501, [20]),  # another version
        xucred(0, 501, [20])[:40],  # cut short
        struct.pack("=IIh2x16I", 0, 501, 0, *[0] * 16),  # no groups
        struct.pack("=IIh2x16I", 0, 501, 17, *[20] * 16),  # more than there is room for
    ):
        with pytest.raises(ValueError):
            control.parse_xucred(raw)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets (Windows)")
def test_the_peer_of_a_unix_socket_is_this_process() -> None:
    """SO_PEERCRED here; LOCAL_PEERCRED where the workflow runs this on macOS."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        peer = control.peer_of(ours)
    assert peer is not None
    assert peer.uid == os.geteuid()
    assert os.getegid() == peer.gid
    assert peer.pid in (None, os.getpid())


def test_a_change_is_refused_when_the_peer_is_unknown() -> None:
    said = control.refusal("pause", None, "")
    assert said is not None and said.startswith("refused: pause changes the daemon")
    assert "LOCAL_PEERCRED" in said


def test_a_member_of_the_socket_group_by_its_group_list_may_change() -> None:
    grp = pytest.importorskip("grp")
    group = grp.getgrgid(os.getgid())
    stranger = os.getuid() + 4_000_000  # neither root nor the daemon's user, no name
    member = control.Peer(stranger, gid=4_000_000, groups=(4_000_000, group.gr_gid))
    outsider = control.Peer(stranger, gid=4_000_000, groups=(4_000_000,))
    assert control.refusal("pause", member, group.gr_name) is None
    refused = control.refusal("pause", outsider, group.gr_name)
    assert refused is not None and refused.startswith("permission denied")


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
