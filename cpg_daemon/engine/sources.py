"""Where a watch's bytes come from: files in a local folder, or objects under an S3 prefix.

The uploader reads through a ``SourceFile``: the file's size and modification time now
(``stat``), a range of its bytes as a request body with their checksum (``read``), the
whole file's checksum (``whole_checksum``: is the object already at the destination this
file?), and, after the last read of a multipart upload, ``confirm`` (nothing changed
meanwhile). ``LocalFile`` is a file on disk (``core.files``, confined to its watch's root).

``ObjectFile`` is an object of another bucket, read by ranged GetObject requests through
the source's own client (its own keys, endpoint and region), part by part within the
memory budget: nothing is written to disk. Every read is pinned to the version that was
listed (If-Match on its ETag), so the parts of a replaced object are never mixed. Its
bytes are checked against the checksum the source bucket keeps, where it keeps one: a
request for the whole object is checked (by the CRT, or botocore) against the checksum
S3 sends with it; the parts of a larger one are checked by ``confirm``, which combines
their CRCs into the whole object's and compares it with the source's FULL_OBJECT
checksum (or a single-part object's). Where the source keeps none, the checksum computed
while reading is the one staging checks, as for a local file.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio.to_thread
import structlog

from cpg_daemon.core import files
from cpg_daemon.core.checksums import ALGORITHMS, Algorithm, ChecksumName, PartDigest, encode
from cpg_daemon.core.errors import FileChangedError, RetryableError, VanishedError
from cpg_daemon.core.objectkeys import PathFilter, S3Location
from cpg_daemon.discovery.admission import Admission
from cpg_daemon.discovery.scan import Seen
from cpg_daemon.journal import Discovered, Journal

if TYPE_CHECKING:
    from cpg_daemon.core.config import WatchConfig
    from cpg_daemon.s3.store import RemoteObject, Storage

log = structlog.get_logger(__name__)

READ_CHUNK = 8 * 1024 * 1024
"""Bytes per GetObject when an object is read through only to compute its checksum."""
THREAD_DIGEST = 1024 * 1024
"""Bodies from this size are hashed in a worker thread, off the event loop."""


class SourceFile(Protocol):
    """One file or object, as the uploader reads it."""

    @property
    def name(self) -> str:
        """What logs, errors and status call it: a path, or ``s3://bucket/key``."""
        ...

    async def stat(self) -> files.FileStat: ...

    async def read(
        self, offset: int, length: int, expected: files.FileStat, checksum: ChecksumName
    ) -> tuple[io.BytesIO, bytes]:
        """``length`` bytes at ``offset`` as a request body, and their raw checksum;
        FileChangedError when it is no longer the version ``expected``."""
        ...

    async def whole_checksum(self, checksum: ChecksumName, expected: files.FileStat) -> str:
        """The whole file's checksum as S3 reports a full-object one (base64)."""
        ...

    async def confirm(self, expected: files.FileStat) -> None:
        """After the last read: FileChangedError if it changed meanwhile."""
        ...


@dataclass(frozen=True)
class LocalFile:
    """A file on disk (read below the root ``files.confined_to`` set, if any)."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    async def stat(self) -> files.FileStat:
        return await files.stat(self.path)

    async def read(
        self, offset: int, length: int, expected: files.FileStat, checksum: ChecksumName
    ) -> tuple[io.BytesIO, bytes]:
        return await files.read_range(self.path, offset, length, expected, checksum)

    async def whole_checksum(self, checksum: ChecksumName, expected: files.FileStat) -> str:
        return await files.whole_file_checksum(self.path, checksum, expected)

    async def confirm(self, expected: files.FileStat) -> None:
        if await files.stat(self.path) != expected:
            raise FileChangedError(f"{self.path} changed while it was being uploaded")


def full_object_crc(remote: RemoteObject) -> tuple[Algorithm, str] | None:
    """The CRC the source keeps for the whole object, if it keeps one that a reader can
    recompute whatever the part layout: a FULL_OBJECT checksum, or a single-part object's."""
    for algorithm in ALGORITHMS.values():
        value = remote.checksums.get(algorithm.name, "")
        if not value or algorithm.combine is None or "-" in value:
            continue
        if remote.checksum_type in (None, "FULL_OBJECT"):
            return algorithm, value
    return None


