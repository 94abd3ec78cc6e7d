"""Secrets never leave the process: not in logs, status, errors, reports, the journal,
socket replies, or a batch hook's input and environment.

Two daemons are run through uploads, failures and every read-only command: one on
the long-term keys of the environment (``testing-secret``), one on Access Grants
session keys minted by tests/fakes.py (every secret and session token it minted is
looked for). Everything they wrote or printed is scanned.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SECRET_ACCESS_KEY
from daemonproc import Daemon, journal_rows, run_cli, wait_until, write_config, write_file
from fakes import AuthProxy, FakeControlPlane, KeyRegistry
from s3server import S3Server

ACCOUNT = "309624411020"
PREFIX = "cpg0001-test/broad/images/"
MiB = 1024 * 1024


class Captured:
    """Every piece of output a test saw, by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def add(self, where: str, data: str | bytes) -> None:
        self.items.append((where, data.encode() if isinstance(data, str) else data))

    def cli(self, *args: str, traceback_ok: bool = False) -> Any:
        result = run_cli(*args)
        self.add(f"cpg-daemon {' '.join(args)} (stdout)", result.stdout)
        self.add(f"cpg-daemon {' '.join(args)} (stderr)", result.stderr)
        assert traceback_ok or "Traceback" not in result.stdout + result.stderr, result
        return result

    def ask(self, sock: Path, command: str, args: dict[str, Any] | None = None) -> Any:
        line = json.dumps({"v": 1, "command": command, "args": args or {}}).encode() + b"\n"
        data = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(60)
            client.connect(str(sock))
            client.sendall(line)
            client.shutdown(socket.SHUT_WR)
            while chunk := client.recv(65536):
                data += chunk
        self.add(f"socket reply to {command}", data)
        return json.loads(data)

    def files_under(self, folder: Path) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.add(str(path), path.read_bytes())

    def assert_clean(self, secrets: list[str]) -> None:
        assert secrets and all(len(s) >= 10 for s in secrets)
        leaks = [
            (where, secret[:6] + "...")
            for where, data in self.items
            for secret in secrets
            if secret.encode() in data
        ]
        assert leaks == [], f"secrets found in: {leaks}"
        print(
            f"\nscanned {len(self.items)} outputs, {sum(len(d) for _, d in self.items)} bytes, "
            f"for {len(secrets)} secrets: none found"
        )


def assert_socket_private(sock: Path) -> None:
    mode = stat.S_IMODE(sock.lstat().st_mode)
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert mode & ~0o660 == 0, f"socket mode {mode:o} is wider than 0660"


def exercise(
    captured: Captured,
    config: Path,
    sock: Path,
    tmp_path: Path,
    name: str,
) -> None:
    """Every read-only way out of the daemon: CLI, socket, report."""
    captured.cli("status", "-c", str(config))
    status = captured.cli("status", "--json", "-c", str(config))
    assert status.returncode == 0
    for command in ("status", "help", "verify"):
        captured.ask(sock, command)
    captured.ask(sock, "verify", {"rows": True})
    captured.ask(sock, "retry", {"watch": "no-such-watch"})
    captured.ask(sock, "pause", {"watch": 7})
    report = tmp_path / f"report-{name}.csv"
    captured.cli("verify", "-c", str(config), "--report", str(report))
    if report.exists():  # a destination bucket that does not exist fails the whole verify
        captured.add(str(report), report.read_bytes())
    captured.cli("verify", "-c", str(config), "--via-daemon")
    captured.cli("check", "-c", str(config))
    captured.cli("check", "--offline", "-c", str(config))


def start_workload(
    config: Path, outbox: Path, failing: Path, state: Path
) -> tuple[Daemon, Path]:
    """Two uploads (one multipart) and a failure; returns once they are done, and the socket."""
    write_file(outbox / "Batch1/a.csv", b"a,b\n1,2\n")
    write_file(outbox / "Batch1/big.sqlite", os.urandom(6 * MiB))
    write_file(failing / "Batch9/lost.csv", b"x\n")
    daemon = Daemon(config, config.parent / "daemon.log")
    sock = state / "control.sock"
    try:
        wait_until(
            lambda: (
                sorted(r["state"] for r in journal_rows(state))
                == ["failed", "uploaded", "uploaded"]
            ),
            60,
            "two uploads and one failure",
        )
        assert_socket_private(sock)
    except BaseException:
        daemon.kill()
        raise
    return daemon, sock


