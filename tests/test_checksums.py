"""Whole-object checksums: what `verify` compares with what S3 reports."""

from __future__ import annotations

import base64
import hashlib
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpg_daemon.core.checksums import (
    ALGORITHMS,
    CHECKSUM_NAMES,
    ChecksumName,
    PartDigest,
    algorithm,
    decode,
    encode,
)

CRCS: tuple[ChecksumName, ...] = ("CRC32C", "CRC32", "CRC64NVME")
CHECK = b"123456789"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def part_digests(name: ChecksumName, pieces: list[bytes]) -> list[PartDigest]:
    algo = algorithm(name)
    return [PartDigest(algo.digest(p), len(p)) for p in pieces]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CRC32C", 0xE3069283),
        ("CRC32", 0xCBF43926),
        ("CRC64NVME", 0xAE8B14860A799888),
    ],
)
def test_known_vectors_are_big_endian_base64(name: ChecksumName, value: int) -> None:
    algo = algorithm(name)
    digest = algo.digest(CHECK)
    assert digest == value.to_bytes(algo.width, "big")
    single = algo.object_checksum([PartDigest(digest, len(CHECK))], multipart=False)
    assert single == base64.b64encode(value.to_bytes(algo.width, "big")).decode()


def test_crc32c_check_value_as_s3_shows_it() -> None:
    assert encode(algorithm("CRC32C").digest(CHECK)) == "4waSgw=="


def test_crc32_agrees_with_zlib() -> None:
    data = bytes(range(256)) * 7
    assert algorithm("CRC32").digest(data) == zlib.crc32(data).to_bytes(4, "big")


def test_sha256_digest_is_sha256() -> None:
    assert algorithm("SHA256").digest(CHECK) == hashlib.sha256(CHECK).digest()


@pytest.mark.parametrize("name", CRCS)
@given(
    data=st.binary(max_size=4096),
    cuts=st.lists(st.integers(0, 4096), max_size=8),
)
def test_multipart_crc_equals_whole_file_crc(
    name: ChecksumName, data: bytes, cuts: list[int]
) -> None:
    # A FULL_OBJECT checksum: the same file gives the same value however it was split.
    algo = algorithm(name)
    pieces = split(data, cuts)
    assert b"".join(pieces) == data
    combined = algo.object_checksum(part_digests(name, pieces), multipart=True)
    assert combined == encode(algo.digest(data))
    assert algo.multipart_type == "FULL_OBJECT"


@pytest.mark.parametrize("name", CRCS)
def test_multipart_crc_example_with_realistic_parts(name: ChecksumName) -> None:
    algo = algorithm(name)
    data = bytes((i * 7919) % 251 for i in range(3 * 65536 + 123))
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert len(pieces) == 4
    combined = algo.object_checksum(part_digests(name, pieces), multipart=True)
    assert combined == encode(algo.digest(data))
    # and the order of parts matters
    swapped = algo.object_checksum(part_digests(name, pieces[::-1]), multipart=True)
    assert swapped != combined


@pytest.mark.parametrize("name", [*CRCS, "SHA256"])
@given(data=st.binary(max_size=1024))
def test_single_part_checksum_is_the_encoded_digest(name: ChecksumName, data: bytes) -> None:
    algo = algorithm(name)
    digest = algo.digest(data)
    assert len(digest) == algo.width
    assert algo.object_checksum([PartDigest(digest, len(data))], multipart=False) == encode(digest)
    assert decode(encode(digest)) == digest


@given(pieces=st.lists(st.binary(max_size=256), min_size=1, max_size=6))
def test_sha256_multipart_is_composite(pieces: list[bytes]) -> None:
    algo = algorithm("SHA256")
    digests = [hashlib.sha256(p).digest() for p in pieces]
    expected = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    value = algo.object_checksum(part_digests("SHA256", pieces), multipart=True)
    assert value == f"{expected}-{len(pieces)}"
    assert algo.multipart_type == "COMPOSITE"
    # decode strips the part count, leaving the raw hash of hashes
    assert decode(value) == hashlib.sha256(b"".join(digests)).digest()


def test_single_part_needs_exactly_one_part() -> None:
    algo = algorithm("CRC32C")
    part = PartDigest(algo.digest(b"x"), 1)
    with pytest.raises(ValueError):
        algo.object_checksum([part, part], multipart=False)
    with pytest.raises(ValueError):
        algo.object_checksum([], multipart=False)


def test_none_is_disabled() -> None:
    none = algorithm("none")
    assert not none.enabled
    assert none.digest(b"abc") == b""
    assert none.object_checksum([PartDigest(b"", 3)], multipart=True) == ""
    assert none.object_checksum([PartDigest(b"", 3)], multipart=False) == ""


def test_every_configurable_name_has_an_algorithm_with_its_s3_field() -> None:
    assert set(CHECKSUM_NAMES) == set(ALGORITHMS)
    for name in CHECKSUM_NAMES:
        algo = algorithm(name)
        assert algo.name == name
        if algo.enabled:
            assert algo.request_field == f"Checksum{name}"
