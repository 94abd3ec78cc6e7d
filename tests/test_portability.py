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

import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import anyio
import boto3  # type: ignore[import-untyped]
import pytest
import structlog
from botocore.config import Config
from conftest import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY
from hypothesis import given
from hypothesis import strategies as st
from s3server import S3Server

from cpg_daemon.cli.main import main
from cpg_daemon.core.config import CredentialsConfig, S3Config
from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.objectkeys import S3Location, object_key, parse_s3_uri, relative_key_path
from cpg_daemon.engine import oneshot
from cpg_daemon.journal import Journal, hold_lock, read_uploads
from cpg_daemon.ops import client, control, logs, platforms
from cpg_daemon.ops.service import private_tmp_problem

TESTS = Path(__file__).resolve().parent
MIB = 1024 * 1024
PREFIX = "cpg0000-port/broad/"
COPY = "copy/"
BATCH = "2024_01_01_Batch1"
TREE: dict[str, int | bytes] = {
    # More than one 5 MiB part: the reads at an offset (core/files.py) are shown too.
    f"images/{BATCH}/images/Plate1/r01c01f01p01-ch1.tiff": 5 * MIB + 1234,
    f"images/{BATCH}/images/Plate1/r01c01f01p01-ch2.tiff": 40_000,
    f"images/{BATCH}/illum/Plate1/Plate1_IllumDNA.npy": 1000,
    # CR LF and ^Z: a file read in Windows' text mode would lose or stop at them.
    f"workspace/load_data_csv/{BATCH}/Plate1/load_data.csv": (
        b"Metadata_Plate,FileName\r\nPlate1,r01c01f01p01-ch1.tiff\r\n\x1a after ^Z\r\n"
    ),
    f"workspace/metadata/platemaps/{BATCH}/barcode_platemap.csv": b"plate_map_name\r\n",
}


# -- the commands, with the POSIX-only modules blocked ------------------------------