def test_long_term_keys_from_the_environment_never_appear(
    tmp_path: Path, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = Captured()
    outbox, failing, state = tmp_path / "outbox", tmp_path / "failing", tmp_path / "state"
    hook_out = tmp_path / "hook-output"
    missing = f"t-{uuid.uuid4().hex[:12]}"  # a bucket that does not exist
    config = write_config(
        tmp_path / "config.toml",
        state_dir=state,
        endpoint_url=s3_server.endpoint_url,
        daemon={"file_attempts": 1, "log_level": "debug"},
        s3={"part_size": "5MiB", "multipart_threshold": "5MiB"},
        watches=[
            {
                "name": "plates",
                "path": str(outbox),
                "destination": f"s3://{bucket}/{PREFIX}",
                "settle": "0.5s",
                "on_batch_complete": f"(cat; env) > {hook_out}-$CPG_BATCH",
            },
            {
                "name": "nowhere",
                "path": str(failing),
                "destination": f"s3://{missing}/{PREFIX}",
                "settle": "0.5s",
            },
        ],
    )
    daemon, sock = start_workload(config, outbox, failing, state)
    try:
        wait_until(lambda: list(tmp_path.glob("hook-output-*")), 30, "the batch hook")
        exercise(captured, config, sock, tmp_path, "env")
        status = captured.ask(sock, "status")["result"]
        assert status["recent_errors"], status
        # The one-shot command, to a bucket that does not exist.
        captured.cli(
            "upload",
            str(outbox),
            f"s3://{missing}/x/",
            "--endpoint-url",
            s3_server.endpoint_url,
            "--state-dir",
            str(tmp_path / "oneshot"),
            traceback_ok=True,
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    captured.add("daemon log", daemon.log_text())
    captured.files_under(state)  # the journal, its WAL, anything else
    for path in tmp_path.glob("hook-output-*"):
        captured.add(str(path), path.read_bytes())
    captured.assert_clean([TEST_SECRET_ACCESS_KEY])


@pytest.fixture
def plane() -> Iterator[FakeControlPlane]:
    with FakeControlPlane(KeyRegistry(lifetime=4.0), expected_account_id=ACCOUNT) as server:
        yield server


@pytest.fixture
def proxy(s3_server: S3Server, plane: FakeControlPlane) -> Iterator[AuthProxy]:
    with AuthProxy(s3_server.endpoint_url, plane.registry) as server:
        yield server


def test_access_grants_session_keys_never_appear(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, bucket: str
) -> None:
    captured = Captured()
    outbox, failing, state = tmp_path / "outbox", tmp_path / "failing", tmp_path / "state"
    missing = f"t-{uuid.uuid4().hex[:12]}"

    def grant(target_bucket: str) -> dict[str, Any]:
        return {
            "source": "access-grants",
            "account_id": ACCOUNT,
            "target": f"s3://{target_bucket}/cpg0001-test/*",
            "duration": "15m",
            "refresh_before": "1s",
            "endpoint_url": plane.endpoint_url,
        }

    config = write_config(
        tmp_path / "config.toml",
        state_dir=state,
        endpoint_url=proxy.endpoint_url,
        daemon={"file_attempts": 1, "log_level": "debug"},
        s3={"part_size": "5MiB", "multipart_threshold": "5MiB"},
        credentials=[grant(bucket), grant(missing)],
        watches=[
            {
                "name": "plates",
                "path": str(outbox),
                "destination": f"s3://{bucket}/{PREFIX}",
                "settle": "0.5s",
            },
            {
                "name": "nowhere",
                "path": str(failing),
                "destination": f"s3://{missing}/{PREFIX}",
                "settle": "0.5s",
            },
        ],
    )
    daemon, sock = start_workload(config, outbox, failing, state)
    try:
        exercise(captured, config, sock, tmp_path, "grants")
        # The grants endpoint fails, then goes away: errors in status, check and the log.
        plane.registry.fail_with = (403, "AccessDenied", "No matching grant found.")
        captured.cli("check", "-c", str(config))
        plane.registry.fail_with = None
        plane.registry.down = True
        time.sleep(plane.registry.lifetime + 1.5)
        status = captured.cli("status", "--json", "-c", str(config))
        creds = json.loads(status.stdout)["credentials"]
        assert any(c["last_error"] for c in creds), creds
        captured.cli("status", "-c", str(config))
        captured.cli("check", "-c", str(config))
        captured.cli("verify", "-c", str(config))
        plane.registry.down = False
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    captured.add("daemon log", daemon.log_text())
    captured.files_under(state)
    secrets = [TEST_SECRET_ACCESS_KEY]
    for keys in plane.registry.mints:
        secrets += [keys.secret_access_key, keys.session_token]
    assert len(secrets) >= 5, "too few session keys were minted to prove anything"
    captured.assert_clean(secrets)
