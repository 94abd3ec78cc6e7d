"""Both data planes (awscrt and botocore) send the same objects, on a real local S3 server.

The CRT plane builds its own request line from botocore's endpoint, so the keys here
are the ones a hand-made URL gets wrong: spaces, '+', '%', '&', '=', non-ASCII.
"""

from __future__ import annotations

import io
import random
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aioboto3
import pytest
from faultproxy import Fault, FaultProxy, Rule
from s3server import S3Server

from cpg_daemon.core.checksums import ALGORITHMS, encode
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CredentialsError,
    RetryableError,
    SkipFileError,
    ThrottledError,
    UploadGoneError,
)
from cpg_daemon.s3 import crt
from cpg_daemon.s3.dataplane import (
    CRT_BODY_LIMIT,
    PacedBody,
    PartRequest,
    PlaneName,
    PutRequest,
    body_length,
    route,
)
from cpg_daemon.s3.store import ObjectStore, choose_data_plane

PLANES = ["crt", "botocore"]
KEYS = [
    "plain/r01c01f01p01-ch1sk1fk1fl1.tiff",
    "with space/a b.tif",
    "plus+and%percent/x&y=z?.tif",
    "unicode/Ünïcødé µm/€.tif",
    "marks~/semi;colon,comma'quote(1)[2]{3}!*$@.tif",
    "deep/" + "/".join(f"level{i}" for i in range(20)) + "/file.tif",
]
MiB = 1024 * 1024


def crc32c(data: bytes) -> str:
    return encode(ALGORITHMS["CRC32C"].digest(data))


@pytest.mark.anyio
@pytest.mark.parametrize("plane", PLANES)
async def test_put_object_lands_on_the_exact_key_with_its_checksum(
    plane: str, s3_server: S3Server, bucket: str, s3_client: Any
) -> None:
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane=plane)  # type: ignore[arg-type]
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        assert store.data_plane == plane
        etags = {}
        for index, key in enumerate(KEYS):
            data = f"{index}:{key}".encode() * (index + 1)
            etags[key] = await store.put_object(bucket, key, data, crc32c(data))
        empty = await store.put_object(bucket, "empty", b"", crc32c(b""))
    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {*KEYS, "empty"}
    for index, key in enumerate(KEYS):
        data = f"{index}:{key}".encode() * (index + 1)
        head = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert head["ChecksumCRC32C"] == crc32c(data)
        assert head["ETag"] == etags[key]
    assert s3_client.head_object(Bucket=bucket, Key="empty")["ETag"] == empty


# Parts sent by either plane completing into the file: tests/test_s3_contract.py.


