"""A reverse proxy in front of the test S3 server that injects network and server faults.

The daemon's ``s3.endpoint_url`` points here (awscrt ignores proxy variables, so this is a
reverse proxy, not a forward one); every request is relayed byte for byte to
``upstream_url`` (the moto server), ``Expect: 100-continue`` and keep-alive included,
unless a fault applies to it:

* ``reset``: read the request head and N bytes of its body, then close with SO_LINGER 0,
  so the client gets a TCP RST mid-request (the server never sees the request);
* ``stall``: wait ``seconds`` before forwarding (a slow answer), or with ``seconds=None``
  take the whole request and never answer;
* ``error``: take the whole request and answer S3's error document (``InternalError``
  500, ``SlowDown`` 503, ``RequestTimeTooSkewed`` 403; the server never sees it);
* ``truncate``: forward the request (the server acts on it), then relay only part of the
  reply (its head and half its body; half its status line when it has no body) and close.

Faults come from :class:`Rule` s (by operation, key, a number of times) checked first, then
from an optional seeded random schedule (:class:`Chaos`). Every request is recorded
(:meth:`FaultProxy.seen`) with the fault it got, and faults are counted by kind
(:attr:`FaultProxy.faults`). The proxy runs its own event loop in a daemon thread, on
127.0.0.1, so synchronous tests can use it like the servers in ``fakes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = [
    "INTERNAL_ERROR",
    "SLOW_DOWN",
    "TIME_TOO_SKEWED",
    "Chaos",
    "Fault",
    "FaultProxy",
    "Request",
    "Rule",
    "S3Error",
    "Seen",
    "operation",
]

HOST = "127.0.0.1"
CHUNK = 64 * 1024
STOP_TIMEOUT = 5.0
FaultKind = Literal["reset", "stall", "error", "truncate"]


class _Closed(Exception):
    """This connection is finished (a fault closed it, or a peer went away)."""


@dataclass(frozen=True)
class S3Error:
    """An S3 error reply: HTTP status, error code and message."""

    status: int
    code: str
    message: str

    def document(self, resource: str) -> bytes:
        request_id = uuid.uuid4().hex[:16].upper()
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>{uuid.uuid4().hex}</HostId></Error>"
        ).encode()


INTERNAL_ERROR = S3Error(
    500, "InternalError", "We encountered an internal error. Please try again."
)
SLOW_DOWN = S3Error(503, "SlowDown", "Please reduce your request rate.")
TIME_TOO_SKEWED = S3Error(
    403,
    "RequestTimeTooSkewed",
    "The difference between the request time and the current time is too large.",
)


@dataclass(frozen=True)
class Fault:
    """What to do to one request (see the module docstring)."""

    kind: FaultKind
    error: S3Error | None = None
    """For ``error``: the reply."""
    seconds: float | None = None
    """For ``stall``: the delay before forwarding; None: never answer."""
    after_bytes: int | None = None
    """For ``reset``: body bytes read first; None: a random number below the body's length."""

    @property
    def label(self) -> str:
        """How it is counted: ``reset``, ``stall``, ``hang``, ``truncate``, ``503 SlowDown``."""
        if self.kind == "error":
            assert self.error is not None
            return f"{self.error.status} {self.error.code}"
        if self.kind == "stall" and self.seconds is None:
            return "hang"
        return self.kind


