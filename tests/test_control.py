"""The control socket end to end: a real daemon subprocess, its real Unix socket, the real CLI.

``status``, ``pause``/``resume``, ``retry`` and ``rescan`` are run as ``cpg-daemon``
subprocesses (as a person or a script would); the socket's own behaviour
(malformed input, many clients, idle clients) is exercised with plain
``socket.socket(AF_UNIX)`` connections that know nothing of cpg_daemon's code.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, exchange, journal_rows, wait_until, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from s3server import S3Server
from structlog.testing import capture_logs

from cpg_daemon import __version__
from cpg_daemon.cli import main as cli_main
from cpg_daemon.core.config import DEFAULT_SOCKET
from cpg_daemon.core.errors import FatalError
from cpg_daemon.ops import control, systemd

SETTLE = "0.5s"
SETTLE_S = 0.5
COMMANDS = {"status", "pause", "resume", "retry", "rescan", "help"}
MAX_LINE = 64 * 1024
_SCRIPT = Path(sys.executable).with_name("cpg-daemon")
CPG_DAEMON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cpg_daemon"]


# -- helpers --------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``cpg-daemon ARGS`` in a subprocess, without $CPG_DAEMON_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "CPG_DAEMON_CONFIG"}
    return subprocess.run(
        [*CPG_DAEMON, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def ask(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One request over a raw socket; the result of an ok reply."""
    line = json.dumps({"v": 1, "command": command, "args": args or {}}).encode() + b"\n"
    replies = exchange(path, line)
    assert len(replies) == 1, replies
    assert replies[0]["ok"] is True, replies[0]
    assert replies[0]["v"] == 1
    return replies[0]["result"]


