"""The object store: S3's control plane for one set of credentials, and its data plane.

HeadObject, listings, multipart create/complete/abort and ListParts go through the
aiobotocore client; the requests that carry file bytes go through a data plane
(``dataplane``), the CRT's or botocore's, as ``dataplane.route`` decides. Every error
is translated into a class from ``core.errors`` named for how to handle it
(``errors.translate_errors``), so nothing above this package looks at AWS error codes.
Transient failures were already retried by botocore's ``standard`` retry mode (or
the CRT's) before they reach us.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aioboto3
import anyio.to_thread
import structlog
from aiobotocore.config import AioConfig
from botocore import UNSIGNED
from botocore.exceptions import ClientError, FlexibleChecksumError

from cpg_daemon.core.checksums import ALGORITHMS, Algorithm
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CredentialsError,
    FileChangedError,
    RetryableError,
    UploadGoneError,
    VanishedError,
)
from cpg_daemon.s3 import _botocore
from cpg_daemon.s3.crt import CrtDataPlane
from cpg_daemon.s3.dataplane import (
    CRT_BODY_LIMIT,
    Body,
    BotocoreDataPlane,
    DataPlane,
    PartRequest,
    PlaneName,
    PutRequest,
    body_length,
    choose_data_plane,
    proxy_for,
    route,
)
from cpg_daemon.s3.errors import error_code as _code
from cpg_daemon.s3.errors import translate_errors

__all__ = [
    "CRT_BODY_LIMIT",
    "Body",
    "Level",
    "ObjectStore",
    "RemoteObject",
    "RemotePart",
    "Storage",
    "choose_data_plane",
    "client_config",
    "translate_errors",
    "unreferenced_endpoint_parameters",
]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RemoteObject:
    """What HeadObject or a listing says about an object."""

    key: str
    size: int
    etag: str
    checksums: Mapping[str, str]
    """Algorithm name -> checksum as S3 reports it (HeadObject only; empty from listings)."""
    checksum_type: str | None
    modified_ns: int = 0
    """LastModified, in nanoseconds since the epoch (0 where the reply has none)."""


@dataclass(frozen=True)
class Level:
    """One level of a folder: what a listing with ``Delimiter="/"`` returns."""

    folders: tuple[str, ...]
    """The prefixes of the folders directly below it (each ending in ``/``), in order."""
    objects: tuple[RemoteObject, ...]
    """The objects directly in it."""


@dataclass(frozen=True)
class RemotePart:
    number: int
    etag: str
    size: int
    checksum: str | None


def client_config(s3: S3Config, unsigned: bool = False) -> AioConfig:
    """The botocore settings every S3 client of ours uses (``unsigned``: requests carry
    no signature, for reading a public bucket without keys, as ``--no-sign-request``)."""
    return AioConfig(
        **({"signature_version": UNSIGNED} if unsigned else {}),
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


def _client_options(s3: S3Config, unsigned: bool = False) -> dict[str, Any]:
    """``session.client("s3", ...)``'s arguments for our settings."""
    options: dict[str, Any] = {
        "region_name": s3.region,
        "endpoint_url": s3.endpoint_url or None,
        "config": client_config(s3, unsigned),
    }
    if urlsplit(s3.endpoint_url).scheme == "http" and not proxy_for(s3.endpoint_url):
        # No TLS anywhere on the way: without this, the client's first request loads
        # the CA bundle into an SSL context it never uses (50 ms of CPU on the loop).
        options["verify"] = False
    return options


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
    ruleset = json.dumps(_botocore.s3_endpoint_ruleset(session))
    return tuple(
        name for name in PER_OBJECT_ENDPOINT_PARAMETERS if json.dumps({"ref": name}) not in ruleset
    )