class _ErrorReplies(BaseHTTPRequestHandler):
    """Answers every PUT with the status and S3 error document the test chose."""

    protocol_version = "HTTP/1.1"  # botocore sends Expect: 100-continue
    reply: tuple[int, str] = (500, "InternalError")

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, code = self.reply
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>the test says {code}</Message>"
            "<RequestId>1</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def error_server() -> Iterator[tuple[int, type[_ErrorReplies]]]:
    handler = type("Replies", (_ErrorReplies,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.anyio
@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize(
    ("status", "code", "kind", "says"),
    [
        (404, "NoSuchUpload", UploadGoneError, "NoSuchUpload"),
        (404, "NoSuchBucket", SkipFileError, "the bucket does not exist"),
        (403, "AccessDenied", SkipFileError, "access denied"),
        (400, "ExpiredToken", CredentialsError, "ExpiredToken"),
        (403, "SignatureDoesNotMatch", CredentialsError, "SignatureDoesNotMatch"),
        (500, "InternalError", RetryableError, "InternalError|HTTP 5xx"),
        (503, "SlowDown", ThrottledError, "SlowDown"),
        (403, "RequestTimeTooSkewed", RetryableError, "clock differs from S3's"),
    ],
)
async def test_error_replies_are_classified_the_same_way(
    plane: str,
    status: int,
    code: str,
    kind: type[Exception],
    says: str,
    error_server: tuple[int, type[_ErrorReplies]],
) -> None:
    port, handler = error_server
    handler.reply = (status, code)
    s3 = S3Config(
        endpoint_url=f"http://127.0.0.1:{port}",
        data_plane=plane,  # type: ignore[arg-type]
        request_attempts=1,
    )
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        with pytest.raises(kind, match=says) as caught:
            await store.upload_part("b", "k", "id", 1, b"x", crc32c(b"x"))
    assert type(caught.value) is kind
    assert "UploadPart 1 of s3://b/k" in str(caught.value)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on loopback that accepts, reads everything, and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(False)
            held.append(conn)
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.anyio
async def test_a_request_the_server_never_answers_is_cancelled_and_retryable(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(crt, "STALL_SECONDS", 1.0)
    s3 = S3Config(endpoint_url=f"http://127.0.0.1:{silent_server}", data_plane="crt")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        with pytest.raises(RetryableError, match=r"no reply within \d+ s; cancelled"):
            await store.put_object("b", "k", b"x" * 1000, crc32c(b"x" * 1000))


@pytest.mark.anyio
async def test_an_endpoint_nobody_listens_on_is_a_retryable_network_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    s3 = S3Config(endpoint_url=f"http://127.0.0.1:{port}", data_plane="crt", request_attempts=1)
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        with pytest.raises(RetryableError, match="cannot reach the S3 endpoint") as caught:
            await store.put_object("b", "k", b"x", crc32c(b"x"))
    assert "AWS_SECRET" not in str(caught.value)


@pytest.mark.anyio
async def test_missing_credentials_are_a_credentials_error(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="crt")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        with pytest.raises(CredentialsError, match="Unable to locate credentials"):
            await store.put_object("b", "k", b"x", crc32c(b"x"))


def test_auto_uses_botocore_when_a_proxy_is_set_for_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    local = S3Config(endpoint_url="http://127.0.0.1:9000")
    aws = S3Config()
    assert choose_data_plane(local)[0] == "crt"
    assert choose_data_plane(aws)[0] == "crt"
    monkeypatch.setenv("https_proxy", "http://user:secret@proxy.example:3128")
    assert choose_data_plane(local)[0] == "crt"  # an https proxy does not apply to http
    plane, reason = choose_data_plane(aws)
    assert plane == "botocore"
    assert "https_proxy" in reason and "secret" not in reason
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert choose_data_plane(local)[0] == "botocore"
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    assert choose_data_plane(local)[0] == "crt"
    assert choose_data_plane(S3Config(data_plane="crt"))[0] == "crt"  # explicit wins


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["CRC32C", "CRC32", "SHA256", "CRC64NVME"])
async def test_every_checksum_algorithm_reaches_the_object(
    name: str, s3_server: S3Server, bucket: str, s3_client: Any
) -> None:
    """The header S3 checks an unsigned payload against: x-amz-checksum-<algorithm>."""
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="crt", checksum=name)  # type: ignore[arg-type]
    data = name.encode() * 1000
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        value = encode(store.algorithm.digest(data))
        await store.put_object(bucket, "k", data, value)
    head = s3_client.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert head[f"Checksum{name}"] == value


class _Plane:
    """A data plane that records what it was asked to send."""

    def __init__(self, name: PlaneName) -> None:
        self.name: PlaneName = name
        self.sent: list[PutRequest] = []

    async def put_object(self, request: PutRequest) -> str:
        self.sent.append(request)
        return f'"{self.name}"'

    async def upload_part(self, request: PartRequest) -> str:
        self.sent.append(request)
        return f'"{self.name}-part"'


def test_the_crt_sends_bodies_up_to_its_limit_and_botocore_the_rest() -> None:
    botocore, crt = _Plane("botocore"), _Plane("crt")
    small = PutRequest("b", "k", io.BytesIO(), CRT_BODY_LIMIT, "")
    large = PartRequest("b", "k", io.BytesIO(), CRT_BODY_LIMIT + 1, "", "id", 1)
    assert route(small, botocore, crt) is crt
    assert route(large, botocore, crt) is botocore
    assert route(small, botocore, None) is botocore  # no CRT plane: botocore sends all


class _Pacer:
    """A link with a fixed read size (0: no limit in force) that never waits."""

    def __init__(self, chunk: int) -> None:
        self.chunk_size = chunk
        self.taken: list[int] = []

    def chunk(self) -> int:
        return self.chunk_size

    def slowest(self) -> int:
        return self.chunk_size * 10

    async def take(self, amount: int) -> None:
        self.taken.append(amount)


@pytest.mark.parametrize(
    ("chunk", "length", "plane"),
    [
        (100_000, 100_000, "crt"),  # one paced read: paid whole, then the CRT sends it
        (100_000, 100_001, "botocore"),  # more: only a plane that streams can pace it
        (0, CRT_BODY_LIMIT, "crt"),  # no limit in force now: routed as any body
        (0, CRT_BODY_LIMIT + 1, "botocore"),
    ],
)
def test_a_paced_body_of_more_than_one_read_goes_to_the_plane_that_streams(
    chunk: int, length: int, plane: str
) -> None:
    botocore, crt = _Plane("botocore"), _Plane("crt")
    body = PacedBody(bytes(length), _Pacer(chunk))
    request = PutRequest("b", "k", body, body_length(body), "")
    assert request.length == length
    assert route(request, botocore, crt).name == plane


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


@pytest.mark.anyio
async def test_a_paced_body_cut_off_mid_way_is_sent_again_from_its_start(
    proxy: FaultProxy, bucket: str, s3_client: Any
) -> None:
    """botocore rewinds the body (seek) before its retry; the paced reads start over."""
    data = random.Random(5).randbytes(MiB)
    pacer = _Pacer(64 * 1024)
    proxy.set_rules(Rule(Fault("reset", after_bytes=300_000), frozenset({"PutObject"}), times=1))
    s3 = S3Config(endpoint_url=proxy.endpoint_url)
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        await store.put_object(bucket, "paced", PacedBody(data, pacer), crc32c(data))
    assert s3_client.get_object(Bucket=bucket, Key="paced")["Body"].read() == data
    assert [s.fault for s in proxy.seen() if s.request.operation == "PutObject"] == ["reset", ""]
    # Paced a read at a time, the first attempt's reads up to the reset and all the second's.
    assert set(pacer.taken) == {64 * 1024}
    assert sum(pacer.taken) >= MiB + 300_000


class _Client:
    """Just the two calls of an aiobotocore client that carry bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def put_object(self, **args: Any) -> dict[str, str]:
        self.calls.append(("put_object", args))
        return {"ETag": '"botocore"'}

    async def upload_part(self, **args: Any) -> dict[str, str]:
        self.calls.append(("upload_part", args))
        return {"ETag": '"botocore-part"'}


@pytest.mark.anyio
async def test_the_store_builds_one_request_and_hands_it_to_the_routed_plane() -> None:
    client, crt = _Client(), _Plane("crt")
    store = ObjectStore(client, S3Config(checksum="CRC32C", acl="bucket-owner-full-control"), crt)
    big = b"x" * (CRT_BODY_LIMIT + 1)
    assert await store.put_object("b", "small", b"abc", crc32c(b"abc")) == '"crt"'
    assert await store.upload_part("b", "k", "id", 7, b"abc", "c") == '"crt-part"'
    assert await store.put_object("b", "big", big, "C") == '"botocore"'
    assert await store.upload_part("b", "k", "id", 8, big, "C") == '"botocore-part"'
    first, part = crt.sent
    assert (first.bucket, first.key, first.length, first.checksum) == (
        "b",
        "small",
        3,
        crc32c(b"abc"),
    )
    assert first.stream().read() == b"abc"
    assert isinstance(part, PartRequest) and (part.upload_id, part.part_number) == ("id", 7)
    assert part.what == "UploadPart 7 of s3://b/k"
    (put, put_args), (upload, part_args) = client.calls
    assert (put, upload) == ("put_object", "upload_part")
    assert put_args["Body"] is big  # bytes stay bytes: botocore sends no Expect: 100-continue
    assert put_args["ACL"] == "bucket-owner-full-control"
    assert (put_args["ChecksumAlgorithm"], put_args["ChecksumCRC32C"]) == ("CRC32C", "C")
    assert (part_args["UploadId"], part_args["PartNumber"], part_args["ChecksumCRC32C"]) == (
        "id",
        8,
        "C",
    )
    assert "ACL" not in part_args