def assert_error_reply(reply: dict[str, Any], *words: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["v"] == 1
    assert isinstance(reply["error"], str) and reply["error"]
    for word in words:
        assert word in reply["error"], reply


def on_server(s3_client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object under the prefix: key -> size."""
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["Size"] for o in listed}


def wait_status(sock: Path, check: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """Poll the status until ``check(status)`` holds; the status that satisfied it."""

    def probe() -> dict[str, Any] | None:
        status = ask(sock, "status")
        return status if check(status) else None

    result: dict[str, Any] = wait_until(probe, timeout, what)
    return result


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in status["watches"]}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_iso(value: Any) -> bool:
    """An ISO 8601 timestamp with a UTC offset."""
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


def check_shape(status: dict[str, Any], watches: list[dict[str, Any]]) -> None:
    """The required fields of INTERFACE.md, with their types; watches in config order."""
    assert status["version"] == __version__
    assert status["state"] in {"starting", "running", "paused", "stopping"}
    assert is_iso(status["started_at"]), status["started_at"]
    counts = {"queued", "uploading", "uploaded", "failed"}
    assert counts <= status["files"].keys()
    assert all(is_int(status["files"][k]) and status["files"][k] >= 0 for k in counts)
    assert {"queued", "uploaded"} <= status["bytes"].keys()
    assert all(
        is_int(status["bytes"][k]) and status["bytes"][k] >= 0 for k in ("queued", "uploaded")
    )
    rate = status["throughput_bytes_per_s"]
    assert isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0
    assert isinstance(status["credentials"], list) and status["credentials"]
    for cred in status["credentials"]:
        assert isinstance(cred["target"], str) and cred["target"]
        assert cred["state"] in {"valid", "refreshing", "expired", "error"}
        assert cred["expires_at"] is None or is_iso(cred["expires_at"]), cred
        assert cred["last_error"] is None or isinstance(cred["last_error"], str)
    assert [w["name"] for w in status["watches"]] == [w["name"] for w in watches]
    for got, want in zip(status["watches"], watches, strict=True):
        assert got["path"] == want["path"]
        assert got["destination"] == want["destination"]
        assert isinstance(got["paused"], bool)
        assert counts <= got["files"].keys()
        assert all(is_int(got["files"][k]) and got["files"][k] >= 0 for k in counts)
    assert isinstance(status["recent_errors"], list)
    for error in status["recent_errors"]:
        assert isinstance(error["path"], str) and isinstance(error["key"], str)
        assert isinstance(error["error"], str) and error["error"]
        assert is_iso(error["at"]), error


def watch_table(name: str, path: Path, destination: str) -> dict[str, Any]:
    return {"name": name, "path": str(path), "destination": destination, "settle": SETTLE}


def start(
    tmp_path: Path,
    s3_server: S3Server,
    watches: list[dict[str, Any]],
    *,
    daemon: dict[str, Any] | None = None,
    socket_path: Path | None = None,
    name: str = "run",
) -> tuple[Daemon, Path, Path]:
    """A daemon on its own state dir; returns (daemon, config, socket)."""
    for watch in watches:
        Path(watch["path"]).mkdir(parents=True, exist_ok=True)
    state = tmp_path / f"state-{name}"
    config = write_config(
        tmp_path / f"{name}.toml",
        state_dir=state,
        endpoint_url=s3_server.endpoint_url,
        watches=watches,
        daemon=daemon,
    )
    sock = state / "control.sock"
    if socket_path is not None:
        # write_config always writes daemon.socket; a second key would be a TOML error.
        text = config.read_text(encoding="utf-8")
        old = f"socket = {json.dumps(str(sock))}"
        assert old in text
        config.write_text(text.replace(old, f"socket = {json.dumps(str(socket_path))}"), "utf-8")
        sock = socket_path
    process = Daemon(config, tmp_path / f"{name}.log")
    try:
        process.wait_for_event("running")
    except BaseException:
        process.kill()
        raise
    return process, config, sock


def stop(daemon: Daemon) -> None:
    assert daemon.terminate() == 0, daemon.log_text()[-4000:]


# -- 1. status ------------------------------------------------------------------------------


def test_status_json_and_human_agree_with_what_was_uploaded(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    watches = [
        watch_table("plates", tmp_path / "plates", f"s3://{bucket}/cpg0001/images/"),
        watch_table("profiles", tmp_path / "profiles", f"s3://{bucket}/cpg0001/profiles/"),
    ]
    drops = {
        "plates": {"A/r01c01-ch1.tiff": 70_000, "A/r01c01-ch2.tiff": 50_001, "illum.npy": 333},
        "profiles": {"plate.csv": 1234, "plate.sqlite": 9_999},
    }
    before_start = datetime.now(timezone.utc).replace(microsecond=0)
    daemon, config, sock = start(tmp_path, s3_server, watches)
    try:
        idle = json.loads(cli("status", "--json", "-c", str(config)).stdout)
        check_shape(idle, watches)
        assert idle["state"] == "running"
        assert idle["files"] == idle["files"] | dict.fromkeys(("queued", "uploaded", "failed"), 0)
        started = datetime.fromisoformat(idle["started_at"])
        assert before_start - timedelta(seconds=1) <= started <= datetime.now(timezone.utc)

        for watch in watches:
            for rel, size in drops[watch["name"]].items():
                path = Path(watch["path"]) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(size))
        total_files = sum(len(d) for d in drops.values())
        total_bytes = sum(sum(d.values()) for d in drops.values())

        during = cli("status", "--json", "-c", str(config))
        assert during.returncode == 0, during.stderr
        check_shape(json.loads(during.stdout), watches)

        wait_status(sock, lambda s: s["files"]["uploaded"] == total_files, f"{total_files} uploads")
        done = cli("status", "--json", "-c", str(config))
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        check_shape(status, watches)
        assert status["state"] == "running"
        assert status["started_at"] == idle["started_at"]
        assert {k: status["files"][k] for k in ("queued", "uploading", "uploaded", "failed")} == {
            "queued": 0,
            "uploading": 0,
            "uploaded": total_files,
            "failed": 0,
        }
        assert status["bytes"]["uploaded"] == total_bytes
        assert status["bytes"]["queued"] == 0
        assert status["recent_errors"] == []
        server = on_server(s3_client, bucket)
        assert len(server) == total_files
        assert sum(server.values()) == status["bytes"]["uploaded"]
        for watch in by_name(status).values():
            wanted = drops[watch["name"]]
            assert watch["paused"] is False
            assert watch["files"]["uploaded"] == len(wanted)
            assert watch["files"]["queued"] == watch["files"]["failed"] == 0
            if "bytes" in watch:
                assert watch["bytes"]["uploaded"] == sum(wanted.values())
            prefix = watch["destination"].removeprefix(f"s3://{bucket}/")
            assert {k: v for k, v in server.items() if k.startswith(prefix)} == {
                prefix + rel: size for rel, size in wanted.items()
            }

        # -s alone finds the daemon, without any config.
        alone = cli("status", "--json", "-s", str(sock))
        assert alone.returncode == 0, alone.stderr
        assert json.loads(alone.stdout)["files"] == status["files"]

        human = cli("status", "-c", str(config))
        assert human.returncode == 0, human.stderr
        text = human.stdout
        for watch in watches:
            assert f"watch {watch['name']}: {watch['path']} -> {watch['destination']}" in text
        assert "3 uploaded" in text and "2 uploaded" in text and "5 uploaded" in text
        assert "0 failed" in text
        cred = status["credentials"][0]
        assert any(
            line.startswith("credentials ") and cred["target"] in line and cred["state"] in line
            for line in text.splitlines()
        ), text
    finally:
        stop(daemon)


# -- 2. pause / resume ----------------------------------------------------------------------


def test_pause_holds_new_files_until_resume_all_and_one_watch(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    wa, wb = tmp_path / "wa", tmp_path / "wb"
    watches = [
        watch_table("a", wa, f"s3://{bucket}/a/"),
        watch_table("b", wb, f"s3://{bucket}/b/"),
    ]
    daemon, config, sock = start(tmp_path, s3_server, watches)
    try:
        paused = cli("pause", "-c", str(config))
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == "paused: a, b"
        (wa / "1.csv").write_bytes(b"a1")
        (wb / "1.csv").write_bytes(b"b1")
        (wb / "2.csv").write_bytes(b"b2")
        wait_status(sock, lambda s: s["files"]["queued"] == 3, "three queued files")
        time.sleep(4 * SETTLE_S)
        assert on_server(s3_client, bucket) == {}
        status = ask(sock, "status")
        assert status["state"] == "paused"
        assert [w["paused"] for w in status["watches"]] == [True, True]
        assert status["files"]["queued"] == 3 and status["files"]["uploaded"] == 0
        assert [w["files"]["queued"] for w in status["watches"]] == [1, 2]
        assert status["bytes"]["queued"] == 6
        assert cli("status", "-c", str(config)).stdout.count("[paused]") == 2

        resumed = cli("resume", "-c", str(config))
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.strip() == "resumed: a, b"
        wait_until(
            lambda: on_server(s3_client, bucket).keys() == {"a/1.csv", "b/1.csv", "b/2.csv"},
            20,
            "the held files to be uploaded after resume",
        )
        status = wait_status(sock, lambda s: s["files"]["uploaded"] == 3, "3 uploaded")
        assert status["state"] == "running"
        assert [w["paused"] for w in status["watches"]] == [False, False]

        # One watch only: the other keeps uploading.
        one = cli("pause", "a", "-c", str(config))
        assert one.returncode == 0, one.stderr
        assert one.stdout.strip() == "paused: a"
        status = ask(sock, "status")
        assert status["state"] == "running"
        assert {n: w["paused"] for n, w in by_name(status).items()} == {"a": True, "b": False}
        (wa / "2.csv").write_bytes(b"a2")
        (wb / "3.csv").write_bytes(b"b3")
        wait_until(lambda: "b/3.csv" in on_server(s3_client, bucket), 20, "b/3.csv uploaded")
        wait_status(sock, lambda s: by_name(s)["a"]["files"]["queued"] == 1, "a/2.csv queued")
        time.sleep(3 * SETTLE_S)
        assert "a/2.csv" not in on_server(s3_client, bucket)
        assert by_name(ask(sock, "status"))["a"]["files"]["queued"] == 1

        again = cli("resume", "a", "-c", str(config))
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "resumed: a"
        wait_until(lambda: "a/2.csv" in on_server(s3_client, bucket), 20, "a/2.csv uploaded")
        status = wait_status(sock, lambda s: s["files"]["uploaded"] == 5, "5 uploaded")
        assert status["files"]["queued"] == 0
        assert [w["paused"] for w in status["watches"]] == [False, False]
    finally:
        stop(daemon)


def test_resume_of_one_watch_after_pausing_all(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """`pause` (all), then `resume a`: a uploads again, b stays paused.

    A bug at HEAD: Scheduler.resume(watch) only dropped the name from the per-watch set,
    so after a pause of all watches `resume a` printed "resumed: a" and changed nothing.
    """
    wa, wb = tmp_path / "wa", tmp_path / "wb"
    watches = [
        watch_table("a", wa, f"s3://{bucket}/a/"),
        watch_table("b", wb, f"s3://{bucket}/b/"),
    ]
    daemon, config, sock = start(tmp_path, s3_server, watches)
    try:
        assert cli("pause", "-c", str(config)).returncode == 0
        resumed = cli("resume", "a", "-c", str(config))
        assert resumed.returncode == 0 and resumed.stdout.strip() == "resumed: a"
        status = ask(sock, "status")
        assert {n: w["paused"] for n, w in by_name(status).items()} == {"a": False, "b": True}
        (wa / "x.csv").write_bytes(b"x")
        wait_until(lambda: "a/x.csv" in on_server(s3_client, bucket), 10, "a/x.csv uploaded")
        # For scripts, --json prints the daemon's answer as one document.
        answers = {
            command: cli(command, *named, "--json", "-c", str(config))
            for command, named in (
                ("pause", ("a",)),
                ("resume", ()),
                ("rescan", ("b",)),
                ("retry", ()),
            )
        }
        assert {command: json.loads(result.stdout) for command, result in answers.items()} == {
            "pause": {"paused": ["a"]},
            "resume": {"resumed": ["a", "b"]},
            "rescan": {"rescanning": ["b"]},
            "retry": {"requeued": 0, "watches": ["a", "b"]},
        }, answers
        assert by_name(ask(sock, "status"))["b"]["paused"] is False
    finally:
        stop(daemon)


def test_state_is_running_when_no_watch_is_configured(tmp_path: Path, s3_server: S3Server) -> None:
    """A bug at HEAD: with no [[watch]], status said "paused" (set() <= anything)."""
    daemon, _, sock = start(tmp_path, s3_server, [])
    try:
        assert ask(sock, "status")["state"] == "running"
    finally:
        stop(daemon)


# -- 3. retry -------------------------------------------------------------------------------


def test_retry_requeues_a_failed_file(tmp_path: Path, s3_server: S3Server, s3_client: Any) -> None:
    missing = f"t-{uuid.uuid4().hex[:12]}"  # created only after the file has failed
    watch = tmp_path / "outbox"
    watches = [watch_table("w", watch, f"s3://{missing}/cpg0001/")]
    daemon, config, sock = start(tmp_path, s3_server, watches, daemon={"file_attempts": 1})
    try:
        (watch / "plate.csv").write_bytes(b"a,b\n1,2\n")
        status = wait_status(sock, lambda s: s["files"]["failed"] == 1, "the file to fail")
        check_shape(status, watches)
        assert status["files"]["uploaded"] == status["files"]["queued"] == 0
        assert by_name(status)["w"]["files"]["failed"] == 1
        [error] = status["recent_errors"]
        assert error["path"] == str(watch / "plate.csv")
        assert error["key"] == "cpg0001/plate.csv"
        assert "bucket does not exist" in error["error"]
        at = datetime.fromisoformat(error["at"])
        assert abs(datetime.now(timezone.utc) - at) < timedelta(seconds=30)
        human = cli("status", "-c", str(config)).stdout
        assert "recent errors:" in human and str(watch / "plate.csv") in human

        s3_client.create_bucket(Bucket=missing)
        retried = cli("retry", "-c", str(config))
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip() == "1 failed files queued again (w)"
        wait_until(
            lambda: on_server(s3_client, missing) == {"cpg0001/plate.csv": 8},
            20,
            "the retried file on the server",
        )
        body = s3_client.get_object(Bucket=missing, Key="cpg0001/plate.csv")["Body"].read()
        assert body == b"a,b\n1,2\n"
        status = wait_status(sock, lambda s: s["files"]["uploaded"] == 1, "1 uploaded")
        assert status["files"]["failed"] == 0
        nothing = cli("retry", "w", "-c", str(config))
        assert nothing.returncode == 0
        assert nothing.stdout.strip() == "0 failed files queued again (w)"
    finally:
        stop(daemon)


# -- 4. rescan ------------------------------------------------------------------------------


def _max_queued_events() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        pytest.skip("needs Linux inotify")


def _stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (state T in /proc)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    return bool(states) and all(state in ("T", "t") for state in states)


def test_a_queue_overflow_walks_the_watch_and_rescan_walks_on_request(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """An inotify queue overflow loses events; the daemon says so and walks the watch at
    once (not at the periodic rescan, an hour away here), so the file is found.

    The daemon is frozen (SIGSTOP) while more events than the kernel queues are made
    (renames of an excluded dot file), then a file is written: its event is dropped.
    ``rescan`` walks the watch when asked.
    """
    limit = _max_queued_events()
    watch = tmp_path / "outbox"
    watches = [watch_table("w", watch, f"s3://{bucket}/p/")]
    daemon, config, sock = start(
        tmp_path, s3_server, watches, daemon={"rescan_interval": "1h", "log_level": "debug"}
    )
    try:
        churn, other = watch / ".churn.tmp", watch / ".churn2.tmp"
        churn.write_bytes(b"")
        time.sleep(SETTLE_S)
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            # Every thread stopped (a loaded machine may take a while): none reads events.
            wait_until(lambda: _stopped(daemon.process.pid), 10, "the daemon to stop")
            for _ in range(limit // 4 + 1000):  # two renames, four events a round
                os.rename(churn, other)
                os.rename(other, churn)
            (watch / "missed.csv").write_bytes(b"lost event\n")
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        warning = daemon.wait_for_event("events_overflowed")
        assert warning["level"] == "warning" and "max_queued_events" in warning["hint"]
        wait_until(
            lambda: "p/missed.csv" in on_server(s3_client, bucket), 20, "the walk to find it"
        )
        # Events flow again: a new file arrives as usual.
        (watch / "seen.csv").write_bytes(b"seen\n")
        wait_until(lambda: "p/seen.csv" in on_server(s3_client, bucket), 20, "p/seen.csv")
        assert on_server(s3_client, bucket) == {"p/missed.csv": 11, "p/seen.csv": 5}
        status = ask(sock, "status")
        assert by_name(status)["w"]["files"]["queued"] == 0
        assert status["files"]["uploaded"] == 2

        def walked() -> int:
            return len([e for e in daemon.events() if e["event"] == "scanned"])

        walks = walked()
        assert walks >= 2  # the first walk, and the overflow's
        rescan = cli("rescan", "-c", str(config))
        assert rescan.returncode == 0, rescan.stderr
        assert rescan.stdout.strip() == "rescanning: w"
        wait_until(lambda: walked() > walks, 20, "the watch walked again")
        named = cli("rescan", "w", "-c", str(config))
        assert named.returncode == 0 and named.stdout.strip() == "rescanning: w"
        for command in ("rescan", "pause", "resume", "retry"):
            unknown = cli(command, "nosuch", "-c", str(config))
            assert unknown.returncode == 1, (command, unknown)
            assert "no watch named 'nosuch'" in unknown.stderr and "w" in unknown.stderr
        status = ask(sock, "status")
        assert status["state"] == "running" and by_name(status)["w"]["paused"] is False
    finally:
        stop(daemon)


# -- 5. the socket's mode and folder ---------------------------------------------------------


def test_socket_is_0660_in_a_new_0750_folder_and_removed_on_stop(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    old_umask = os.umask(0o022)  # what systemd gives a service unless told otherwise
    try:
        sock = tmp_path / "run" / "cpg-daemon" / "control.sock"
        watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
        daemon, _, _ = start(tmp_path, s3_server, watches, socket_path=sock)
    finally:
        os.umask(old_umask)
    try:
        info = sock.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        folder = sock.parent.stat()
        assert stat.S_ISDIR(folder.st_mode)
        assert stat.S_IMODE(folder.st_mode) == 0o750
        assert ask(sock, "status")["state"] == "running"
    finally:
        stop(daemon)
    assert not sock.exists(), "the socket was left behind after a clean stop"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="cpg-control-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


NOBODY = 65534
SOCKET_GROUP = "daemon"
_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
    sys.exit(0)
s.sendall(json.dumps({"v": 1, "command": sys.argv[2]}).encode() + b"\\n")
reply = b""
while not reply.endswith(b"\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
s.close()
print(reply.decode().strip())
"""


def as_other_user(sock: Path, command: str, *, in_group: bool) -> str:
    """Send one command as user nobody, a member of daemon.socket_group or not."""
    gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _CLIENT, str(sock), command],
        capture_output=True,
        text=True,
        timeout=20,
        user=NOBODY,
        group=gid if in_group else NOBODY,
        extra_groups=[],
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _needs_other_user() -> None:
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root and /usr/bin/python3 to run a client as another user")
    try:
        grp.getgrnam(SOCKET_GROUP)
    except KeyError:
        pytest.skip(f"needs a group named {SOCKET_GROUP!r}")


def test_socket_group_members_may_use_the_socket_and_others_may_not(
    tmp_path: Path, shared_dir: Path, s3_server: S3Server, bucket: str
) -> None:
    """Like systemd's RuntimeDirectory: the socket's folder exists (0755) before the start."""
    _needs_other_user()
    sock = shared_dir / "control.sock"
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    daemon, _, _ = start(
        tmp_path, s3_server, watches, daemon={"socket_group": SOCKET_GROUP}, socket_path=sock
    )
    try:
        assert sock.lstat().st_gid == grp.getgrnam(SOCKET_GROUP).gr_gid
        assert as_other_user(sock, "status", in_group=False) == "denied"
        member = json.loads(as_other_user(sock, "status", in_group=True))
        assert member["ok"] is True and member["result"]["state"] == "running"
        paused = json.loads(as_other_user(sock, "pause", in_group=True))
        assert paused == {"v": 1, "ok": True, "result": {"paused": ["w"]}}
        assert ask(sock, "status")["state"] == "paused"
    finally:
        stop(daemon)


def test_socket_group_members_reach_a_socket_in_a_folder_the_daemon_created(
    tmp_path: Path, shared_dir: Path, s3_server: S3Server, bucket: str
) -> None:
    """A bug at HEAD: prepare_socket_path created a missing socket folder 0750 in the
    daemon's own group, never daemon.socket_group, so the group could not reach the socket."""
    _needs_other_user()
    sock = shared_dir / "cpg-daemon" / "control.sock"
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    daemon, _, _ = start(
        tmp_path, s3_server, watches, daemon={"socket_group": SOCKET_GROUP}, socket_path=sock
    )
    try:
        reply = as_other_user(sock, "status", in_group=True)
    finally:
        stop(daemon)
    assert reply != "denied"
    assert json.loads(reply)["ok"] is True


_LISTEN_FDS_SHIM = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # the first descriptor a service manager passes
if fd != 3:
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
os.execv(sys.argv[2], sys.argv[2:])
"""
"""Starts the daemon as systemd starts a socket-activated service: the socket as
descriptor 3, LISTEN_PID the daemon's own pid (exec keeps it), LISTEN_FDS and its name."""


def systemd_socket(path: Path, mode: int, group: str | None = None) -> socket.socket:
    """What cpg-daemon.socket makes, as root, before the daemon starts."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(mode)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    listener.listen()
    return listener


def start_on(listener: socket.socket, config: Path, log: Path) -> Daemon:
    """A daemon handed ``listener`` by the sd_listen_fds protocol."""
    fd = listener.fileno()
    shim = [sys.executable, "-c", _LISTEN_FDS_SHIM, str(fd)]
    daemon = Daemon(config, log, wrapper=shim, pass_fds=[fd])
    try:
        daemon.wait_for_event("running")
    except BaseException:
        daemon.kill()
        raise
    return daemon


def test_sockets_passed_to_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_PID of a parent (a shell that ran the daemon): nothing is ours; the
    variables go all the same, so that no child of the daemon reads them either."""
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "control")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_the_control_socket_is_the_one_named_control_and_must_listen(tmp_path: Path) -> None:
    with (
        systemd_socket(tmp_path / "control.sock", 0o660) as listener,
        systemd_socket(tmp_path / "other.sock", 0o660) as other,
        capture_logs() as logs,
    ):
        chosen = control.inherited_listener(
            [("metrics", other), ("control", listener)], tmp_path / "configured.sock"
        )
        assert chosen is listener
        assert other.fileno() == -1  # closed: nobody serves it
        assert [e["event"] for e in logs] == ["inherited_socket_unused", "control_socket_elsewhere"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(tmp_path / "not-listening.sock"))
        with pytest.raises(FatalError, match="not a listening Unix stream socket"):
            control.inherited_listener([("unknown", bound)], tmp_path / "not-listening.sock")


