"""A real, local S3-compatible server for tests: ``moto_server`` in a subprocess.

The server (started by the package's launcher, ``cpg_daemon.cli.localserver``) listens
on a free port on 127.0.0.1 and writes its werkzeug access log to a file, which
:meth:`S3Server.requests` parses so tests can assert on the exact S3
requests a client made (e.g. how many UploadPart calls a resumed upload issued).

Only path-style addressing is supported (the first path segment is the bucket); the
server is started with ``S3_IGNORE_SUBDOMAIN_BUCKETNAME=true`` so moto never tries to
read a bucket name out of the Host header.
"""

from __future__ import annotations

import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote

from loopguard import harness

from cpg_daemon.cli.localserver import LocalS3Server, LocalServerError

__all__ = ["Request", "S3Server", "S3ServerError", "parse_log_line"]

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


S3ServerError = LocalServerError
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


class S3Server(LocalS3Server):
    """The package's local moto server, with its access log read as S3 requests."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        super().__init__(process, port, log_path)
        self._parsing = threading.Lock()
        self._parsed: list[Request] = []
        self._parsed_bytes = 0

    # -- the access log ----------------------------------------------------------------

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