def _digests(
    data: bytes, checksum: ChecksumName, source: Algorithm | None
) -> tuple[bytes, bytes | None]:
    digest = ALGORITHMS[checksum].digest(data)
    return digest, (None if source is None else source.digest(data))


class ObjectFile:
    """An object of the source bucket, pinned to the version its source listed."""

    def __init__(self, source: ObjectSource, key: str) -> None:
        self._source = source
        self._key = key
        self._remote: RemoteObject | None = None
        """What the last look (``stat``) found."""
        self._crc: tuple[Algorithm, str] | None = None
        """The source's own whole-object CRC (from ``stat``), to check the parts against."""
        self._parts: dict[int, PartDigest] = {}
        """Offset -> that range's digest in the source's CRC, for ``confirm``."""

    @property
    def name(self) -> str:
        return f"s3://{self._source.location.bucket}/{self._key}"

    @property
    def _etag(self) -> str:
        return self._source.etags.get(self._key, "")

    @property
    def version(self) -> tuple[str, str, str]:
        """(bucket, key, ETag): the object as a CopyObject source."""
        return self._source.location.bucket, self._key, self._etag

    @property
    def copies(self) -> bool:
        """Whether the destination's keys copy it within S3 (``ObjectSource.server_side``)."""
        return self._source.server_side

    def refused(self, error: str) -> None:
        self._source.refused(error)

    async def _look(self) -> RemoteObject:
        """HeadObject now: the version read from then on (a replaced object is a changed
        file), and the checksums the source keeps for it."""
        remote = await self._source.store.head(self._source.location.bucket, self._key)
        if remote is None:
            raise VanishedError(f"{self.name}: no such object any more")
        self._source.etags[self._key] = remote.etag
        self._remote = remote
        self._crc = full_object_crc(remote)
        return remote

    async def stat(self) -> files.FileStat:
        remote = await self._look()
        return files.FileStat(remote.size, remote.modified_ns)

    async def read(
        self, offset: int, length: int, expected: files.FileStat, checksum: ChecksumName
    ) -> tuple[io.BytesIO, bytes]:
        whole = offset == 0 and length == expected.size
        data = await self._source.store.get_range(
            self._source.location.bucket, self._key, offset, length, self._etag, whole=whole
        )
        source = None if whole or self._crc is None else self._crc[0]
        if length >= THREAD_DIGEST:
            digest, extra = await anyio.to_thread.run_sync(_digests, data, checksum, source)
        else:
            digest, extra = _digests(data, checksum, source)
        if extra is not None:
            self._parts[offset] = PartDigest(extra, length)
        return io.BytesIO(data), digest

    async def whole_checksum(self, checksum: ChecksumName, expected: files.FileStat) -> str:
        # The look ``stat`` took just before (the uploader's), else one now.
        remote = self._remote or await self._look()
        kept = remote.checksums.get(checksum)
        if kept and "-" not in kept and remote.checksum_type in (None, "FULL_OBJECT"):
            return kept
        # Read through (a chunk at a time, never to disk) to compute it.
        return encode(await self.range_digest(0, expected.size, checksum))

    async def range_digest(self, offset: int, length: int, checksum: ChecksumName) -> bytes:
        """The raw checksum of ``length`` bytes at ``offset``, read a chunk at a time."""
        digests = files.Digests(checksum)
        await self._source.fold(self._key, offset, length, digests)
        return digests.result()[0]

    async def confirm(self, expected: files.FileStat) -> None:
        """The parts read, combined, against the source's own checksum (where it keeps
        one and every part was read now: parts sent before a resume were not re-read)."""
        if self._crc is None:
            return
        algorithm, kept = self._crc
        covered = 0
        ordered = []
        for offset in sorted(self._parts):
            if offset != covered:
                break
            ordered.append(self._parts[offset])
            covered += self._parts[offset].length
        if covered != expected.size:
            log.debug("source_checksum_not_checked", reason="parts sent before were not re-read")
            return
        got = algorithm.object_checksum(ordered, multipart=True) if ordered else kept
        if got != kept:
            self._parts.clear()
            raise RetryableError(
                f"{self.name}: the bytes read do not match the source's {algorithm.name} "
                f"checksum ({got} against {kept}); sent again"
            )
        log.debug("source_checksum_matched", algorithm=algorithm.name)