def test_a_daemon_serves_the_socket_systemd_made_and_leaves_it_in_place(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """cpg-daemon.socket: systemd binds the socket (its owner, group and mode) and hands
    it over. The daemon neither probes it (it would find "another daemon") nor binds,
    chmods or removes it, on reload or on exit; a restart serves the same socket."""
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    Path(watches[0]["path"]).mkdir()
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "run.toml", state_dir=state, endpoint_url=s3_server.endpoint_url, watches=watches
    )
    state.mkdir()
    sock = state / "control.sock"
    with systemd_socket(sock, 0o600) as listener:
        made = sock.stat()
        daemon = start_on(listener, config, tmp_path / "first.log")
        try:
            [listening] = [e for e in daemon.events() if e["event"] == "control_socket_listening"]
            assert listening["made_by"] == "systemd" and listening["socket"] == str(sock)
            status = cli("status", "--json", "-s", str(sock))
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["state"] == "running"
            reloaded = cli("reload", "-c", str(config))
            assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
            assert ask(sock, "help")  # still served after the reload
        finally:
            stop(daemon)
        after = sock.stat()
        assert (after.st_ino, after.st_mode) == (made.st_ino, made.st_mode)  # not rebound
        # systemd restarts the service on the same socket; nothing was lost in between.
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(str(sock))  # queued while no daemon runs, as systemd would queue it
        daemon = start_on(listener, config, tmp_path / "second.log")
        try:
            with waiting:
                waiting.sendall(b'{"v": 1, "command": "status"}\n')
                waiting.settimeout(10)
                assert json.loads(waiting.recv(65536))["ok"] is True
        finally:
            stop(daemon)
        assert sock.stat().st_ino == made.st_ino


