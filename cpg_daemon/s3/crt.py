"""The data plane: the requests that carry file bytes, sent by the AWS Common Runtime.

botocore spends about 1.5 ms of CPU in Python on every request (serialising,
endpoint resolution, signing, event hooks, parsing the reply); with thousands of
small files that is most of an upload's CPU (bench/RESULTS.md). awscrt, AWS's
native runtime (behind the AWS CLI v2 and s3transfer's CRT mode, and already our
CRC library), signs and sends a request in C for a fraction of that.

Only PutObject and UploadPart go this way, and the GetObject of an S3 SRC's objects
(``get_range``: the CRT hands a body over a part at a time, where aiohttp hands it a
socket read at a time). Everything else (multipart
create/complete/abort, ListParts, HeadObject, listings) stays on aiobotocore,
and so do the credentials (refreshable, Access Grants: read afresh before every
request) and the endpoint (S3's endpoint rule set, evaluated by botocore once per
bucket). What a request carries is what botocore would send: the checksum we
computed while reading (S3 checks the bytes against it), the canned ACL, and
SigV4 with an unsigned payload, as botocore signs uploads over HTTPS. The CRT
retries throttling, 5xx and network errors with backoff (``request_attempts`` in
all); error replies are classified by ``errors.classify``, the table botocore's use too.

awscrt reads no proxy variables: ``s3.data_plane = "auto"`` falls back to
botocore when one is set for the endpoint (``dataplane.choose_data_plane``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

import anyio
import anyio.to_thread
from awscrt import auth, http, s3
from awscrt import io as crtio

from cpg_daemon.core.checksums import ALGORITHMS, Algorithm
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CpgError,
    CredentialsError,
    FileChangedError,
    RetryableError,
    ThrottledError,
    VanishedError,
)
from cpg_daemon.s3 import _botocore
from cpg_daemon.s3.dataplane import PacedBody, PartRequest, PlaneName, PutRequest
from cpg_daemon.s3.errors import classify

STALL_SECONDS = 120.0
"""A request gets this long, plus time for its body at SLOWEST_RATE, before it is cancelled."""
SLOWEST_RATE = 64 * 1024
"""Bytes per second below which a request counts as stalled (botocore: a 120 s read timeout)."""


def throughput_target(connections: int) -> float:
    """The CRT client's throughput target (Gbit/s) that lets it open ``connections``.

    The CRT caps its connections at about 10 per 4 Gbit/s of its target (aws-c-s3: ten
    connections per endpoint address, one address per 4 Gbit/s), whatever the override
    says: at its default target of 10 that is 30, and over a 100 ms link the requests
    allowed stopped climbing there (1,000 x 64 KiB: 6.2 s at 10, 4.9 s at 25.6, peak RSS
    93 -> 97 MiB). Never below the default.
    """
    return max(10.0, connections / 2.5)


def _retry_config(attempts: int) -> s3.S3RetryConfig:
    """The CRT's standard retry mode with botocore's number of attempts (0 retries = none)."""
    if attempts <= 1:  # the CRT reads max_retries=0 as "its default", not "none"
        return s3.S3RetryConfig(retry_mode=s3.S3RetryMode.NONE)
    return s3.S3RetryConfig(max_retries=attempts - 1)


@dataclass(frozen=True)
class _Endpoint:
    """Where one bucket's objects are: scheme, host[:port], path prefix, signing region."""

    tls: bool
    host: str
    base_path: str
    region: str


_bootstrap: crtio.ClientBootstrap | None = None
_bootstrap_lock = threading.Lock()


def _shared_bootstrap() -> crtio.ClientBootstrap:
    """One event-loop group and resolver for every CRT client of the process."""
    global _bootstrap
    with _bootstrap_lock:
        if _bootstrap is None:
            group = crtio.EventLoopGroup()
            _bootstrap = crtio.ClientBootstrap(group, crtio.DefaultHostResolver(group))
        return _bootstrap


def _error_reply(body: bytes | None) -> tuple[str, str]:
    """(Code, Message) of an S3 error document; empty strings when there is none."""
    if not body:
        return "", ""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


