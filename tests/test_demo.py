"""``cpg-daemon demo``: the quick start's first command works on its own, and leaves nothing.

Each test runs the real command in a subprocess, as a newcomer would, and then
checks what it printed and what it left behind: the temporary folder must be
gone and the local S3 server (a child process) stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

DEMO = [sys.executable, "-m", "cpg_daemon", "demo"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\r")
BUCKET_PREFIX = "s3://staging-cellpainting-gallery/cpg0000-demo/broad"


def _printed(output: str) -> tuple[Path, int, int]:
    """The temporary folder, the server's port and the server's pid, as the demo printed them."""
    folder = re.search(r"temporary folder +(\S+)", output)
    server = re.search(r"local S3 server +http://127\.0\.0\.1:(\d+) \(moto, pid (\d+)\)", output)
    assert folder and server, output
    return Path(folder[1]), int(server[1]), int(server[2])


def _assert_left_nothing(output: str) -> None:
    folder, port, pid = _printed(output)
    try:
        assert not folder.exists(), f"{folder} is still there"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the server process is gone (stopped and reaped)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # never leak a server, even when the test fails


def test_demo_uploads_and_verifies_the_sample_then_exits() -> None:
    # stdout is a pipe, not a terminal: the demo must exit by itself.
    started = time.monotonic()
    result = subprocess.run(DEMO, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "verify: 70 files match their objects (size and CRC32C), 0 differ" in out
    assert "70/70 files" in out
    assert re.search(r"^  images +66 files match, 0 differ", out, re.MULTILINE), out
    assert re.search(r"^  workspace +4 files match, 0 differ", out, re.MULTILINE), out
    # Where everything is, and the gallery's layout in the bucket.
    for what in ("config file", "journal", "control socket", "server log", "watch images"):
        assert f"  {what} " in out
    images = f"{BUCKET_PREFIX}/images/2026_11_25_DemoBatch/images/"
    assert f"{images}DemoPlate1__2026-11-25T09_00_00-Measurement1/Images/  61 objects" in out
    assert f"{BUCKET_PREFIX}/images/2026_11_25_DemoBatch/illum/DemoPlate1/  5 objects" in out
    backend = f"{BUCKET_PREFIX}/workspace/backend/2026_11_25_DemoBatch/DemoPlate1/"
    assert f"{backend}DemoPlate1.sqlite" in out
    assert "/workspace/load_data_csv/2026_11_25_DemoBatch/DemoPlate1/load_data.csv" in out
    # Short enough for a CI log: one progress line a second at most.
    progress = re.findall(r"^ +\d+\.\d s  \d+/70 files", out, re.MULTILINE)
    assert 1 <= len(progress) <= elapsed + 2, out
    assert "from another terminal" not in out  # it exits: nothing to ask
    _assert_left_nothing(out)


def test_a_signal_while_the_server_starts_leaves_nothing_behind() -> None:
    process = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = ""
    try:
        while "(moto, pid" not in output:
            line = process.stdout.readline()
            assert line, output
            output += line
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output += rest
    # Interrupted before it could show anything: the status of a command stopped by Ctrl-C.
    assert process.returncode == 130, output + errors
    assert "interrupted (SIGINT): cleaning up" in output
    assert "Traceback" not in errors, errors
    _assert_left_nothing(output)


def _read_all(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            return
        if not chunk:
            return
        into.append(chunk)


def test_ctrl_c_in_a_terminal_stops_the_daemon_and_the_server_and_cleans_up() -> None:
    # On a terminal the demo shows the live view and keeps the daemon running until
    # Ctrl-C: run it on a pseudo-terminal, wait for the invitation, then interrupt.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="160", LINES="40")
    process = subprocess.Popen(DEMO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(master, chunks), daemon=True)
    reader.start()

    def output() -> str:
        return ANSI.sub("", b"".join(chunks).decode(errors="replace"))

    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops the daemon" not in output():
            assert process.poll() is None, output()
            assert time.monotonic() < deadline, output()
            time.sleep(0.1)
        # Running, as promised: the status command it printed answers.
        command = re.search(r"^  (.+ status -s \S+) --watch$", output(), re.MULTILINE)
        assert command, output()
        status = subprocess.run(
            [*DEMO[:-1], "status", "-s", command[1].split()[-1]],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "70 uploaded" in status.stdout
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        os.close(master)
    text = output()
    # Ctrl-C is how the interactive demo is meant to end: after a good run, status 0.
    assert returncode == 0, text
    assert "verify: 70 files match their objects (size and CRC32C), 0 differ" in text
    assert "interrupted" not in text
    assert "stopping the daemon" in text
    assert "Traceback" not in text
    _assert_left_nothing(text)