def test_the_socket_systemd_made_keeps_the_peer_checks(
    tmp_path: Path, shared_dir: Path, s3_server: S3Server, bucket: str
) -> None:
    """A socket unit with a looser SocketMode= (0666): anyone may connect and read the
    status, but only root, the daemon's user and socket_group may change anything."""
    _needs_other_user()
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    Path(watches[0]["path"]).mkdir()
    sock = shared_dir / "control.sock"
    config = write_config(
        tmp_path / "run.toml",
        state_dir=tmp_path / "state",
        endpoint_url=s3_server.endpoint_url,
        watches=watches,
        daemon={"socket": str(sock), "socket_group": SOCKET_GROUP},
    )
    with systemd_socket(sock, 0o666, SOCKET_GROUP) as listener:
        daemon = start_on(listener, config, tmp_path / "daemon.log")
        try:
            outsider = json.loads(as_other_user(sock, "status", in_group=False))
            assert outsider["ok"] is True
            refused = json.loads(as_other_user(sock, "pause", in_group=False))
            assert refused["ok"] is False and "permission denied" in refused["error"]
            member = json.loads(as_other_user(sock, "pause", in_group=True))
            assert member == {"v": 1, "ok": True, "result": {"paused": ["w"]}}
        finally:
            stop(daemon)