_SERVER_ERRORS = {
    "AWS_ERROR_S3_INTERNAL_ERROR": "the server failed (HTTP 5xx), on every attempt",
    "AWS_ERROR_S3_SLOW_DOWN": "SlowDown: the server asked for fewer requests, on every attempt",
}


def _failure(
    what: str, error: Exception | None, status: int, body: bytes | None, endpoint: str
) -> CpgError:
    if status >= 300:
        code, message = _error_reply(body)
        return classify(what, code, status, message)
    name = getattr(error, "name", type(error).__name__)
    detail = f"{name}: {getattr(error, 'message', str(error))}"
    if name in _SERVER_ERRORS:  # the CRT keeps no status or body for these
        kind = ThrottledError if name == "AWS_ERROR_S3_SLOW_DOWN" else RetryableError
        return kind(f"{what}: {_SERVER_ERRORS[name]}")
    if name == "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED":  # nor for this one
        return classify(what, "RequestTimeTooSkewed", 403, "")
    if "AUTH" in name or "CREDENTIALS" in name:
        return CredentialsError(f"{what}: cannot sign the request: {detail}")
    if name.startswith(("AWS_IO_SOCKET", "AWS_IO_DNS")):
        return RetryableError(f"{what}: cannot reach the S3 endpoint {endpoint}: {detail}")
    if "TLS" in name:
        return RetryableError(
            f"{what}: TLS with the S3 endpoint {endpoint} failed (is its certificate "
            f"trusted? AWS_CA_BUNDLE names extra ones): {detail}"
        )
    return RetryableError(f"{what}: the connection to the S3 endpoint {endpoint} failed: {detail}")


def _setter_for_any_thread(event: anyio.Event) -> Callable[[], None]:
    """A function that any thread may call to set ``event``, without waiting.

    awscrt calls back on its own I/O threads. anyio's way back to the loop
    (``from_thread.run_sync`` with an ``EventLoopToken``) blocks the calling thread
    until the loop has run the call, which would hold up every connection served by
    that CRT thread; anyio schedules without waiting only from 4.16
    (``token.backend_class.run_sync_soon``), and pyproject allows anyio 4.4. So this
    one bridge asks the asyncio loop (the daemon's anyio backend) directly.
    """
    loop = asyncio.get_running_loop()

    def set_soon() -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    return set_soon