@dataclass(frozen=True)
class Request:
    """One request's head, with the S3 operation it is (path-style addressing)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    operation: str
    bucket: str
    key: str

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")

    @property
    def chunked(self) -> bool:
        return "chunked" in self.header("transfer-encoding").lower()

    @property
    def body_length(self) -> int:
        """Content-Length (0 without one; unknown, so 0, when chunked)."""
        return 0 if self.chunked else int(self.header("content-length") or 0)


def operation(method: str, target: str, headers: Sequence[tuple[str, str]] = ()) -> str:
    """The S3 API operation a path-style request is (``PutObject``, ``UploadPart``, ...)."""
    path, _, query = target.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    key = path.lstrip("/").partition("/")[2]
    if method == "PUT":
        if "partNumber" in params and "uploadId" in params:
            return "UploadPart"
        copy = any(k.lower() == "x-amz-copy-source" for k, _ in headers)
        return ("CopyObject" if copy else "PutObject") if key else "CreateBucket"
    if method == "POST" and key:
        return "CreateMultipartUpload" if "uploads" in params else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "GET" and key:
        return "ListParts" if "uploadId" in params else "GetObject"
    if method == "GET":
        return "ListMultipartUploads" if "uploads" in params else "ListObjects"
    return method


@dataclass
class Rule:
    """Apply ``fault`` to matching requests, ``times`` times (None: every time)."""

    fault: Fault
    operations: frozenset[str] = frozenset()
    """The operations it applies to; empty: all."""
    key: str = ""
    """A substring of the object key; "" matches every key."""
    query: str = ""
    """A substring of the query string, such as ``partNumber=2``."""
    range: str = ""
    """A substring of the Range header, such as ``bytes=10485760-``."""
    times: int | None = None

    def take(self, request: Request) -> bool:
        """Does the rule apply to this request (and count it)?"""
        if self.operations and request.operation not in self.operations:
            return False
        if self.key not in request.key or self.query not in urlsplit(request.target).query:
            return False
        if self.range not in request.header("range"):
            return False
        if self.times == 0:
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass(frozen=True)
class Chaos:
    """A seeded random schedule: a matching request is faulted with probability ``rate``."""

    seed: int
    rate: float
    faults: Sequence[tuple[float, Fault]]
    """(weight, fault) pairs to choose from."""
    operations: frozenset[str] = frozenset()
    """Operations that may be faulted; empty: all."""


@dataclass
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    at: float
    """time.monotonic() when its head arrived."""
    request: Request
    fault: str
    """The fault's label, "" when it was forwarded untouched."""
    status: int | None = None
    """The status the client was sent (or began to be sent); None when it got none."""