class Storage(Protocol):
    """What the engine asks of an object store: ObjectStore, or tests' in-memory one.

    Errors are cpg-daemon's classes (``core.errors``); tests/test_s3_contract.py holds
    every implementation to the same behaviour.
    """

    algorithm: Algorithm

    @property
    def data_plane(self) -> str: ...

    async def head(self, bucket: str, key: str) -> RemoteObject | None: ...

    async def first_part_size(self, bucket: str, key: str) -> tuple[int, int] | None: ...

    def list_objects(self, bucket: str, prefix: str) -> AsyncIterator[RemoteObject]: ...

    async def get_range(
        self, bucket: str, key: str, offset: int, length: int, etag: str = "", whole: bool = False
    ) -> bytes: ...

    async def list_level(self, bucket: str, prefix: str) -> Level: ...

    async def copy_object(
        self, source: tuple[str, str, str], bucket: str, key: str
    ) -> tuple[str, str]: ...

    async def put_object(self, bucket: str, key: str, body: Body, checksum: str) -> str: ...

    async def create_multipart_upload(self, bucket: str, key: str) -> str: ...

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: Body, checksum: str
    ) -> str: ...

    async def upload_part_copy(
        self,
        source: tuple[str, str, str],
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        byte_range: tuple[int, int],
    ) -> tuple[str, str]: ...

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[RemotePart]: ...

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str, str]],
        checksum: str,
    ) -> str: ...

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None: ...

    async def delete_object(self, bucket: str, key: str) -> None: ...


def _nanoseconds(when: Any) -> int:
    """A reply's datetime (LastModified) in nanoseconds since the epoch; 0 for none."""
    return int(when.timestamp()) * 1_000_000_000 if when is not None else 0