# -- 6. robustness --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
bad_requests = st.fixed_dictionaries(
    {"command": st.text(max_size=12).filter(lambda c: c not in COMMANDS)},
    optional={"v": st.integers(-3, 3) | st.text(max_size=3), "args": json_values},
)
payloads = st.one_of(
    st.binary(max_size=4096),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    bad_requests.map(lambda r: json.dumps(r).encode() + b"\n"),
)


def test_bad_input_gets_error_replies_and_never_hurts_the_daemon(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    daemon, config, sock = start(tmp_path, s3_server, watches)
    idle: list[socket.socket] = []
    try:

        @settings(max_examples=40, deadline=None, database=None)
        @given(payload=payloads)
        def fuzz(payload: bytes) -> None:
            replies = exchange(sock, payload)
            # One reply per complete line, every one an error; a trailing partial line
            # is dropped when the connection closes.
            assert len(replies) == payload.count(b"\n"), (payload, replies)
            for reply in replies:
                assert_error_reply(reply)

        fuzz()

        [reply] = exchange(
            sock, b'{"v": 1, "command": "status", "pad": "' + b"x" * 70_000 + b'"}\n'
        )
        assert_error_reply(reply, str(MAX_LINE))
        [reply] = exchange(sock, b"x" * (MAX_LINE + 10))
        assert_error_reply(reply, str(MAX_LINE))
        [reply] = exchange(sock, b'{"v": 1, "command": "status"\n')
        assert_error_reply(reply, "JSON")
        [reply] = exchange(sock, b'["status"]\n')
        assert_error_reply(reply, "JSON object")
        [reply] = exchange(sock, b"\xff\xfe\x00\n")
        assert_error_reply(reply)
        [reply] = exchange(sock, b'{"v": 1, "command": "explode"}\n')
        assert_error_reply(reply, "explode", "status")
        [reply] = exchange(sock, b'{"v": 2, "command": "status"}\n')
        assert_error_reply(reply, "version")
        [reply] = exchange(sock, b'{"v": 1, "command": "pause", "args": ["w"]}\n')
        assert_error_reply(reply, "args")
        [reply] = exchange(sock, b'{"v": 1, "command": "pause", "args": {"watch": 7}}\n')
        assert_error_reply(reply, "no watch named")
        assert ask(sock, "status")["state"] == "running", "a refused pause paused anyway"
        assert exchange(sock, b"") == []

        # Several requests on one connection: one reply each, in order.
        replies = exchange(sock, b'{"command": "help"}\n{"v": 1, "command": "status"}\n[]\n')
        assert [r["ok"] for r in replies] == [True, True, False]
        assert replies[0]["result"].keys() >= COMMANDS
        assert replies[1]["result"]["watches"][0]["name"] == "w"

        # Clients that connect and send nothing, or half a line, block no one.
        for partial in (b"", b'{"v": 1, "comm'):
            for _ in range(10):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(client)
                client.connect(str(sock))
                client.sendall(partial)
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _: ask(sock, "status"), range(20)))
        assert len(answers) == 20 and all(a["version"] == __version__ for a in answers)
        # Served while the idle clients still hold their connections: a status queued
        # behind them would have waited out their read timeout.
        assert time.monotonic() - began < control.READ_TIMEOUT / 2

        after = cli("status", "--json", "-c", str(config))
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["state"] == "running"
        assert daemon.process.poll() is None
    finally:
        try:
            stop(daemon)  # with the idle clients still connected
        finally:
            for client in idle:
                client.close()


