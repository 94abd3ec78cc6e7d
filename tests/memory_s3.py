"""An S3 store in memory, for fast pipeline tests: what ObjectStore offers, without a server.

:class:`MemoryStore` has ObjectStore's control-plane and data-plane methods with the
same signatures and S3's semantics where the uploader and verify depend on them:
ETags are quoted MD5s (``md5-of-md5s-N`` for multipart objects), every part but the
last must be at least 5 MiB (EntityTooSmall at completion), parts are checked
against their ETags and order, an aborted or completed upload is gone
(NoSuchUpload -> UploadGoneError), a missing bucket is NoSuchBucket, and a checksum
that does not match the body is refused (BadDigest) as S3 does. Checksums come
back the way moto returns them: HeadObject gives the whole object's value (with
ChecksumType only for multipart objects), ListParts none, listings none.
tests/test_s3_contract.py runs the same contract against it and against ObjectStore
on moto, for both data planes.

Faults: ``store.before`` is called with every :class:`Call` before it is served and
may raise (cpg-daemon's error classes, as the real store would); :meth:`fail`
installs the common "raise this N times" rule. ``store.calls`` records every call.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio.lowlevel

from cpg_daemon.core.checksums import ALGORITHMS, Algorithm, ChecksumName, PartDigest, encode
from cpg_daemon.core.errors import CpgError, FileChangedError, VanishedError
from cpg_daemon.s3.dataplane import Body, PutRequest, body_length
from cpg_daemon.s3.errors import classify
from cpg_daemon.s3.store import Level, RemoteObject, RemotePart

MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest part, except the last one."""
MAX_PART_NUMBER = 10_000


@dataclass(frozen=True)
class Call:
    """One request to the store, as the fault hook sees it."""

    operation: str
    """The S3 operation: "PutObject", "UploadPart", "HeadObject", "ListObjectsV2", ..."""
    bucket: str
    key: str
    part_number: int = 0


@dataclass
class _Object:
    data: bytes
    etag: str
    checksums: dict[str, str]
    checksum_type: str | None
    part_sizes: list[int] = field(default_factory=list)
    """Sizes of the parts it was completed from (empty for a single PutObject)."""


@dataclass
class _Part:
    data: bytes
    etag: str


@dataclass
class _Upload:
    bucket: str
    key: str
    parts: dict[int, _Part] = field(default_factory=dict)


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


