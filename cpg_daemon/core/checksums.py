"""Content checksums as S3 computes and reports them.

Each part's checksum is computed while the part is read (never in a second
pass over the file). For the CRC algorithms the whole object's checksum is
derived from the part checksums by CRC combination, so a multipart object
carries a FULL_OBJECT checksum that does not depend on the part size: the
same file always has the same value, whether it went up in one request or a
thousand. SHA256 cannot be combined, so its multipart objects carry S3's
COMPOSITE form (the hash of the part hashes, suffixed ``-N``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from awscrt import checksums as crt

ChecksumName = Literal["CRC32C", "CRC32", "SHA256", "CRC64NVME", "none"]
CHECKSUM_NAMES: tuple[ChecksumName, ...] = ("CRC32C", "CRC32", "SHA256", "CRC64NVME", "none")


@dataclass(frozen=True)
class PartDigest:
    """A part's raw checksum and its length in bytes (needed to combine CRCs)."""

    digest: bytes
    length: int


@dataclass(frozen=True)
class Algorithm:
    """One checksum algorithm, with the names S3's API uses for it."""

    name: ChecksumName
    width: int
    crc: Callable[[bytes, int], int] | None
    """awscrt's function; it takes any buffer, memoryviews included."""
    combine: Callable[[int, int, int], int] | None

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def request_field(self) -> str:
        """The request/response member, e.g. ``ChecksumCRC32C``."""
        return f"Checksum{self.name}"

    @property
    def multipart_type(self) -> Literal["FULL_OBJECT", "COMPOSITE"]:
        return "COMPOSITE" if self.combine is None else "FULL_OBJECT"

    def digest(self, data: bytes | memoryview) -> bytes:
        """The raw checksum of ``data`` (any buffer; never copied)."""
        if self.crc is not None:
            return self.crc(data, 0).to_bytes(self.width, "big")  # type: ignore[arg-type]
        if self.name == "SHA256":
            return hashlib.sha256(data).digest()
        return b""

    def object_checksum(self, parts: Sequence[PartDigest], multipart: bool) -> str:
        """The checksum S3 reports for an object made of these parts, base64-encoded.

        A single-part object reports its own checksum; a multipart object the
        combined (FULL_OBJECT) or composite (``-N``) one.
        """
        if not self.enabled:
            return ""
        if not multipart:
            if len(parts) != 1:
                raise ValueError("a single-part object has exactly one part")
            return encode(parts[0].digest)
        if self.combine is not None:
            value = 0
            for index, part in enumerate(parts):
                crc = int.from_bytes(part.digest, "big")
                value = crc if index == 0 else self.combine(value, crc, part.length)
            return encode(value.to_bytes(self.width, "big"))
        joined = b"".join(part.digest for part in parts)
        return f"{encode(hashlib.sha256(joined).digest())}-{len(parts)}"


def encode(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def decode(value: str) -> bytes:
    return base64.b64decode(value.split("-", 1)[0])


ALGORITHMS: dict[ChecksumName, Algorithm] = {
    "CRC32C": Algorithm("CRC32C", 4, crt.crc32c, crt.combine_crc32c),
    "CRC32": Algorithm("CRC32", 4, crt.crc32, crt.combine_crc32),
    "CRC64NVME": Algorithm("CRC64NVME", 8, crt.crc64nvme, crt.combine_crc64nvme),
    "SHA256": Algorithm("SHA256", 32, None, None),
    "none": Algorithm("none", 0, None, None),
}


def algorithm(name: ChecksumName) -> Algorithm:
    return ALGORITHMS[name]
