"""The fork server (tests/forkserver.py) starts commands as a fresh interpreter would.

Each case runs the same command both ways and compares what a test can see: the exit
status, both streams, the environment and working directory the command used, its
standard input, and the status of a process stopped by a signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from forkserver import ForkServer, run

pytestmark = pytest.mark.skipif(
    os.environ.get("CPG_TESTS_FORK") == "0", reason="the fork server is turned off"
)


def _fresh(
    args: list[str], cwd: Path, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpg_daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["nosuch"],
        # a relative path: read from the working directory the command was given
        ["check", "--offline", "-c", "config.toml"],
        # the keys given on standard input, refused (no daemon): the message names the socket
        ["credentials", "set", "-c", "config.toml"],
    ],
)
def test_a_forked_command_is_the_fresh_one(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "watch").mkdir()
    (tmp_path / "config.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[watch]]\npath = "{tmp_path / "watch"}"\n'
        'destination = "s3://bucket-name/cpg0000-x/broad/images/2026_01_01_B/"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "61")  # argparse wraps its help to this width
    keys = "export AWS_ACCESS_KEY_ID=AKIAEXAMPLE\n"
    forked = run(args, timeout=60, input=keys)
    fresh = _fresh(args, tmp_path, input=keys)
    assert forked.args[1:] == args
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )


def test_a_signal_ends_a_forked_process_as_it_ends_a_child(tmp_path: Path) -> None:
    server = ForkServer.get()
    assert server is not None
    read, write = os.pipe()
    with open(tmp_path / "out", "wb") as out:
        # `credentials set` waits for the keys on a pipe nobody writes to
        process = server.spawn(
            ["credentials", "set", "-c", str(tmp_path / "none.toml")],
            stdin=read,
            stdout=out.fileno(),
            stderr=out.fileno(),
            env=dict(os.environ),
        )
    os.close(read)
    try:
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(0.2)
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        assert process.poll() == -signal.SIGKILL
    finally:
        os.close(write)