class FaultProxy:
    """An HTTP/1.1 reverse proxy on 127.0.0.1 that injects faults (see the module docstring)."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._chaos: Chaos | None = None
        self._rng = random.Random()
        self._faults: Counter[str] = Counter()
        self._seen: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        """Unexpected exceptions in the proxy itself (a peer going away is expected)."""
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._loop is not None:
            raise RuntimeError("FaultProxy is already running")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="FaultProxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(STOP_TIMEOUT)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0, backlog=128)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(STOP_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        loop.close()
        self._loop = self._thread = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self.start() if self._loop is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what to inject, and what happened ---------------------------------------------

    def set_rules(self, *rules: Rule) -> None:
        """Replace the rules (none: stop injecting by rule)."""
        with self._lock:
            self._rules = list(rules)

    def set_chaos(self, chaos: Chaos | None) -> None:
        """Start (or with None, stop) a random schedule, seeded afresh."""
        with self._lock:
            self._chaos = chaos
            self._rng = random.Random(chaos.seed if chaos else None)

    @property
    def faults(self) -> dict[str, int]:
        """Faults injected so far, by label (``reset``, ``stall``, ``503 SlowDown``, ...)."""
        with self._lock:
            return dict(self._faults)

    def seen(self, since: int = 0) -> list[Seen]:
        """Every request so far, oldest first, skipping the first ``since``."""
        with self._lock:
            return self._seen[since:]

    def mark(self) -> int:
        """The number of requests seen so far; pass it as ``seen(since=...)``."""
        with self._lock:
            return len(self._seen)

    def _decide(self, request: Request) -> tuple[Fault | None, Seen]:
        with self._lock:
            fault = next((r.fault for r in self._rules if r.take(request)), None)
            chaos = self._chaos
            if fault is None and chaos is not None:
                eligible = not chaos.operations or request.operation in chaos.operations
                if eligible and self._rng.random() < chaos.rate:
                    weights = [w for w, _ in chaos.faults]
                    fault = self._rng.choices([f for _, f in chaos.faults], weights)[0]
            if fault is not None and fault.kind == "reset" and fault.after_bytes is None:
                cut = self._rng.randrange(max(1, request.body_length))
                fault = dataclasses.replace(fault, after_bytes=cut)
            seen = Seen(time.monotonic(), request, fault.label if fault else "")
            self._seen.append(seen)
            if fault is not None:
                self._faults[fault.label] += 1
            return fault, seen

    # -- one client connection ---------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            while await self._one_request(reader, writer, upstream):
                pass
        except (_Closed, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug here, or a request this proxy cannot parse
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            for stream in [writer] + [w for _, w in upstream]:
                stream.close()

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> bool:
        """Serve one request; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed an idle connection
        method, target, headers = _parse_head(head)
        bucket, _, key = urlsplit(target).path.lstrip("/").partition("/")
        request = Request(
            method, target, headers, operation(method, target, headers), bucket, unquote(key)
        )
        fault, seen = self._decide(request)
        if fault is None or (fault.kind == "stall" and fault.seconds is not None):
            if fault is not None and fault.seconds:
                await asyncio.sleep(fault.seconds)
            return await self._forward(head, request, seen, reader, writer, upstream, False)
        if fault.kind == "truncate":
            return await self._forward(head, request, seen, reader, writer, upstream, True)
        if request.header("expect").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if fault.kind == "reset":
            got, limit = 0, fault.after_bytes or 0
            if limit > 0:
                async for piece in _body(reader, request.chunked, request.body_length):
                    got += len(piece)
                    if got >= limit:
                        break
            _reset(writer)
            raise _Closed
        async for _ in _body(reader, request.chunked, request.body_length):
            pass
        if fault.kind == "stall":  # never answered: wait for the client to give up
            await reader.read()
            raise _Closed
        assert fault.error is not None
        body = b"" if method == "HEAD" else fault.error.document(urlsplit(target).path)
        writer.write(
            f"HTTP/1.1 {fault.error.status} {fault.error.code}\r\n"
            f"x-amz-request-id: {uuid.uuid4().hex[:16].upper()}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nServer: AmazonS3\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        seen.status = fault.error.status
        return request.header("connection").lower() != "close"

    async def _forward(
        self,
        head: bytes,
        request: Request,
        seen: Seen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        truncate: bool,
    ) -> bool:
        """Relay one request and its reply; False when the connection is to be closed."""
        if not upstream:
            upstream.append(await asyncio.open_connection(*self._upstream))
        up_reader, up_writer = upstream[0]
        up_writer.write(head)

        async def pump() -> None:
            async for piece in _body(reader, request.chunked, request.body_length):
                up_writer.write(piece)
                await up_writer.drain()

        sending = asyncio.ensure_future(pump())
        try:
            while True:  # 1xx replies (100 Continue) go straight through
                reply_head = await up_reader.readuntil(b"\r\n\r\n")
                status = int(reply_head.split(b" ", 2)[1])
                if status >= 200:
                    break
                writer.write(reply_head)
            seen.status = status
            reply = dict((k.lower(), v) for k, v in _parse_head(reply_head)[2])
            chunked = "chunked" in reply.get("transfer-encoding", "").lower()
            bodiless = request.method == "HEAD" or status in (204, 304)
            length = 0 if bodiless else int(reply.get("content-length", -1))
            if truncate:
                body = b"".join([p async for p in _body(up_reader, chunked, length)])
                # Without a body, cut the status line itself: a head cut between two
                # header lines would pass for a whole reply with some clients (http.client).
                writer.write(reply_head + body[: len(body) // 2] if body else reply_head[:10])
                await writer.drain()
                raise _Closed
            writer.write(reply_head)
            async for piece in _body(up_reader, chunked, length):
                writer.write(piece)
                await writer.drain()
            await writer.drain()
            if not sending.done():  # answered before the body was sent: S3 would close
                raise _Closed
            await sending
        finally:
            sending.cancel()
        closing = "close" in (reply.get("connection", "") + request.header("connection")).lower()
        return not closing and (chunked or length >= 0)


def _parse_head(head: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(method or version, target or status, headers) of a request or reply head."""
    first, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*first.split(" ", 2), "", ""][:3]
    headers = tuple(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in lines if line)
    )
    return method, target, headers


async def _body(reader: asyncio.StreamReader, chunked: bool, length: int) -> AsyncIterator[bytes]:
    """A message body as it is on the wire (chunk framing kept); length -1: until EOF."""
    if chunked:
        while True:
            line = await reader.readuntil(b"\r\n")
            yield line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    yield trailer
                yield trailer
                return
            async for piece in _body(reader, False, size + 2):
                yield piece
        return
    remaining = length
    while remaining != 0:
        data = await reader.read(CHUNK if remaining < 0 else min(CHUNK, remaining))
        if not data:
            if remaining < 0:
                return
            raise _Closed
        remaining -= len(data) if remaining > 0 else 0
        yield data


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