def test_deeply_nested_json_gets_an_error_reply_and_does_not_kill_the_daemon(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """A bug at HEAD: 5,000 '[' (far below 64 KiB) made json.loads raise RecursionError,
    which escaped the client task through listener.serve and stopped the daemon (exit 1)."""
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    daemon, _, sock = start(tmp_path, s3_server, watches)
    try:
        replies = exchange(sock, b"[" * 5000 + b"\n")
        assert len(replies) == 1
        assert_error_reply(replies[0])
        assert ask(sock, "status")["state"] == "running"
    finally:
        stop(daemon)


def test_running_out_of_descriptors_for_clients_does_not_kill_the_daemon(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """A bug at HEAD: accept() failing with EMFILE (a client script leaking connections)
    escaped listener.serve as BrokenResourceError and stopped the daemon (exit 1)."""
    import resource

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    watches = [watch_table("w", tmp_path / "outbox", f"s3://{bucket}/p/")]
    daemon, _, sock = start(tmp_path, s3_server, watches)
    pid = daemon.process.pid
    try:
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 16, hard))
        clients: list[socket.socket] = []
        try:
            for _ in range(40):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.settimeout(5)
                client.connect(str(sock))
            time.sleep(1.0)
        finally:
            for client in clients:
                client.close()
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert daemon.process.poll() is None, "the daemon died"
        wait_until(lambda: ask(sock, "status")["state"] == "running", 10, "status again")
    finally:
        stop(daemon)


