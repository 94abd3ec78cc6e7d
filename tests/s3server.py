"""A real, local S3-compatible server for tests: ``moto_server`` in a subprocess.

The server listens on a free port on 127.0.0.1 and writes its werkzeug access log to a
file, which :meth:`S3Server.requests` parses so tests can assert on the exact S3
requests a client made (e.g. how many UploadPart calls a resumed upload issued).

Only path-style addressing is supported (the first path segment is the bucket); the
server is started with ``S3_IGNORE_SUBDOMAIN_BUCKETNAME=true`` so moto never tries to
read a bucket name out of the Host header.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, unquote

from loopguard import harness

__all__ = ["Request", "S3Server", "S3ServerError", "parse_log_line"]

HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 10.0

# CSI escape sequences (colours, bold, reset) that werkzeug may wrap around the
# request line.
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

# 127.0.0.1 - - [25/Nov/2026 11:41:14] "PUT /bkt/k?partNumber=1&uploadId=x HTTP/1.1" 200 -
# werkzeug percent-decodes the logged path/query except for reserved characters, so
# the target may contain spaces (and even quotes): match it greedily up to the protocol.
_LINE_RE = re.compile(
    r'\[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>.*) (?P<proto>HTTP/\d(?:\.\d)?)" '
    r"(?P<status>\d{3}) "
)


class S3ServerError(RuntimeError):
    """The moto server could not be started."""


@dataclass(frozen=True)
class Request:
    """One request from the server's access log (path-style addressing)."""

    method: str
    bucket: str
    key: str
    query: dict[str, str] = field(hash=False)
    status: int

    @property
    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber" in self.query and "uploadId" in self.query


def parse_log_line(line: str) -> Request | None:
    """Parse one werkzeug access-log line; return None for anything else."""
    match = _LINE_RE.search(_ANSI_RE.sub("", line))
    if match is None:
        return None
    target = match["target"]
    path, _, raw_query = target.partition("?")
    # The bucket is the first path segment; the key is everything after the next "/".
    bucket, _, raw_key = path.removeprefix("/").partition("/")
    query = dict(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else {}
    return Request(
        method=match["method"],
        bucket=unquote(bucket),
        # unquote, not unquote_plus: a literal "+" in a path is a plus sign.
        key=unquote(raw_key),
        query=query,
        status=int(match["status"]),
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_http(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


class S3Server:
    """A ``moto_server`` subprocess bound to 127.0.0.1 on a free port."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self._process = process
        self.port = port
        self.endpoint_url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self._parsing = threading.Lock()
        self._parsed: list[Request] = []
        self._parsed_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        log_dir: Path,
        *,
        timeout: float = DEFAULT_START_TIMEOUT,
        attempts: int = 3,
    ) -> S3Server:
        """Start a server, logging to a file in ``log_dir``; wait until it answers HTTP.

        Retries on a fresh port if the process exits early (e.g. the port was taken
        between choosing it and binding it). Raises :class:`S3ServerError` with the log
        tail if the server does not come up.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        last_error: S3ServerError | None = None
        for attempt in range(1, attempts + 1):
            port = _free_port()
            log_path = log_dir / f"moto_server-{port}-{attempt}.log"
            server = cls._spawn(port, log_path)
            try:
                server._wait_ready(timeout)
            except S3ServerError as exc:
                exited = not server.running
                server.stop()
                last_error = exc
                if not exited:
                    break  # it neither answered nor exited: retrying will not help
                continue
            except BaseException:
                server.stop()
                raise
            return server
        assert last_error is not None
        raise last_error

    @classmethod
    def _spawn(cls, port: int, log_path: Path) -> S3Server:
        env = dict(os.environ)
        env.update(
            S3_IGNORE_SUBDOMAIN_BUCKETNAME="true",
            PYTHONUNBUFFERED="1",
            PYTHONIOENCODING="utf-8",
            # Keep the server from reaching real AWS or a user's configuration.
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing-secret",
            AWS_DEFAULT_REGION="us-east-1",
        )
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.pop(name, None)
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
        with open(log_path, "wb") as log_file:
            # The child keeps its own copy of the descriptor; ours is closed on exit.
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return cls(process, port, log_path)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise S3ServerError(
                    f"moto_server exited with status {self._process.returncode} before "
                    f"answering on port {self.port}; log tail:\n{self.log_tail()}"
                )
            if _answers_http(self.port):
                return
            if time.monotonic() >= deadline:
                raise S3ServerError(
                    f"moto_server did not answer on port {self.port} within {timeout:g} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Terminate the server (kill it if it does not exit within ``timeout``)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        else:
            self._process.wait()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the access log ----------------------------------------------------------------

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @harness
    def requests(self, since: int = 0) -> list[Request]:
        """All requests in the access log, oldest first, skipping the first ``since``.

        werkzeug logs a request when the response status is sent, i.e. before the client
        has the response, so every request a client has completed is already here.
        The log is read on from where the last call stopped (it holds every request of
        the session: parsing it whole each time cost a test 0.4 s late in a run).
        """
        with self._parsing:
            try:
                with open(self.log_path, "rb") as log:
                    log.seek(self._parsed_bytes)
                    new = log.read()
            except FileNotFoundError:
                new = b""
            complete = new[: new.rfind(b"\n") + 1]  # a line being written waits
            self._parsed_bytes += len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                request = parse_log_line(line)
                if request is not None:
                    self._parsed.append(request)
            return self._parsed[since:]

    def mark(self) -> int:
        """The number of requests logged so far; pass it as ``requests(since=...)``."""
        return len(self.requests())

    def upload_part_requests(self, bucket: str, key: str, since: int = 0) -> list[Request]:
        """UploadPart requests (PUT with ``partNumber`` and ``uploadId``) for one object.

        UploadPartCopy looks the same in the access log (the copy source is a header).
        """
        return [
            r
            for r in self.requests(since)
            if r.bucket == bucket and r.key == key and r.is_upload_part
        ]

    def put_object_requests(self, bucket: str, key: str, since: int = 0) -> list[Request]:
        """PutObject requests (PUT without ``partNumber``) for one object.

        Copies cannot be told apart from the access log (``x-amz-copy-source`` is a
        header), but neither boto3 nor the daemon sends them to these keys in tests.
        """
        return [
            r
            for r in self.requests(since)
            if r.method == "PUT"
            and r.bucket == bucket
            and r.key == key
            and "partNumber" not in r.query
        ]