class CrtDataPlane:
    """PutObject and UploadPart through awscrt's S3 client, for one botocore client."""

    name: PlaneName = "crt"

    def __init__(self, client: Any, s3_config: S3Config, ca_bundle: str | None) -> None:
        self._botocore_client = client
        self._config = s3_config
        self._ca_bundle = ca_bundle
        self._algorithm: Algorithm = ALGORITHMS[s3_config.checksum]
        self._endpoints: dict[str, _Endpoint] = {}
        self._clients: dict[bool, s3.S3Client] = {}
        self._signing: tuple[tuple[object, ...], auth.AwsSigningConfig] | None = None

    @classmethod
    async def open(cls, client: Any, s3_config: S3Config, ca_bundle: str | None) -> CrtDataPlane:
        """A data plane whose CRT client for the configured endpoint is ready.

        That client is built in a worker thread: with TLS, loading the trust store
        takes about 15 ms of CPU, which would otherwise be spent on the event loop at
        the first request.
        """
        plane = cls(client, s3_config, ca_bundle)
        tls = urlsplit(s3_config.endpoint_url or "https://s3.amazonaws.com").scheme != "http"
        await anyio.to_thread.run_sync(plane._client, tls)
        return plane

    def _client(self, tls: bool) -> s3.S3Client:
        client = self._clients.get(tls)
        if client is None:
            options = None
            if tls:
                context = crtio.TlsContextOptions()
                if self._ca_bundle:
                    context.override_default_trust_store_from_path(None, self._ca_bundle)
                options = crtio.ClientTlsContext(context).new_connection_options()
            client = s3.S3Client(
                bootstrap=_shared_bootstrap(),
                region=self._config.region,
                tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
                tls_connection_options=options,
                max_active_connections_override=self._config.max_concurrency,
                throughput_target_gbps=throughput_target(self._config.max_concurrency),
                retry_config=_retry_config(self._config.request_attempts),
                connect_timeout_ms=15_000,
            )
            self._clients[tls] = client
        return client

    async def _endpoint(self, bucket: str) -> _Endpoint:
        """The bucket's endpoint, from botocore's endpoint rule set (cached per bucket)."""
        endpoint = self._endpoints.get(bucket)
        if endpoint is None:
            url, properties = await _botocore.bucket_endpoint(self._botocore_client, bucket)
            schemes = properties.get("authSchemes") or [{}]
            parts = urlsplit(url)
            endpoint = _Endpoint(
                tls=parts.scheme == "https",
                host=parts.netloc,
                base_path=parts.path.rstrip("/"),
                region=schemes[0].get("signingRegion") or self._config.region,
            )
            self._endpoints[bucket] = endpoint
        return endpoint

    async def _signing_config(self, what: str, region: str) -> auth.AwsSigningConfig:
        """SigV4 for S3 with the botocore client's current keys (refreshed if due)."""
        credentials = _botocore.signing_credentials(self._botocore_client)
        if credentials is None:
            raise CredentialsError(f"{what}: Unable to locate credentials")
        frozen = await credentials.get_frozen_credentials()
        identity = (frozen.access_key, frozen.secret_key, frozen.token, region)
        if self._signing is None or self._signing[0] != identity:
            provider = auth.AwsCredentialsProvider.new_static(
                frozen.access_key, frozen.secret_key, frozen.token
            )
            signing = auth.AwsSigningConfig(
                algorithm=auth.AwsSigningAlgorithm.V4,
                signature_type=auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
                credentials_provider=provider,
                region=region,
                service="s3",
                use_double_uri_encode=False,
                should_normalize_uri_path=False,
                signed_body_value=auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
                signed_body_header_type=auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
            )
            self._signing = (identity, signing)
        return self._signing[1]

    def _deadline(self, length: int, body: object = None) -> float:
        """Seconds a request of ``length`` bytes gets: the stall allowance, and its body
        at the slowest rate a connection may see (a share of the lowest bandwidth limit,
        if lower)."""
        rate = SLOWEST_RATE
        # A paced body knows the running limit (a reload may have changed it).
        limit = body.pacer.slowest() if isinstance(body, PacedBody) else 0
        limit = limit or self._config.max_bandwidth.lowest
        if limit:
            rate = min(rate, max(1, limit // self._config.max_concurrency))
        return STALL_SECONDS + length / rate

    def _checksum_headers(self, request: PutRequest) -> list[tuple[str, str]]:
        if not self._algorithm.enabled:
            return []
        name = self._algorithm.name
        return [
            ("x-amz-checksum-" + name.lower(), request.checksum),
            ("x-amz-sdk-checksum-algorithm", name),
        ]

    async def put_object(self, request: PutRequest) -> str:
        headers = self._checksum_headers(request)
        if self._config.acl:
            headers.append(("x-amz-acl", self._config.acl))
        reply = await self._put("PutObject", request, "", headers)
        return reply.get("etag", "")

    async def upload_part(self, request: PartRequest) -> str:
        query = urlencode(
            {"partNumber": request.part_number, "uploadId": request.upload_id}, quote_via=quote
        )
        reply = await self._put("UploadPart", request, query, self._checksum_headers(request))
        return reply.get("etag", "")

    async def _put(
        self, operation: str, request: PutRequest, query: str, headers: Sequence[tuple[str, str]]
    ) -> dict[str, str]:
        """Send one PUT of the request's body; the reply's headers (lower-case names)."""
        what = request.what
        endpoint = await self._endpoint(request.bucket)
        signing = await self._signing_config(what, endpoint.region)
        path = f"{endpoint.base_path}/{quote(request.key, safe='/~')}"
        message = http.HttpRequest(
            "PUT",
            path + (f"?{query}" if query else ""),
            http.HttpHeaders(
                [("Host", endpoint.host), ("Content-Length", str(request.length)), *headers]
            ),
            request.stream(),
        )
        if isinstance(request.body, PacedBody):
            # The CRT copies the body before sending it at line rate: the link's share
            # is taken for all of it first (``route`` sends it only bodies of one paced
            # read or less while a limit is in force).
            await request.body.pay()
        return await self._send(
            what,
            endpoint,
            self._deadline(request.length, request.body),
            type=s3.S3RequestType.DEFAULT,
            operation_name=operation,
            request=message,
            signing_config=signing,
        )

    async def get_range(
        self, bucket: str, key: str, offset: int, length: int, etag: str, whole: bool
    ) -> bytes:
        """GetObject of ``length`` bytes from ``offset`` (``Storage.get_range``): the CRT
        hands the body over a part at a time (one call for a file of a few MiB) where
        aiohttp hands it a socket read at a time, most of the CPU of reading an object.
        ``whole``: no Range, and the CRT checks the bytes against the object's checksum."""
        what = f"GetObject s3://{bucket}/{key}"
        endpoint = await self._endpoint(bucket)
        signing = await self._signing_config(what, endpoint.region)
        headers = [("Host", endpoint.host)]
        if length and not whole:
            headers.append(("Range", f"bytes={offset}-{offset + length - 1}"))
        if etag:
            headers.append(("If-Match", etag))
        path = f"{endpoint.base_path}/{quote(key, safe='/~')}"
        buffer = bytearray(length)
        received = [0]

        start = 0 if whole else offset

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            # ``offset`` is the chunk's place in the object, not in the range.
            begin = offset - start
            if begin >= 0 and begin + len(chunk) <= length:  # else: an error, said below
                buffer[begin : begin + len(chunk)] = chunk
            received[0] += len(chunk)

        await self._send(
            what,
            endpoint,
            self._deadline(length),
            {
                412: FileChangedError(f"{what} changed since it was listed"),
                404: VanishedError(f"{what}: no such object any more"),
            },
            type=s3.S3RequestType.GET_OBJECT,
            request=http.HttpRequest("GET", path, http.HttpHeaders(headers)),
            signing_config=signing,
            checksum_config=s3.S3ChecksumConfig(validate_response=whole),
            on_body=on_body,
        )
        if received[0] != length:
            raise FileChangedError(f"{what}: {received[0]:,} bytes from {offset:,}, not {length:,}")
        return bytes(buffer)

    async def _send(
        self,
        what: str,
        endpoint: _Endpoint,
        seconds: float,
        instead: Mapping[int, CpgError] | None = None,
        **request: Any,
    ) -> dict[str, str]:
        """One CRT request, waited for on the event loop (cancelled after ``seconds``);
        the reply's headers (lower-case names). An error reply raises the error
        ``instead`` holds for its HTTP status, else the class ``errors.classify`` gives."""
        reply: dict[str, str] = {}
        outcome: list[tuple[Exception | None, int, bytes | None]] = []
        finished = anyio.Event()
        wake = _setter_for_any_thread(finished)

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            if 200 <= status_code < 300:
                reply.update((name.lower(), value) for name, value in headers)

        def on_done(
            error: Exception | None = None,
            status_code: int | None = None,
            error_body: bytes | None = None,
            **_: Any,
        ) -> None:
            outcome.append((error, status_code or 0, error_body))
            wake()

        sent = self._client(endpoint.tls).make_request(
            on_headers=on_headers, on_done=on_done, **request
        )
        try:
            with anyio.move_on_after(seconds):
                await finished.wait()
            if not outcome:
                raise RetryableError(f"{what}: no reply within {seconds:.0f} s; cancelled")
        except BaseException:
            sent.cancel()
            raise
        error, status, error_body = outcome[0]
        if error is not None or not 200 <= status < 300:
            if instead and status in instead:
                raise instead[status]
            url = f"{'https' if endpoint.tls else 'http'}://{endpoint.host}"
            raise _failure(what, error, status, error_body, url)
        return reply