def _environment(tmp: Path) -> dict[str, str]:
    """Dummy keys and no AWS files (as conftest's aws_env, for a module's fixture)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AWS_")
        and name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and name != "CPG_DAEMON_CONFIG"
    }
    env.update(
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION=TEST_REGION,
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        PYTHONIOENCODING="utf-8",
    )
    return env


def _write_tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(19)
    contents: dict[str, bytes] = {}
    for rel, size in TREE.items():
        data = size if isinstance(size, bytes) else rng.randbytes(size)
        path = root.joinpath(*rel.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        contents[rel] = data
    return contents


def _write_config(path: Path, tmp: Path, src: Path, endpoint: str, bucket: str) -> Path:
    # TOML literal strings ('...'): a Windows path's backslashes stay as they are.
    path.write_text(
        f"[daemon]\nstate_dir = '{tmp / 'daemon-state'}'\n\n"
        f"[s3]\nendpoint_url = '{endpoint}'\npart_size = '5MiB'\n"
        "multipart_threshold = '5MiB'\n\n"
        "[credentials]\nsource = 'environment'\n\n"
        f"[[watch]]\nname = 'plate'\npath = '{src}'\ndestination = 's3://{bucket}/{PREFIX}'\n",
        encoding="utf-8",
    )
    return path


class Blocked:
    """What the commands did in the interpreter without the POSIX-only modules."""

    def __init__(
        self, results: list[dict[str, Any]], bucket: str, src: Path, contents: dict[str, bytes]
    ) -> None:
        self.results = results
        self.bucket = bucket
        self.src = src
        self.contents = contents

    def all(self, *args: str) -> list[dict[str, Any]]:
        """The results of the commands that began with ``args``, in their order."""
        found = [r for r in self.results if r["args"][: len(args)] == list(args)]
        for result in found:
            assert "Traceback" not in result["stderr"], result["stderr"]
        return found

    def of(self, *args: str) -> dict[str, Any]:
        """The result of the one command that began with ``args``."""
        (found,) = self.all(*args)
        return found


@pytest.fixture(scope="module")
def blocked(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blocked]:
    """One fresh interpreter (never the fork server, whose children have the modules
    imported already) runs the commands one after the other."""
    tmp = tmp_path_factory.mktemp("posixless")
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )
    bucket = f"t-port-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    src = tmp / "Plate data"
    contents = _write_tree(src)
    config = _write_config(tmp / "config.toml", tmp, src, s3_server.endpoint_url, bucket)
    destination = f"s3://{bucket}/{PREFIX}"
    upload = ["upload", str(src), destination, "-c", str(config)]
    commands = [
        ["--help"],
        ["run", "-c", str(config)],
        ["install-service", "-c", str(config)],
        ["status", "-s", str(tmp / "no-daemon.sock")],
        [*upload, "--state-dir", str(tmp / "held")],
        [*upload, "--state-dir", str(tmp / "state")],
        [*upload, "--state-dir", str(tmp / "state")],
        [  # an S3 source: streamed through this machine, part by part
            "upload",
            destination,
            f"s3://{bucket}/{COPY}",
            "-c",
            str(config),
            "--source-endpoint-url",
            s3_server.endpoint_url,
            "--no-server-side-copy",
            "--state-dir",
            str(tmp / "state"),
        ],
        ["verify", "-c", str(config)],
        ["check", "-c", str(config)],
        ["check-dataset", destination, "--endpoint-url", s3_server.endpoint_url],
    ]
    (tmp / "commands.json").write_text(json.dumps(commands), encoding="utf-8")
    # The journal of the upload to tmp/held is locked here, as by an upload running.
    watch = oneshot.source_watch(src, parse_s3_uri(destination))
    journal = oneshot.journal_path(tmp / "held", watch.path / watch.include[0], watch.destination)
    journal.parent.mkdir()
    lock = hold_lock(journal.with_suffix(".lock"), "held by the test")
    try:
        done = subprocess.run(
            [sys.executable, str(TESTS / "posixless.py"), str(tmp / "commands.json")],
            capture_output=True,
            env=_environment(tmp),
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    finally:
        os.close(lock)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    results = json.loads(done.stdout)
    yield Blocked(results, bucket, src, {PREFIX + rel: data for rel, data in contents.items()})
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    for item in objects:
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)


def test_help_needs_no_posix_only_module(blocked: Blocked) -> None:
    helped = blocked.of("--help")
    assert helped["exit"] == 0
    for command in ("upload", "verify", "check", "check-dataset", "status", "run"):
        assert command in helped["stdout"]


def test_upload_sends_the_tree_under_slash_separated_keys(blocked: Blocked, s3_client: Any) -> None:
    _, ran, again = blocked.all("upload", str(blocked.src))  # the first was refused (below)
    assert ran["exit"] == 0, ran["stderr"]
    assert f"{len(TREE)} files: {len(TREE)} uploaded, 0 already present, 0 failed" in ran["stdout"]
    listed = s3_client.list_objects_v2(Bucket=blocked.bucket, Prefix=PREFIX)["Contents"]
    assert sorted(item["Key"] for item in listed) == sorted(blocked.contents)
    for key, data in blocked.contents.items():
        body = s3_client.get_object(Bucket=blocked.bucket, Key=key)["Body"].read()
        assert body == data, key
    # Run again: the journal (SQLite, its lock) says every file is there already.
    assert again["exit"] == 0, again["stderr"]
    assert f"{len(TREE)} files: 0 uploaded, {len(TREE)} already present" in again["stdout"]


def test_upload_from_s3_streams_the_objects_through(blocked: Blocked, s3_client: Any) -> None:
    copied = blocked.of("upload", f"s3://{blocked.bucket}/{PREFIX}")
    assert copied["exit"] == 0, copied["stderr"]
    assert f"{len(TREE)} files: {len(TREE)} uploaded" in copied["stdout"]
    for key, data in blocked.contents.items():
        key = COPY + key.removeprefix(PREFIX)
        assert s3_client.get_object(Bucket=blocked.bucket, Key=key)["Body"].read() == data, key


def test_a_second_upload_of_the_same_source_is_refused_while_the_first_runs(
    blocked: Blocked,
) -> None:
    """The journal's lock in its Windows branch (msvcrt.locking, a stand-in on POSIX
    systems) against the lock this test held in its own process."""
    refused = blocked.all("upload", str(blocked.src))[0]
    assert refused["exit"] == 1
    assert "another cpg-daemon upload of" in refused["stderr"]
    assert "is running" in refused["stderr"]


def test_verify_and_check_run(blocked: Blocked) -> None:
    verified = blocked.of("verify")
    assert verified["exit"] == 0, verified["stderr"]
    assert f"verify: {len(TREE)} match," in verified["stdout"]
    checked = blocked.of("check")
    assert checked["exit"] == 0, checked["stdout"] + checked["stderr"]
    assert f"write access to s3://{blocked.bucket}/{PREFIX} confirmed" in checked["stdout"]


def test_check_dataset_lists_the_upload(blocked: Blocked) -> None:
    report = blocked.of("check-dataset")
    assert report["exit"] in (0, 1), report["stderr"]  # 1: the guide's requirements
    first = report["stdout"].splitlines()[0]
    assert first.startswith(f"check-dataset s3://{blocked.bucket}/{PREFIX}: {len(TREE)} objects")
    assert "Plate1" in report["stdout"]


def test_the_daemon_commands_say_what_they_need(blocked: Blocked) -> None:
    run = blocked.of("run")
    assert run["exit"] == 1
    assert run["stderr"].startswith("cpg-daemon run: the daemon needs a POSIX system")
    assert "grp, pwd, resource" in run["stderr"]
    service = blocked.of("install-service")
    assert service["exit"] == 1
    assert service["stderr"].startswith("cpg-daemon install-service: ")
    assert "grp, pwd" in service["stderr"] or "is not Linux" in service["stderr"]
    status = blocked.of("status")
    assert status["exit"] == 3  # no daemon (none listens, or none can be reached from here)
    assert status["stderr"].startswith("cpg-daemon status: ")


# -- without Unix sockets (Windows) ------------------------------------------------------


def test_without_unix_sockets_the_control_commands_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delattr(socket, "AF_UNIX", raising=False)
    said = platforms.unsupported("status")
    assert said is not None and "Unix socket" in said and "`cpg-daemon status`" in said
    assert main(["status", "--watch"]) == 3  # said once, not retried every second
    with pytest.raises(client.NoUnixSocketsError, match="machine the daemon runs on"):
        client.request(tmp_path / "control.sock", "pause")
    daemon = platforms.unsupported("run")
    assert daemon is not None and "Unix sockets" in daemon
    for command in ("upload", "verify", "check", "check-dataset", "manifest"):
        assert platforms.unsupported(command) is None


def test_check_warns_of_the_services_private_tmp_only_where_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert private_tmp_problem(Path("/tmp/outbox")) is not None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert private_tmp_problem(Path("/tmp/outbox")) is None


def test_a_windows_console_without_colorama_gets_plain_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """structlog colours a Windows console only through colorama, which is no dependency:
    without it, ``upload`` on a terminal would stop with SystemError before it started."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "colorama", None)
    monkeypatch.delenv("NO_COLOR", raising=False)
    console = Terminal()
    logs.configure("console", "info", console)
    structlog.get_logger("test").warning("plain", path="C:\\data")
    assert "plain" in console.getvalue()
    assert "\x1b[" not in console.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


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


def test_a_journal_is_read_whatever_its_folder_is_called(tmp_path: Path) -> None:
    """verify reads the journal read-only through an SQLite URI: a Windows path, or a
    '#' or '%' in a folder's name, must reach SQLite as the file it names."""
    path = tmp_path / "state #1 at 100% 日" / "journal.sqlite3"

    async def make() -> None:
        journal = await Journal.open(path)
        await journal.close()

    anyio.run(make)
    assert read_uploads(path, "plate") == {}


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


@pytest.mark.skipif(not control.PEER_CHECK, reason="no peer credentials here (Windows)")
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