class ObjectSource:
    """The objects under an S3 prefix, read with the source's own client: what
    ``cpg-daemon upload s3://SRC/... s3://DEST/...`` walks instead of a folder."""

    def __init__(
        self, store: Storage, location: S3Location, single: str = "", server_side: bool = False
    ) -> None:
        """``location``: the bucket and the prefix that stands for the watch's root
        (ending in ``/``, or empty); ``single``: the one object's name below it, when
        the source is one object; ``server_side``: the destination's keys may read the
        source, so objects are copied within S3 (CopyObject) instead of streamed
        through, until S3 refuses one."""
        self.store = store
        self.location = location
        self.single = single
        self.server_side = server_side
        self.etags: dict[str, str] = {}
        """Key -> the ETag of the version being uploaded (listed, or seen since)."""

    def refused(self, error: str) -> None:
        """S3 refused a server-side copy (the destination's keys may not read the
        source): every object is streamed through from now on."""
        if self.server_side:
            self.server_side = False
            log.warning(
                "server_side_copy_refused",
                error=error,
                consequence="objects are read with the source's keys and sent on",
            )

    def file(self, rel_path: str) -> ObjectFile:
        return ObjectFile(self, self.location.prefix + rel_path)

    def name(self, rel_path: str) -> str:
        return f"s3://{self.location.bucket}/{self.location.prefix}{rel_path}"

    async def objects(self, watch: WatchConfig) -> AsyncIterator[Seen]:
        """The source's objects that ``watch``'s filter accepts, as a walk sees files
        (remembering each one's ETag: the version to read)."""
        accepted = PathFilter(watch.include, watch.exclude)
        bucket, prefix = self.location.bucket, self.location.prefix
        async for remote in self.store.list_objects(bucket, prefix + self.single):
            rel = remote.key[len(prefix) :]
            if remote.key.endswith("/") or not rel or not accepted.accepts(rel):
                continue  # a console's "folder" (an empty key ending in /), or excluded
            if self.single and rel != self.single:
                continue
            self.etags[remote.key] = remote.etag
            yield Seen(rel, remote.size, remote.modified_ns)

    async def digests(
        self, rel_path: str, name: str, expected: files.FileStat, part_size: int = 0
    ) -> tuple[bytes, list[bytes]]:
        """One read through the object (a chunk at a time, never to disk): its digest
        and its parts' (``files.Digests``), for ``verify``."""
        digests = files.Digests(name, part_size)
        await self.fold(self.location.prefix + rel_path, 0, expected.size, digests)
        return digests.result()

    async def fold(self, key: str, offset: int, length: int, digests: files.Digests) -> None:
        """Feed ``length`` bytes of the object at ``offset`` (the version being read) to
        ``digests``, a chunk at a time: never the whole object in memory, nor on disk."""
        etag = self.etags.get(key, "")
        for start in range(offset, offset + length, READ_CHUNK):
            size = min(READ_CHUNK, offset + length - start)
            data = await self.store.get_range(self.location.bucket, key, start, size, etag)
            await anyio.to_thread.run_sync(digests.update, data)

    async def kept_checksum(self, rel_path: str, name: str) -> str | None:
        """The whole-object checksum the source keeps in the form ``name`` (None: none)."""
        remote = await self.store.head(self.location.bucket, self.location.prefix + rel_path)
        if remote is None:
            return None
        return remote.checksums.get(name)

    async def walk(
        self, watch: WatchConfig, journal: Journal, remote_sizes: Mapping[str, int] | None
    ) -> int:
        """List the source once and journal what ``watch`` admits, as a folder's walk
        does (the destination's sizes say which objects may be there already); returns
        how many were queued."""
        admission = Admission(watch, journal)
        admission.expect_remote(remote_sizes)
        queued = 0
        batch: list[Discovered] = []
        async for seen in self.objects(watch):
            verdict = await admission.admit(seen, ())
            if isinstance(verdict, Discovered):
                batch.append(verdict)
            elif verdict is not None:
                await journal.record_rejected(
                    watch.name, verdict.rel_path, verdict.key, verdict.reason, verdict.failure
                )
            if len(batch) >= 500:
                queued += await journal.record_discovered(watch.name, batch)
                batch = []
        if batch:
            queued += await journal.record_discovered(watch.name, batch)
        return queued
