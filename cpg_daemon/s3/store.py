"""The object-store operations the uploader needs, as one adapter over aiobotocore.

Every botocore error is translated here into a class from ``errors`` named for
how to handle it, so nothing above this module looks at AWS error codes.
Transient failures were already retried by botocore's ``standard`` retry mode
before they reach us.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal
from urllib.parse import quote, urlencode

import aioboto3
import anyio.to_thread
import structlog
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from cpg_daemon.core.checksums import ALGORITHMS, Algorithm
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CredentialsError,
    RetryableError,
    UploadGoneError,
)
from cpg_daemon.s3.crt import CrtDataPlane, proxy_for
from cpg_daemon.s3.errors import classify

log = structlog.get_logger("cpg_daemon.s3.store")

Body = bytes | BinaryIO
"""A request body: bytes, or a seekable binary stream (sent without a copy)."""


@dataclass(frozen=True)
class RemoteObject:
    """What HeadObject or a listing says about an object."""

    key: str
    size: int
    etag: str
    checksums: Mapping[str, str]
    """Algorithm name -> checksum as S3 reports it (HeadObject only; empty from listings)."""
    checksum_type: str | None


@dataclass(frozen=True)
class RemotePart:
    number: int
    etag: str
    size: int
    checksum: str | None


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", ""))


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn botocore exceptions into cpg-daemon error classes."""
    try:
        yield
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        raise classify(what, _code(exc), status, _message(exc)) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise CredentialsError(f"{what}: {exc}") from None
    except EndpointConnectionError as exc:
        raise RetryableError(f"{what}: cannot reach the S3 endpoint: {exc}") from None
    except (BotoConnectionError, HTTPClientError) as exc:
        raise RetryableError(f"{what}: the connection to the S3 endpoint failed: {exc}") from None
    except BotoCoreError as exc:
        raise RetryableError(f"{what}: {exc}") from None
    except OSError as exc:
        raise RetryableError(f"{what}: network error: {exc}") from None


def client_config(s3: S3Config) -> AioConfig:
    """The botocore settings every S3 client of ours uses."""
    return AioConfig(
        retries={"mode": "standard", "total_max_attempts": s3.request_attempts},
        max_pool_connections=s3.max_concurrency + 4,
        connect_timeout=15,
        read_timeout=120,
        tcp_keepalive=True,
        # We compute every checksum ourselves while reading, and send it as a
        # header; botocore must not hash the body a second time.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={
            **({"addressing_style": "path"} if s3.endpoint_url else {}),
            # The checksum header is the payload's integrity check, as over HTTPS:
            # over plain HTTP botocore would otherwise SHA256 every body to sign it.
            **({"payload_signing_enabled": False} if s3.checksum != "none" else {}),
        },
    )


def _load_models(session: aioboto3.Session) -> None:
    """Read botocore's S3 model files in a worker thread.

    Creating a client reads and parses several JSON files synchronously (about
    80 ms, far more on a busy machine), which would block the event loop; the
    session's loader caches them, so the client built right after finds them
    in memory. Best effort: it only moves work off the loop.
    """
    try:
        loader = session._session.get_component("data_loader")
    except AttributeError:  # pragma: no cover - a future aioboto3 without this attribute
        return
    for kind in ("service-2", "endpoint-rule-set-1", "paginators-1"):
        loader.load_service_model("s3", kind)
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        loader.load_data(name)


PER_OBJECT_ENDPOINT_PARAMETERS = ("Key", "Prefix", "CopySource")
"""Endpoint rule-set parameters that change with every object."""


def unreferenced_endpoint_parameters(session: aioboto3.Session) -> tuple[str, ...]:
    """The per-object parameters S3's endpoint rule set declares but never refers to.

    botocore resolves the endpoint of every request by evaluating that rule set,
    about 1 ms of CPU, behind an LRU cache keyed by the rule set's parameters.
    Those include the object key, so with a new key per request the cache never
    hits. The rule set declares ``Key`` (and ``Prefix``, ``CopySource``) but none
    of its rules refers to them, so the endpoint cannot depend on them, and they
    can be left out: the cache then works per bucket. Checked on the rule set in
    use, so a future one that refers to them keeps them. Blocking: call in a thread.
    """
    loader = session._session.get_component("data_loader")
    ruleset = json.dumps(loader.load_service_model("s3", "endpoint-rule-set-1"))
    return tuple(
        name for name in PER_OBJECT_ENDPOINT_PARAMETERS if json.dumps({"ref": name}) not in ruleset
    )


def _leave_out_endpoint_parameters(client: Any, names: tuple[str, ...]) -> None:
    definitions = getattr(getattr(client, "_ruleset_resolver", None), "_param_definitions", None)
    if isinstance(definitions, dict):  # botocore's own; nothing to do if that ever changes
        for name in names:
            definitions.pop(name, None)


