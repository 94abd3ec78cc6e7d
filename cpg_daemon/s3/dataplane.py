"""The data plane: the requests that carry file bytes, behind one narrow interface.

Two requests carry bytes, PutObject and UploadPart; a :class:`DataPlane` sends them
and returns the ETag. Two implementations: :class:`BotocoreDataPlane` (the
aiobotocore client every other request uses too) and ``crt.CrtDataPlane`` (awscrt's
native S3 client, cheaper in CPU per request). Which one sends a request is decided
in one place, :func:`route`, from what :func:`choose_data_plane` decided at connect.
Everything else (HeadObject, listings, multipart create/complete/abort, ListParts)
is the control plane, in ``store.ObjectStore``.
"""

from __future__ import annotations

import io
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import urlsplit

from cpg_daemon.core.checksums import ALGORITHMS, Algorithm
from cpg_daemon.core.config import S3Config
from cpg_daemon.s3.errors import translate_errors

PlaneName = Literal["crt", "botocore"]


class Pacer(Protocol):
    """The shared link's limit (``engine.pacing.Bandwidth``), as a paced body uses it."""

    def chunk(self) -> int:
        """Bytes per paced read now; 0 when no limit is in force."""
        ...

    def slowest(self) -> int:
        """The lowest limit ever in force, bytes per second (0: never limited)."""
        ...

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` more bytes may go on the wire."""
        ...


class PacedBody:
    """Request bytes whose reads are paced by the shared link (``s3.max_bandwidth``).

    To botocore it is a seekable stream (``read``/``seek``/``tell``: the length, and a
    rewind before a retry); to aiohttp, which sends it, an async iterable of chunks of
    ``Pacer.chunk()`` bytes, each sent once the link has room for it. So the wire
    follows the limit over a fraction of a second rather than a part at a time. It
    is not an ``io.IOBase``: aiohttp would then read it on executor threads. Only a
    plane that writes the body as it goes can pace it (``must_stream``); the CRT
    copies a body into its own buffer first, so it is handed only bodies of one chunk
    or less, after ``pay`` (``route``): it then reads it (``readinto``, on a thread of
    its own) while the event loop only waits for the reply.
    """

    def __init__(self, data: bytes | io.BytesIO, pacer: Pacer) -> None:
        if isinstance(data, io.BytesIO):  # its buffer, from its position: no copy
            self._data = data.getbuffer()[data.tell() :]
        else:
            self._data = memoryview(data)
        self._pacer = pacer
        self._position = 0

    @property
    def pacer(self) -> Pacer:
        return self._pacer

    def must_stream(self) -> bool:
        """Whether the rest is more than one paced read: only a streaming plane may send it."""
        chunk = self._pacer.chunk()
        return 0 < chunk < len(self._data) - self._position

    async def pay(self) -> None:
        """Wait until the rest may go at once (for a plane that sends from its own copy)."""
        await self._pacer.take(len(self._data) - self._position)

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[memoryview]:
        """The rest, a paced read at a time (slices of the bytes: no copies)."""
        while self._position < len(self._data):
            size = self._pacer.chunk() or len(self._data)
            piece = self._data[self._position : self._position + size]
            await self._pacer.take(len(piece))
            self._position += len(piece)
            yield piece

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._data)
        if size is not None and size >= 0:
            end = min(end, self._position + size)
        piece = self._data[self._position : end].tobytes()
        self._position = max(self._position, end)
        return piece

    def readinto(self, buffer: memoryview) -> int:
        """Unpaced, straight into ``buffer`` (the CRT's)."""
        piece = self._data[self._position : self._position + len(buffer)]
        buffer[: len(piece)] = piece
        self._position += len(piece)
        return len(piece)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def rest(self) -> memoryview:
        """The bytes from the position on, without a copy."""
        return self._data[self._position :]


Body = bytes | BinaryIO | PacedBody
"""A request body: bytes, a seekable binary stream (sent without a copy), or bytes
paced by the shared bandwidth limit."""


@dataclass(frozen=True)
class PutRequest:
    """One PutObject: ``length`` bytes of ``body`` (from its position), and their checksum."""

    bucket: str
    key: str
    body: Body
    """As the caller gave it: botocore sends bytes and streams differently (a stream
    gets ``Expect: 100-continue``); ``stream()`` gives the CRT a stream either way."""
    length: int
    checksum: str
    """The body's checksum (base64) with the configured algorithm; unused when that is none."""

    @property
    def what(self) -> str:
        """The request, as error messages name it."""
        return f"PutObject s3://{self.bucket}/{self.key}"

    def stream(self) -> BinaryIO | PacedBody:
        """The body as a binary stream, read unpaced (bytes wrapped without a copy)."""
        return io.BytesIO(self.body) if isinstance(self.body, bytes) else self.body


@dataclass(frozen=True)
class PartRequest(PutRequest):
    """One UploadPart: a PutRequest for part ``part_number`` of a multipart upload."""

    upload_id: str
    part_number: int

    @property
    def what(self) -> str:
        return f"UploadPart {self.part_number} of s3://{self.bucket}/{self.key}"


def body_length(body: Body) -> int:
    """The bytes of a request body, from a stream's position to its end."""
    if isinstance(body, bytes):
        return len(body)
    if isinstance(body, PacedBody):
        return len(body.rest())
    start = body.tell()
    end = body.seek(0, io.SEEK_END)
    body.seek(start)
    return end - start


class DataPlane(Protocol):
    """Sends the requests that carry file bytes; each returns the ETag S3 gave the bytes.

    Errors are cpg-daemon's classes (``core.errors``), classified by ``errors.classify``.
    """

    @property
    def name(self) -> PlaneName: ...

    async def put_object(self, request: PutRequest) -> str: ...

    async def upload_part(self, request: PartRequest) -> str: ...


class BotocoreDataPlane:
    """PutObject and UploadPart through the aiobotocore client (which streams the body)."""

    name: PlaneName = "botocore"

    def __init__(self, client: Any, s3: S3Config) -> None:
        self._client = client
        self._acl = s3.acl
        self._algorithm: Algorithm = ALGORITHMS[s3.checksum]

    def _checksum(self, request: PutRequest) -> dict[str, str]:
        if not self._algorithm.enabled:
            return {}
        return {self._algorithm.request_field: request.checksum}

    async def put_object(self, request: PutRequest) -> str:
        args = {"ACL": self._acl} if self._acl else {}
        if self._algorithm.enabled:
            args["ChecksumAlgorithm"] = self._algorithm.name
        with translate_errors(request.what):
            reply = await self._client.put_object(
                Bucket=request.bucket,
                Key=request.key,
                Body=request.body,
                **args,
                **self._checksum(request),
            )
        return str(reply.get("ETag", ""))

    async def upload_part(self, request: PartRequest) -> str:
        with translate_errors(request.what):
            reply = await self._client.upload_part(
                Bucket=request.bucket,
                Key=request.key,
                UploadId=request.upload_id,
                PartNumber=request.part_number,
                Body=request.body,
                **self._checksum(request),
            )
        return str(reply["ETag"])


# -- the routing policy -------------------------------------------------------------------

CRT_BODY_LIMIT = 4 * 1024 * 1024
"""Bodies up to this size go through the CRT data plane; larger ones through botocore.

The CRT saves about 1 ms of CPU per request but copies each body into buffers
of its own before sending, where botocore streams ours as it is. For whole
files of a few MiB the saving wins (1000 x 2 MiB: 5.4 s of CPU against 6.9 s);
for multipart parts (5 MiB and up) the copy wins, and it doubles the memory
in flight (2 GiB in 16 MiB parts: CRT 4.5 s and 261 MiB RSS, botocore 3.5 s
and 164 MiB). Measured with bench/compare.py's datasets on rclone serve s3.
"""


def memory_cost(plane: str, length: int) -> int:
    """The memory a body of ``length`` bytes takes while it is sent: twice its size when
    it goes through the CRT (which copies it), once through botocore."""
    return 2 * length if plane == "crt" and length <= CRT_BODY_LIMIT else length


def proxy_for(endpoint_url: str) -> str:
    """The proxy the environment sets for the S3 endpoint ("" for AWS's), or "" for none.

    Names the variable, never its value (a proxy URL may hold a password).
    """
    url = urlsplit(endpoint_url or "https://s3.amazonaws.com")
    proxies = urllib.request.getproxies_environment()
    if url.scheme not in proxies and "all" not in proxies:
        return ""
    if urllib.request.proxy_bypass(url.hostname or ""):
        return ""
    return f"{url.scheme}_proxy" if url.scheme in proxies else "all_proxy"


def choose_data_plane(s3: S3Config) -> tuple[PlaneName, str]:
    """Who sends file bytes, and why (for the log): decided once, at connect.

    awscrt reads no proxy variables, so ``auto`` falls back to botocore when one
    is set for the endpoint.
    """
    if s3.data_plane != "auto":
        return s3.data_plane, f"s3.data_plane = {s3.data_plane!r}"
    proxy = proxy_for(s3.endpoint_url)
    if proxy:
        return "botocore", f"{proxy} is set and awscrt does not use proxies"
    return "crt", "default"


def route(request: PutRequest, botocore: DataPlane, crt: DataPlane | None) -> DataPlane:
    """The plane that sends one request: the CRT's, when connected, for bodies up to
    CRT_BODY_LIMIT; botocore's for everything else, and for a paced body longer than
    one paced read (botocore writes a body as it goes, so its reads pace the wire;
    the CRT copies it whole first, then sends at line rate)."""
    if isinstance(request.body, PacedBody) and request.body.must_stream():
        return botocore
    if crt is not None and request.length <= CRT_BODY_LIMIT:
        return crt
    return botocore
