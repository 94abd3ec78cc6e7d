"""A cpg-daemon subprocess for tests: real process, real config file, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import forkserver
from forkserver import ForkedProcess, ForkServer
from loopguard import harness

DEFAULT_TIMEOUT = 30.0

DAEMON_LOGS: list[Path] = []
"""The log of every daemon subprocess of the session (conftest scans them for secrets)."""
CLI_OUTPUT: list[tuple[str, str]] = []
"""(command, stdout + stderr) of every ``run_cli`` of the session, scanned likewise."""


def write_config(
    path: Path,
    *,
    state_dir: Path,
    endpoint_url: str,
    watches: list[dict[str, Any]],
    s3: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    credentials: dict[str, Any] | list[dict[str, Any]] | None = None,
) -> Path:
    """A TOML config with the given watches (dicts of [[watch]] keys).

    ``credentials``: one [credentials] table, or a list for [[credentials]] tables;
    by default the standard chain (``source = "environment"``).
    """

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    settings = {
        "state_dir": str(state_dir),
        "socket": str(state_dir / "control.sock"),
        "log_format": "json",
        "log_level": "debug",
        **(daemon or {}),
    }
    lines = ["[daemon]"] + [f"{k} = {value(v)}" for k, v in settings.items()]
    lines += ["[s3]", f"endpoint_url = {value(endpoint_url)}"]
    lines += [f"{k} = {value(v)}" for k, v in (s3 or {}).items()]
    if credentials is None:
        credentials = {"source": "environment"}
    if isinstance(credentials, dict):
        lines.append("[credentials]")
        lines += [f"{k} = {value(v)}" for k, v in credentials.items()]
    else:
        for table in credentials:
            lines.append("[[credentials]]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    for watch in watches:
        lines.append("[[watch]]")
        lines += [f"{k} = {value(v)}" for k, v in watch.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_watch_config(
    path: Path,
    *,
    state_dir: Path,
    endpoint_url: str,
    watch_path: Path,
    destination: str,
    settle: str,
    s3: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    **watch: Any,
) -> Path:
    """A config with one watch named "plates" (more of its keys in ``watch``)."""
    table = {"name": "plates", "path": str(watch_path), "destination": destination}
    return write_config(
        path,
        state_dir=state_dir,
        endpoint_url=endpoint_url,
        watches=[{**table, "settle": settle, **watch}],
        s3=s3,
        daemon=daemon,
    )


class ConfigMaker:
    """What the ``make_config`` fixture (conftest) gives a test: call it to write a config
    with one watch "plates" of the test's layout (its outbox, its state dir) through the
    session's S3 server, as ``FOLDER/NAME.toml``; it returns the config's path."""

    def __init__(self, folder: Path, layout: dict[str, Path], endpoint_url: str) -> None:
        self.folder = folder
        self.layout = layout
        self.endpoint_url = endpoint_url

    def __call__(
        self,
        destination: str,
        *,
        name: str = "run",
        settle: str = "1s",
        s3: dict[str, Any] | None = None,
        daemon: dict[str, Any] | None = None,
        **watch: Any,
    ) -> Path:
        return one_watch_config(
            self.folder / f"{name}.toml",
            state_dir=self.layout["state"],
            endpoint_url=self.endpoint_url,
            watch_path=self.layout["watch"],
            destination=destination,
            settle=settle,
            s3=s3,
            daemon=daemon,
            **watch,
        )


class Daemon:
    """``cpg-daemon run -c CONFIG`` as a subprocess, its output in a log file: a child of
    the worker's fork server (``tests/forkserver.py``), or, under a wrapper or with
    descriptors to pass, of this process."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        wrapper: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``wrapper``: a command line the daemon runs under (``unshare ...``, say);
        ``pass_fds``: descriptors the wrapper (or the daemon) inherits."""
        self.config = config
        self.log_path = log_path
        DAEMON_LOGS.append(log_path)
        self._events: list[dict[str, Any]] = []
        self._parsed_bytes = 0
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        env = os.environ.copy()
        server = None if wrapper or pass_fds else ForkServer.get()
        self.process: subprocess.Popen[bytes] | ForkedProcess
        if server is not None and server.eligible(env):
            with open(os.devnull, "rb") as devnull:
                self.process = server.spawn(
                    ["run", "-c", str(config)],
                    stdin=devnull.fileno(),
                    stdout=self._log.fileno(),
                    stderr=self._log.fileno(),
                    env=env,
                )
        else:
            self.process = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "cpg_daemon", "run", "-c", str(config)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=pass_fds,
            )

    @classmethod
    def started(cls, config: Path, log_path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> Daemon:
        """A daemon that has logged ``running`` (killed if it does not get there)."""
        daemon = cls(config, log_path)
        try:
            daemon.wait_for_event("running", timeout)
        except BaseException:
            daemon.kill()
            raise
        return daemon

    @harness
    def events(self) -> list[dict[str, Any]]:
        """The JSON events logged so far (the log is parsed on from where the last call
        stopped: tests poll this, and a busy daemon's log grows to thousands of lines)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._parsed_bytes)
            new = log.read()
        complete = new[: new.rfind(b"\n") + 1]  # a line being written waits
        self._parsed_bytes += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._events.append(event)
        return list(self._events)

    def wait_for_event(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return wait_until(
            lambda: next((e for e in self.events() if e.get("event") == name), None),
            timeout,
            f"event {name!r} in {self.log_path}",
        )

    def terminate(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: the crash a power cut or OOM killer would cause."""
        if self.process.poll() is None:
            self.process.kill()
        return self.wait(DEFAULT_TIMEOUT)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@harness
def write_file(path: Path, data: bytes, *, age: float = 0.0) -> bytes:
    """Write a file (and its folders); returns the bytes, to compare with the object.

    ``age``: seconds into the past its mtime is set, for a file that has settled
    already (a later rewrite then always gets a different mtime).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return data


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@harness
def journal_rows(state_dir: Path) -> list[dict[str, Any]]:
    """The journal's file rows, read with plain sqlite3 (what an operator could do)."""
    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute("SELECT * FROM files ORDER BY id")]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the daemon is creating the journal right now
                return []
            raise


def exchange(path: Path, payload: bytes, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send raw bytes on a fresh connection, half-close, read every reply line until EOF.

    A daemon that closes early (a reset, a broken pipe) counts as a closed connection;
    a daemon that neither answers nor closes fails the test with a timeout.
    """
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    assert data == b"" or data.endswith(b"\n"), f"a reply line was cut short: {data[-200:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def run_cli(
    *args: str, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``cpg-daemon ARGS...`` as a subprocess (through the fork server), its output captured
    as text (``input``: its standard input; else none, as from a terminal-less cron job)."""
    result = forkserver.run(args, timeout=timeout, input=input)
    CLI_OUTPUT.append((" ".join(args), result.stdout + result.stderr))
    return result


def status_json(config: Path) -> dict[str, Any]:
    """``cpg-daemon status --json -c CONFIG``, as a script would run it (it must succeed)."""
    result = run_cli("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def wait_object(
    s3_client: Any, bucket: str, key: str, expected: bytes, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Wait until s3://bucket/key holds ``expected``."""
    wait_until(
        lambda: object_bytes(s3_client, bucket, key) == expected,
        timeout,
        f"s3://{bucket}/{key} to hold the file's bytes",
    )


@harness
def object_bytes(s3_client: Any, bucket: str, key: str) -> bytes | None:
    """An object's bytes, or None when there is no such object."""
    try:
        body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_client.exceptions.NoSuchKey:
        return None
    return body