CRT_BODY_LIMIT = 4 * 1024 * 1024
"""Bodies up to this size go through the CRT data plane; larger ones through botocore.

The CRT saves about 1 ms of CPU per request but copies each body into buffers
of its own before sending, where botocore streams ours as it is. For whole
files of a few MiB the saving wins (1000 x 2 MiB: 5.4 s of CPU against 6.9 s);
for multipart parts (5 MiB and up) the copy wins, and it doubles the memory
in flight (2 GiB in 16 MiB parts: CRT 4.5 s and 261 MiB RSS, botocore 3.5 s
and 164 MiB). Measured with bench/compare.py's datasets on rclone serve s3.
"""


def _sized(body: Body) -> tuple[BinaryIO, int]:
    """A request body as a stream, and the bytes from its position to its end."""
    stream = io.BytesIO(body) if isinstance(body, bytes) else body
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    return stream, end - start


def choose_data_plane(s3: S3Config) -> tuple[Literal["crt", "botocore"], str]:
    """Who sends file bytes, and why (for the log)."""
    if s3.data_plane != "auto":
        return s3.data_plane, f"s3.data_plane = {s3.data_plane!r}"
    proxy = proxy_for(s3.endpoint_url)
    if proxy:
        return "botocore", f"{proxy} is set and awscrt does not use proxies"
    return "crt", "default"