class MemoryStore:
    """ObjectStore's surface over dictionaries (one instance = one S3 account)."""

    def __init__(
        self,
        checksum: ChecksumName = "CRC32C",
        buckets: tuple[str, ...] = (),
        data_plane: str = "memory",
    ) -> None:
        self.algorithm: Algorithm = ALGORITHMS[checksum]
        self.buckets: dict[str, dict[str, _Object]] = {name: {} for name in buckets}
        self.uploads: dict[str, _Upload] = {}
        self.calls: list[Call] = []
        self.before: Callable[[Call], None] | None = None
        """Called with every call before it is served; raise to inject a fault."""
        self._data_plane = data_plane

    @property
    def data_plane(self) -> str:
        return self._data_plane

    # -- test helpers ------------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        self.buckets.setdefault(name, {})

    def object_bytes(self, bucket: str, key: str) -> bytes:
        return self.buckets[bucket][key].data

    def fail(
        self,
        operation: str,
        error: CpgError,
        times: int = 1,
        key: str | None = None,
        part_number: int | None = None,
    ) -> None:
        """Make the next ``times`` calls of ``operation`` raise ``error``.

        Only calls on ``key`` and for part ``part_number``, when given.
        """
        left = [times]
        previous = self.before

        def hook(call: Call) -> None:
            if (
                call.operation == operation
                and key in (None, call.key)
                and part_number in (None, call.part_number)
                and left[0] > 0
            ):
                left[0] -= 1
                raise error
            if previous is not None:
                previous(call)

        self.before = hook

    # -- the machinery -----------------------------------------------------------------

    async def _enter(self, call: Call) -> None:
        await anyio.lowlevel.checkpoint()  # a request is a suspension point, as on a network
        self.calls.append(call)
        if self.before is not None:
            self.before(call)

    def _objects(self, what: str, bucket: str) -> dict[str, _Object]:
        objects = self.buckets.get(bucket)
        if objects is None:
            raise classify(what, "NoSuchBucket", 404, "The specified bucket does not exist")
        return objects

    def _upload(self, what: str, bucket: str, key: str, upload_id: str) -> _Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (bucket, key):
            raise classify(
                what,
                "NoSuchUpload",
                404,
                "The specified upload does not exist. The upload ID may be invalid, "
                "or the upload may have been aborted or completed.",
            )
        return upload

    def _check_digest(self, what: str, data: bytes, checksum: str) -> None:
        if self.algorithm.enabled and encode(self.algorithm.digest(data)) != checksum:
            name = self.algorithm.name
            raise classify(
                what,
                "BadDigest",
                400,
                f"The {name} you specified did not match the calculated checksum.",
            )

    # -- the control plane -------------------------------------------------------------

    async def head(self, bucket: str, key: str) -> RemoteObject | None:
        await self._enter(Call("HeadObject", bucket, key))
        # A HEAD reply has no body: S3 answers a missing bucket with a bare 404 too.
        found = self.buckets.get(bucket, {}).get(key)
        if found is None:
            return None
        return RemoteObject(
            key=key,
            size=len(found.data),
            etag=found.etag,
            checksums=dict(found.checksums),
            checksum_type=found.checksum_type,
        )

    async def first_part_size(self, bucket: str, key: str) -> tuple[int, int] | None:
        await self._enter(Call("HeadObject", bucket, key, 1))
        found = self.buckets.get(bucket, {}).get(key)
        if found is None or not found.part_sizes:
            return None
        return found.part_sizes[0], len(found.part_sizes)

    async def list_objects(self, bucket: str, prefix: str) -> AsyncIterator[RemoteObject]:
        await self._enter(Call("ListObjectsV2", bucket, prefix))
        objects = self._objects(f"ListObjectsV2 s3://{bucket}/{prefix}", bucket)
        for key in sorted(k for k in objects if k.startswith(prefix)):
            found = objects[key]
            yield RemoteObject(key, len(found.data), found.etag, {}, None)

    def _version(self, what: str, bucket: str, key: str, etag: str) -> _Object:
        """The object, if it is still the version ``etag`` names (any, for "")."""
        found = self._objects(what, bucket).get(key)
        if found is None:
            raise VanishedError(f"{what}: no such object any more")
        if etag and etag != found.etag:
            raise FileChangedError(f"{what} changed since it was listed")
        return found

    async def get_range(
        self, bucket: str, key: str, offset: int, length: int, etag: str = "", whole: bool = False
    ) -> bytes:
        what = f"GetObject s3://{bucket}/{key}"
        await self._enter(Call("GetObject", bucket, key))
        found = self._version(what, bucket, key, etag)
        data = found.data[offset : offset + length] if length else found.data
        if len(data) != length:
            raise FileChangedError(f"{what}: {len(data):,} bytes from {offset:,}, not {length:,}")
        return data

    async def copy_object(
        self, source: tuple[str, str, str], bucket: str, key: str
    ) -> tuple[str, str]:
        src_bucket, src_key, etag = source
        what = f"CopyObject s3://{src_bucket}/{src_key} to s3://{bucket}/{key}"
        await self._enter(Call("CopyObject", bucket, key))
        found = self._version(what, src_bucket, src_key, etag)
        checksum = encode(self.algorithm.digest(found.data)) if self.algorithm.enabled else ""
        self._objects(what, bucket)[key] = _Object(
            found.data,
            _etag(found.data),
            {self.algorithm.name: checksum} if checksum else {},
            "FULL_OBJECT" if checksum else None,
        )
        return _etag(found.data), checksum

    async def list_level(self, bucket: str, prefix: str) -> Level:
        await self._enter(Call("ListObjectsV2", bucket, prefix))
        objects = self._objects(f"ListObjectsV2 s3://{bucket}/{prefix}", bucket)
        folders: dict[str, None] = {}
        here: list[RemoteObject] = []
        for key in sorted(k for k in objects if k.startswith(prefix)):
            name, slash, _ = key[len(prefix) :].partition("/")
            if slash:
                folders[f"{prefix}{name}/"] = None
            else:
                found = objects[key]
                here.append(RemoteObject(key, len(found.data), found.etag, {}, None))
        return Level(tuple(folders), tuple(here))

    async def create_multipart_upload(self, bucket: str, key: str) -> str:
        what = f"CreateMultipartUpload s3://{bucket}/{key}"
        await self._enter(Call("CreateMultipartUpload", bucket, key))
        self._objects(what, bucket)
        upload_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.uploads[upload_id] = _Upload(bucket, key)
        return upload_id

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[RemotePart]:
        what = f"ListParts s3://{bucket}/{key}"
        await self._enter(Call("ListParts", bucket, key))
        upload = self._upload(what, bucket, key, upload_id)
        return [
            RemotePart(number, part.etag, len(part.data), None)
            for number, part in sorted(upload.parts.items())
        ]

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str, str]],
        checksum: str,
    ) -> str:
        what = f"CompleteMultipartUpload s3://{bucket}/{key}"
        await self._enter(Call("CompleteMultipartUpload", bucket, key))
        upload = self._upload(what, bucket, key, upload_id)
        numbers = [number for number, _, _ in parts]
        if not parts:
            raise classify(what, "MalformedXML", 400, "The XML you provided was not well-formed")
        if numbers != sorted(set(numbers)):
            raise classify(
                what, "InvalidPartOrder", 400, "The list of parts was not in ascending order."
            )
        chosen: list[_Part] = []
        for number, etag, _ in parts:
            part = upload.parts.get(number)
            if part is None or part.etag.strip('"') != etag.strip('"'):
                raise classify(
                    what,
                    "InvalidPart",
                    400,
                    "One or more of the specified parts could not be found.",
                )
            chosen.append(part)
        if any(len(part.data) < MIN_PART_SIZE for part in chosen[:-1]):
            raise classify(
                what,
                "EntityTooSmall",
                400,
                "Your proposed upload is smaller than the minimum allowed object size.",
            )
        md5s = b"".join(bytes.fromhex(part.etag.strip('"')) for part in chosen)
        etag = f'"{hashlib.md5(md5s).hexdigest()}-{len(chosen)}"'
        checksums: dict[str, str] = {}
        checksum_type: str | None = None
        if self.algorithm.enabled:
            digests = [PartDigest(self.algorithm.digest(p.data), len(p.data)) for p in chosen]
            whole = self.algorithm.object_checksum(digests, multipart=True)
            if self.algorithm.multipart_type == "FULL_OBJECT" and checksum != whole:
                raise classify(what, "BadDigest", 400, "The checksum of the object did not match.")
            checksum_type = self.algorithm.multipart_type
            checksums[self.algorithm.name] = whole.split("-")[0]  # moto leaves out "-N"
        self._objects(what, bucket)[key] = _Object(
            b"".join(part.data for part in chosen),
            etag,
            checksums,
            checksum_type,
            [len(part.data) for part in chosen],
        )
        del self.uploads[upload_id]
        return etag

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort an upload; one that is already gone counts as aborted."""
        await self._enter(Call("AbortMultipartUpload", bucket, key))
        self._objects(f"AbortMultipartUpload s3://{bucket}/{key}", bucket)
        upload = self.uploads.get(upload_id)
        if upload is not None and (upload.bucket, upload.key) == (bucket, key):
            del self.uploads[upload_id]

    async def delete_object(self, bucket: str, key: str) -> None:
        await self._enter(Call("DeleteObject", bucket, key))
        self._objects(f"DeleteObject s3://{bucket}/{key}", bucket).pop(key, None)

    # -- the data plane ----------------------------------------------------------------

    async def put_object(self, bucket: str, key: str, body: Body, checksum: str) -> str:
        what = f"PutObject s3://{bucket}/{key}"
        data = PutRequest(bucket, key, body, body_length(body), checksum).stream().read()
        await self._enter(Call("PutObject", bucket, key))
        objects = self._objects(what, bucket)
        self._check_digest(what, data, checksum)
        checksums = {self.algorithm.name: checksum} if self.algorithm.enabled else {}
        objects[key] = _Object(data, _etag(data), checksums, None)
        return objects[key].etag

    async def upload_part_copy(
        self,
        source: tuple[str, str, str],
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        byte_range: tuple[int, int],
    ) -> tuple[str, str]:
        src_bucket, src_key, etag = source
        what = f"UploadPartCopy {number} of s3://{bucket}/{key}"
        await self._enter(Call("UploadPartCopy", bucket, key, number))
        found = self._version(what, src_bucket, src_key, etag)
        data = found.data[byte_range[0] : byte_range[1] + 1]
        upload = self._upload(what, bucket, key, upload_id)
        upload.parts[number] = _Part(data, _etag(data))
        checksum = encode(self.algorithm.digest(data)) if self.algorithm.enabled else ""
        return upload.parts[number].etag, checksum

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: Body, checksum: str
    ) -> str:
        what = f"UploadPart {number} of s3://{bucket}/{key}"
        data = PutRequest(bucket, key, body, body_length(body), checksum).stream().read()
        await self._enter(Call("UploadPart", bucket, key, number))
        upload = self._upload(what, bucket, key, upload_id)
        if not 1 <= number <= MAX_PART_NUMBER:
            raise classify(
                what,
                "InvalidArgument",
                400,
                "Part number must be an integer between 1 and 10000, inclusive",
            )
        self._check_digest(what, data, checksum)
        upload.parts[number] = _Part(data, _etag(data))
        return upload.parts[number].etag
