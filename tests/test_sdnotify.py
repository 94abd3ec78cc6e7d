"""sd_notify as systemd sees it: a real AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemonproc import ConfigMaker, Daemon, run_cli, wait_until

from cpg_daemon.ops import control
from cpg_daemon.ops.systemd import Notifier


@dataclass
class Message:
    at: float
    fields: dict[str, str]
    socket_answered: bool | None = None
    """For READY=1: whether the control socket answered status when it arrived."""


@dataclass
class FakeManager:
    """What systemd does with NOTIFY_SOCKET: receive datagrams, remember them."""

    sock: socket.socket
    address: str
    control_socket: Path | None = None
    messages: list[Message] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def receive_forever(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            message = Message(time.monotonic(), fields)
            if fields.get("READY") == "1" and self.control_socket is not None:
                # Right now, as systemd would start dependent units: does it answer?
                try:
                    control.request(self.control_socket, "status")
                    message.socket_answered = True
                except (control.NoDaemonError, control.CommandError):
                    message.socket_answered = False
            with self._lock:
                self.messages.append(message)

    def with_field(self, name: str, value: str | None = None) -> list[Message]:
        with self._lock:
            return [
                m
                for m in self.messages
                if name in m.fields and (value is None or m.fields[name] == value)
            ]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    fake = FakeManager(sock, address)
    thread = threading.Thread(target=fake.receive_forever, daemon=True)
    thread.start()
    yield fake
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    thread.join(5)


def _daemon(tmp_path: Path, make_config: ConfigMaker, bucket: str, manager: FakeManager) -> Daemon:
    config = make_config(f"s3://{bucket}/cpg0001-test/broad/images/", settle="1s")
    manager.control_socket = tmp_path / "state" / "control.sock"  # the layout's state dir
    return Daemon(config, tmp_path / "daemon.log")


def test_ready_after_socket_answers_then_watchdog_status_and_stopping(
    tmp_path: Path,
    make_config: ConfigMaker,
    bucket: str,
    manager: FakeManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1s: a ping every 0.5 s
    (tmp_path / "outbox" / "Batch1").mkdir(parents=True)
    (tmp_path / "outbox" / "Batch1" / "a.tiff").write_bytes(b"x" * 1000)
    os.utime(tmp_path / "outbox" / "Batch1" / "a.tiff", (1, 1))  # settled already
    daemon = _daemon(tmp_path, make_config, bucket, manager)
    try:
        ready = wait_until(lambda: manager.with_field("READY", "1"), 30, "READY=1")
        assert len(ready) == 1
        assert ready[0].socket_answered is True, "READY=1 came before the socket answered"
        # The first walk had begun: the file already there is known to the daemon.
        assert "STATUS" in ready[0].fields
        # The STATUS= line follows the counts (refreshed every few seconds).
        wait_until(
            lambda: any("1 uploaded" in m.fields["STATUS"] for m in manager.with_field("STATUS")),
            30,
            "a STATUS= line counting the uploaded file",
        )
        # Keep-alives keep coming from the running loop, about every 0.5 s.
        count = len(manager.with_field("WATCHDOG", "1"))
        time.sleep(2.0)
        assert len(manager.with_field("WATCHDOG", "1")) - count >= 3
        assert manager.with_field("STOPPING") == []
    finally:
        code = daemon.terminate()
    assert code == 0, daemon.log_text()
    stopping = manager.with_field("STOPPING", "1")
    assert len(stopping) == 1
    assert stopping[0].at > ready[0].at
    assert "stopping" in stopping[0].fields["STATUS"]
    # Stopping asks for daemon.drain_timeout (20 s by default) plus 10 s to close up,
    # whatever TimeoutStopSec says; starting asked for more time before READY.
    assert stopping[0].fields["EXTEND_TIMEOUT_USEC"] == "30000000"
    assert manager.with_field("EXTEND_TIMEOUT_USEC")[0].at < ready[0].at


def test_reload_is_reported_with_reloading_then_ready(
    tmp_path: Path,
    make_config: ConfigMaker,
    bucket: str,
    manager: FakeManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    daemon = _daemon(tmp_path, make_config, bucket, manager)
    try:
        wait_until(lambda: manager.with_field("READY", "1"), 30, "READY=1")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.process.send_signal(signal.SIGHUP)
        reloading = wait_until(lambda: manager.with_field("RELOADING", "1"), 30, "RELOADING=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        # systemd matches the reload by CLOCK_MONOTONIC; it must be "now" on the same clock.
        assert before <= int(reloading[0].fields["MONOTONIC_USEC"]) <= after
        ready = wait_until(
            lambda: [m for m in manager.with_field("READY", "1") if m.at >= reloading[0].at],
            30,
            "READY=1 after the reload",
        )
        assert ready
        assert daemon.wait_for_event("reloaded")
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    # No watchdog pings were asked for (WATCHDOG_USEC unset), so none were sent.
    assert manager.with_field("WATCHDOG") == []


def test_without_notify_socket_nothing_is_sent_and_status_still_works(
    tmp_path: Path, make_config: ConfigMaker, bucket: str, manager: FakeManager
) -> None:
    assert "NOTIFY_SOCKET" not in os.environ
    daemon = _daemon(tmp_path, make_config, bucket, manager)
    try:
        daemon.wait_for_event("running")
        result = run_cli("status", "-s", str(manager.control_socket))
        assert result.returncode == 0, result.stderr
    finally:
        assert daemon.terminate() == 0
    assert manager.messages == []


def test_notifier_speaks_to_abstract_sockets_and_survives_a_missing_manager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"cpg-daemon-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        notifier = Notifier("@" + name)
        notifier.ready("running: line one\nline two")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=running: line one line two"
        notifier.close()
    # The manager went away (socket file gone): sending must not raise.
    gone = Notifier(str(tmp_path / "no-such.sock"))
    gone.status("still uploading")
    gone.status("still uploading")
    assert gone.enabled
    gone.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    notifier = Notifier(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notifier.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert notifier.watchdog_interval() is None
    notifier.close()
    assert Notifier("").watchdog_interval() is None
    assert not Notifier("").enabled