class ObjectStore:
    """S3 operations for one set of credentials."""

    def __init__(self, client: Any, s3: S3Config, data_plane: CrtDataPlane | None = None) -> None:
        self._client = client
        self._acl = s3.acl
        self._crt = data_plane
        self.algorithm: Algorithm = ALGORITHMS[s3.checksum]

    @classmethod
    @asynccontextmanager
    async def connect(cls, session: aioboto3.Session, s3: S3Config) -> AsyncIterator[ObjectStore]:
        await anyio.to_thread.run_sync(_load_models, session)
        unreferenced = await anyio.to_thread.run_sync(unreferenced_endpoint_parameters, session)
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                session.client(
                    "s3",
                    region_name=s3.region,
                    endpoint_url=s3.endpoint_url or None,
                    config=client_config(s3),
                )
            )
            _leave_out_endpoint_parameters(client, unreferenced)
            plane, reason = choose_data_plane(s3)
            crt = None
            if plane == "crt":
                ca_bundle = session._session.get_config_variable("ca_bundle")
                crt = CrtDataPlane(client, s3, ca_bundle)
            log.info("data_plane", plane=plane, reason=reason)
            yield cls(client, s3, crt)

    @property
    def data_plane(self) -> Literal["crt", "botocore"]:
        return "botocore" if self._crt is None else "crt"

    def _acl_args(self) -> dict[str, str]:
        return {"ACL": self._acl} if self._acl else {}

    def _checksum_args(self, value: str) -> dict[str, str]:
        if not self.algorithm.enabled:
            return {}
        return {"ChecksumAlgorithm": self.algorithm.name, self.algorithm.request_field: value}

    async def head(self, bucket: str, key: str) -> RemoteObject | None:
        """The object's size, ETag and checksums, or None when there is no such object."""
        with translate_errors(f"HeadObject s3://{bucket}/{key}"):
            try:
                reply = await self._client.head_object(
                    Bucket=bucket, Key=key, ChecksumMode="ENABLED"
                )
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                if _code(exc) == "400":
                    # A HEAD reply has no body to say why; S3 answers expired or
                    # invalid session keys with a bare 400.
                    raise CredentialsError(
                        f"HeadObject s3://{bucket}/{key}: 400 Bad Request (expired or "
                        "invalid keys, most likely)"
                    ) from None
                raise
        checksums: dict[str, str] = {
            name: str(reply[f"Checksum{name}"])
            for name in ALGORITHMS
            if reply.get(f"Checksum{name}")
        }
        return RemoteObject(
            key=key,
            size=int(reply["ContentLength"]),
            etag=str(reply.get("ETag", "")),
            checksums=checksums,
            checksum_type=reply.get("ChecksumType"),
        )

    async def first_part_size(self, bucket: str, key: str) -> tuple[int, int] | None:
        """A multipart object's (size of part 1, number of parts), or None when unknown.

        For recomputing a composite checksum or ETag, whose value depends on
        where the uploader cut the parts (all but the last one equal).
        """
        with translate_errors(f"HeadObject s3://{bucket}/{key} part 1"):
            try:
                reply = await self._client.head_object(Bucket=bucket, Key=key, PartNumber=1)
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchKey", "NotFound", "400", "InvalidPartNumber"):
                    return None
                raise
        count = reply.get("PartsCount")
        return (int(reply["ContentLength"]), int(count)) if count else None

    async def list_objects(self, bucket: str, prefix: str) -> AsyncIterator[RemoteObject]:
        """Every object under a prefix (ListObjectsV2, paginated)."""
        with translate_errors(f"ListObjectsV2 s3://{bucket}/{prefix}"):
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield RemoteObject(
                        key=item["Key"],
                        size=int(item["Size"]),
                        etag=str(item.get("ETag", "")),
                        checksums={},
                        checksum_type=None,
                    )

    def _checksum_headers(self, value: str) -> list[tuple[str, str]]:
        if not self.algorithm.enabled:
            return []
        name = self.algorithm.name
        return [("x-amz-checksum-" + name.lower(), value), ("x-amz-sdk-checksum-algorithm", name)]

    async def put_object(self, bucket: str, key: str, body: Body, checksum: str) -> str:
        """One PutObject with the ACL and the checksum computed while reading. Returns the ETag."""
        what = f"PutObject s3://{bucket}/{key}"
        stream, length = _sized(body)
        if self._crt is not None and length <= CRT_BODY_LIMIT:
            headers = self._checksum_headers(checksum)
            if self._acl:
                headers.append(("x-amz-acl", self._acl))
            reply = await self._crt.put(what, "PutObject", bucket, key, "", headers, stream, length)
            return reply.get("etag", "")
        with translate_errors(what):
            reply = await self._client.put_object(
                Bucket=bucket,
                Key=key,
                Body=body,
                **self._acl_args(),
                **self._checksum_args(checksum),
            )
        return str(reply.get("ETag", ""))

    async def create_multipart_upload(self, bucket: str, key: str) -> str:
        args: dict[str, str] = {}
        if self.algorithm.enabled:
            args = {
                "ChecksumAlgorithm": self.algorithm.name,
                "ChecksumType": self.algorithm.multipart_type,
            }
        with translate_errors(f"CreateMultipartUpload s3://{bucket}/{key}"):
            reply = await self._client.create_multipart_upload(
                Bucket=bucket, Key=key, **self._acl_args(), **args
            )
        return str(reply["UploadId"])

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: Body, checksum: str
    ) -> str:
        what = f"UploadPart {number} of s3://{bucket}/{key}"
        stream, length = _sized(body)
        if self._crt is not None and length <= CRT_BODY_LIMIT:
            query = urlencode({"partNumber": number, "uploadId": upload_id}, quote_via=quote)
            headers = self._checksum_headers(checksum)
            reply = await self._crt.put(
                what, "UploadPart", bucket, key, query, headers, stream, length
            )
            return reply.get("etag", "")
        args = {self.algorithm.request_field: checksum} if self.algorithm.enabled else {}
        with translate_errors(what):
            reply = await self._client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                **args,
            )
        return str(reply["ETag"])

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[RemotePart]:
        """The parts the server holds for an upload; UploadGoneError when it is gone."""
        parts: list[RemotePart] = []
        field = self.algorithm.request_field
        with translate_errors(f"ListParts s3://{bucket}/{key}"):
            paginator = self._client.get_paginator("list_parts")
            async for page in paginator.paginate(Bucket=bucket, Key=key, UploadId=upload_id):
                for item in page.get("Parts", []):
                    parts.append(
                        RemotePart(
                            number=int(item["PartNumber"]),
                            etag=str(item["ETag"]),
                            size=int(item["Size"]),
                            checksum=item.get(field),
                        )
                    )
        return parts

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str, str]],
        checksum: str,
    ) -> str:
        """Complete with (number, etag, part checksum) triples and the whole-object checksum."""
        field = self.algorithm.request_field
        listed: list[dict[str, Any]] = []
        for number, etag, part_checksum in parts:
            entry: dict[str, Any] = {"PartNumber": number, "ETag": etag}
            if self.algorithm.enabled:
                entry[field] = part_checksum
            listed.append(entry)
        args: dict[str, str] = {}
        if self.algorithm.enabled and self.algorithm.multipart_type == "FULL_OBJECT":
            args = {field: checksum, "ChecksumType": "FULL_OBJECT"}
        with translate_errors(f"CompleteMultipartUpload s3://{bucket}/{key}"):
            reply = await self._client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
                **args,
            )
        return str(reply.get("ETag", ""))

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort an upload; one that is already gone counts as aborted."""
        try:
            with translate_errors(f"AbortMultipartUpload s3://{bucket}/{key}"):
                await self._client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id
                )
        except UploadGoneError:
            return

    async def delete_object(self, bucket: str, key: str) -> None:
        with translate_errors(f"DeleteObject s3://{bucket}/{key}"):
            await self._client.delete_object(Bucket=bucket, Key=key)