class ObjectStore:
    """S3 operations for one set of credentials (a :class:`Storage`).

    ``data_plane`` is the CRT's plane when it sends small bodies (``connect`` makes
    it), or None when botocore sends every body.
    """

    def __init__(self, client: Any, s3: S3Config, data_plane: DataPlane | None = None) -> None:
        self._client = client
        self._acl = s3.acl
        self._botocore_plane: DataPlane = BotocoreDataPlane(client, s3)
        self._crt = data_plane
        self.algorithm: Algorithm = ALGORITHMS[s3.checksum]

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, session: aioboto3.Session, s3: S3Config, *, unsigned: bool = False
    ) -> AsyncIterator[ObjectStore]:
        """A store with its own client. Model files, the client and the CRT client are
        built in worker threads: their CPU stays off the event loop. ``unsigned``: no
        request is signed (reading a public bucket without keys)."""
        options = _client_options(s3, unsigned)
        async with _botocore.client(session, "s3", **options) as client:
            unreferenced = await anyio.to_thread.run_sync(unreferenced_endpoint_parameters, session)
            _botocore.leave_out_endpoint_parameters(client, unreferenced)
            plane, reason = choose_data_plane(s3)
            crt = None
            if plane == "crt":
                crt = await CrtDataPlane.open(client, s3, _botocore.ca_bundle(session))
            log.info("data_plane", plane=plane, reason=reason)
            yield cls(client, s3, crt)

    @property
    def data_plane(self) -> PlaneName:
        return "botocore" if self._crt is None else "crt"

    def _acl_args(self) -> dict[str, str]:
        return {"ACL": self._acl} if self._acl else {}

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
            modified_ns=_nanoseconds(reply.get("LastModified")),
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
                        modified_ns=_nanoseconds(item.get("LastModified")),
                    )

    async def get_range(
        self, bucket: str, key: str, offset: int, length: int, etag: str = "", whole: bool = False
    ) -> bytes:
        """``length`` bytes of an object from ``offset`` (GetObject with a Range); with
        ``etag``, of that version only: FileChangedError when the object was replaced
        meanwhile (or is shorter), VanishedError when it is gone. ``whole``: the range is
        the whole object, asked for without a Range so that S3 sends the checksum it
        keeps and botocore checks the bytes against it."""
        if isinstance(self._crt, CrtDataPlane):
            return await self._crt.get_range(bucket, key, offset, length, etag, whole)
        what = f"GetObject s3://{bucket}/{key}"
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if whole:
            args["ChecksumMode"] = "ENABLED"
        elif length:  # an empty range cannot be asked for: an empty object is read whole
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        if etag:
            args["IfMatch"] = etag
        with translate_errors(what):
            try:
                reply = await self._client.get_object(**args)
                async with reply["Body"] as stream:
                    data: bytes = await stream.read()
            except FlexibleChecksumError as exc:
                raise RetryableError(f"{what}: the bytes read do not match: {exc}") from None
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412"):
                    raise FileChangedError(f"{what} changed since it was listed") from None
                if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                    raise VanishedError(f"{what}: no such object any more") from None
                raise
        if len(data) != length:
            raise FileChangedError(f"{what}: {len(data):,} bytes from {offset:,}, not {length:,}")
        return data

    async def copy_object(
        self, source: tuple[str, str, str], bucket: str, key: str
    ) -> tuple[str, str]:
        """Copy the object ``source`` (bucket, key, ETag: that version only) to ``key``
        within S3 (CopyObject, up to 5 GiB): nothing passes through this machine. S3
        computes the new object's checksum; returns its ETag and that checksum (base64,
        "" without one). FileChangedError when the source is no longer that version."""
        src_bucket, src_key, _ = source
        what = f"CopyObject s3://{src_bucket}/{src_key} to s3://{bucket}/{key}"
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, **self._acl_args()}
        if self.algorithm.enabled:
            args["ChecksumAlgorithm"] = self.algorithm.name
        return await self._copied(what, source, self._client.copy_object, args)

    async def list_level(self, bucket: str, prefix: str) -> Level:
        """The folders and objects directly below a prefix (ListObjectsV2, Delimiter "/").

        A big tree is listed level by level and its folders in parallel (``engine.dataset``):
        one listing of the whole prefix would be one request after another.
        """
        folders: list[str] = []
        objects: list[RemoteObject] = []
        with translate_errors(f"ListObjectsV2 s3://{bucket}/{prefix} (one level)"):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            async for page in pages:
                folders += [str(item["Prefix"]) for item in page.get("CommonPrefixes", [])]
                objects += [
                    RemoteObject(
                        key=item["Key"],
                        size=int(item["Size"]),
                        etag=str(item.get("ETag", "")),
                        checksums={},
                        checksum_type=None,
                    )
                    for item in page.get("Contents", [])
                ]
        return Level(tuple(folders), tuple(objects))

    async def put_object(self, bucket: str, key: str, body: Body, checksum: str) -> str:
        """One PutObject with the ACL and the checksum computed while reading. Returns the ETag."""
        request = PutRequest(bucket, key, body, body_length(body), checksum)
        return await route(request, self._botocore_plane, self._crt).put_object(request)

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
        """One UploadPart with the part's checksum. Returns the part's ETag."""
        request = PartRequest(bucket, key, body, body_length(body), checksum, upload_id, number)
        return await route(request, self._botocore_plane, self._crt).upload_part(request)

    async def upload_part_copy(
        self,
        source: tuple[str, str, str],
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        byte_range: tuple[int, int],
    ) -> tuple[str, str]:
        """Part ``number`` copied within S3 from bytes ``byte_range`` (first, last, both
        included) of the object ``source`` (bucket, key, ETag: that version only). Returns
        the part's ETag and the checksum S3 computed for it ("" when it reports none)."""
        src_bucket, src_key, _ = source
        what = f"UploadPartCopy {number} of s3://{bucket}/{key} from s3://{src_bucket}/{src_key}"
        first, last = byte_range
        args: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "UploadId": upload_id,
            "PartNumber": number,
            "CopySourceRange": f"bytes={first}-{last}",
        }
        return await self._copied(what, source, self._client.upload_part_copy, args)

    async def _copied(
        self, what: str, source: tuple[str, str, str], operation: Any, args: dict[str, Any]
    ) -> tuple[str, str]:
        """A copy within S3 (CopyObject, UploadPartCopy) of ``source`` (bucket, key, ETag:
        that version only): its ETag and the checksum S3 computed ("" for none). A source
        replaced since it was listed is a changed file; one gone, a vanished one."""
        src_bucket, src_key, etag = source
        args["CopySource"] = {"Bucket": src_bucket, "Key": src_key}
        if etag:
            args["CopySourceIfMatch"] = etag
        with translate_errors(what):
            try:
                reply = await operation(**args)
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412"):
                    raise FileChangedError(
                        f"{what}: the source changed since it was listed"
                    ) from None
                if _code(exc) in ("NoSuchKey", "404"):
                    raise VanishedError(f"{what}: no such object any more") from None
                raise
        result = reply.get("CopyObjectResult") or reply.get("CopyPartResult") or {}
        field = self.algorithm.request_field
        checksum = str(result.get(field, "")) if self.algorithm.enabled else ""
        return str(result.get("ETag", "")), checksum

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


if TYPE_CHECKING:

    def _an_object_store_is_a_storage(store: ObjectStore) -> Storage:
        return store  # mypy checks that the class keeps to the protocol