# -- 7. no daemon, and a second daemon -------------------------------------------------------


def test_no_daemon_exits_3_naming_the_socket(tmp_path: Path) -> None:
    nowhere = "/nonexistent/x.sock"
    for args in (("status",), ("status", "--json"), ("pause",), ("resume", "w"), ("retry",)):
        result = cli(*args, "-s", nowhere)
        assert result.returncode == 3, (args, result)
        assert nowhere in result.stderr, (args, result.stderr)
        assert result.stdout == ""

    stale = tmp_path / "stale.sock"  # a socket file left by a daemon that died
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(stale))
    result = cli("rescan", "-s", str(stale))
    assert result.returncode == 3 and str(stale) in result.stderr


def test_a_socket_that_refuses_this_user_exits_4_not_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scripts tell "no daemon" (3) from "not allowed" (4). Tests run as root, whom no
    socket refuses, so the refusal is the kernel's error raised at connect()."""

    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for args in (("status",), ("pause",), ("retry", "w")):
        assert cli_main.main([*args, "-s", "/run/x/control.sock"]) == 4, args
        err = capsys.readouterr().err
        assert "permission denied on /run/x/control.sock" in err, err


def test_status_with_a_default_config_this_user_may_not_read_tries_the_default_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A socket_group member and the README's 0640 root:cpg-daemon config: not a
    configuration error (exit 2), but the default socket."""
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\n", encoding="utf-8")
    monkeypatch.setenv("CPG_DAEMON_CONFIG", str(config))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == config else real_access(p, mode)
    )
    assert cli_main.main(["status"]) == 3
    assert str(DEFAULT_SOCKET) in capsys.readouterr().err


def test_second_daemon_with_the_same_config_exits_1_and_leaves_the_journal_alone(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    done, failing = tmp_path / "done", tmp_path / "failing"
    watches = [
        watch_table("done", done, f"s3://{bucket}/p/"),
        # A failed row too: a start-up re-queues failed files, so a second daemon that
        # opened the journal before giving up would change it.
        watch_table("failing", failing, f"s3://t-{uuid.uuid4().hex[:12]}/p/"),
    ]
    daemon, config, sock = start(tmp_path, s3_server, watches, daemon={"file_attempts": 1})
    try:
        (done / "one.csv").write_bytes(b"1\n")
        (failing / "two.csv").write_bytes(b"2\n")
        wait_status(
            sock,
            lambda s: s["files"]["uploaded"] == 1 and s["files"]["failed"] == 1,
            "one upload and one failure",
        )
        state_dir = sock.parent
        rows = journal_rows(state_dir)
        assert sorted(r["state"] for r in rows) == ["failed", "uploaded"]

        second = cli("run", "-c", str(config), timeout=20)
        assert second.returncode == 1, second
        output = second.stdout + second.stderr
        assert "another cpg-daemon is already running" in output
        assert str(sock) in output

        assert journal_rows(state_dir) == rows
        assert stat.S_ISSOCK(sock.lstat().st_mode), "the second daemon removed the socket"
        status = ask(sock, "status")
        assert (status["files"]["uploaded"], status["files"]["failed"]) == (1, 1)
        assert cli("status", "-c", str(config)).returncode == 0
    finally:
        stop(daemon)
