"""``cpg-daemon upload s3://SRC/... s3://DEST/...``: another bucket as the source.

The source is a second moto server (its own endpoint and keys: the lab's bucket), the
destination the session's (staging). Objects are streamed through the command, never
stored on disk; a run killed part-way resumes part by part through its journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemonproc import run_cli, wait_until
from faultproxy import Fault, FaultProxy, Rule
from memory_s3 import MemoryStore
from s3server import S3Server
from test_upload_command import (
    all_objects,
    describe,
    make_client,
    read_object,
    run_upload,
    summary,
)
from test_uploader import WATCH, claim_one, opened_journal

from cpg_daemon.core.checksums import ALGORITHMS, encode
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import RetryableError, SkipFileError
from cpg_daemon.core.files import FileStat
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine import uploader as uploader_module
from cpg_daemon.engine.sources import ObjectSource
from cpg_daemon.engine.uploader import Uploader
from cpg_daemon.journal import Discovered

MIB = 1024 * 1024
PART = 5 * MIB
PREFIX = "cpg0000-test/source_4/workspace/profiles/Batch8/"
PLATE = {
    "Plate1/Plate1.csv": 3000,
    "Plate1/Plate1_normalized.csv": 70_000,
    "Plate2/Plate2.csv": 2900,
    "Plate2/Plate2_normalized.csv": 71_000,
    "Plate2/sub/notes é.txt": 10,
    "Plate3/Plate3.sqlite": 3 * PART + 1234,
}
BIG = "Plate3/Plate3.sqlite"


@pytest.fixture(scope="module")
def source_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The lab's own S3: a server of its own, not the destination's."""
    server = S3Server.start(tmp_path_factory.mktemp("source_moto"))
    try:
        yield server
    finally:
        server.stop()


def fill_source(client: Any, tree: dict[str, int], prefix: str = "Batch8/") -> tuple[str, dict]:
    """A fresh bucket on the source server holding ``tree`` below ``prefix``."""
    bucket = f"lab-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    contents = {}
    for index, (rel, size) in enumerate(tree.items()):
        data = os.urandom(64) * (size // 64) + bytes([index % 256]) * (size % 64)
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=data)
        contents[rel] = data
    client.put_object(Bucket=bucket, Key=prefix + "Plate1/", Body=b"")  # a console "folder"
    return bucket, contents


def source_args(src_url: str, state: Path) -> tuple[str, ...]:
    """The source's endpoint, and 5 MiB parts from 5 MiB on (a small multipart object)."""
    config = state.parent / "multipart.toml"
    config.write_text('[s3]\nmultipart_threshold = "5MiB"\npart_size = "5MiB"\n')
    return ("--source-endpoint-url", src_url, "-c", str(config), "--concurrency", "4")


def test_an_s3_prefix_arrives_byte_identical_and_a_killed_run_resumes_part_by_part(
    s3_server: S3Server, s3_client: Any, bucket: str, source_server: S3Server, tmp_path: Path
) -> None:
    source_client = make_client(source_server.endpoint_url)
    lab, contents = fill_source(source_client, PLATE)
    dest = f"s3://{bucket}/{PREFIX}"
    state = tmp_path / "state"
    big_key = PREFIX + BIG

    # First run: the source's answer for the big object's third part never comes; the
    # command is killed once everything else is at the destination.
    with FaultProxy(source_server.endpoint_url) as proxy:
        proxy.set_rules(
            Rule(
                Fault("stall", seconds=None),
                frozenset({"GetObject"}),
                key=BIG,
                range=f"bytes={2 * PART}-",
            )
        )
        command = [
            *(sys.executable, "-m", "cpg_daemon", "upload", f"s3://{lab}/Batch8/", dest),
            *("--endpoint-url", s3_server.endpoint_url, "--state-dir", str(state)),
            *source_args(proxy.endpoint_url, state),
        ]
        first = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:

            def the_rest_arrived() -> bool:
                assert first.poll() is None, first.communicate()[1].decode(errors="replace")
                parts = {
                    r.query["partNumber"] for r in s3_server.upload_part_requests(bucket, big_key)
                }
                small = set(all_objects(s3_client, bucket)) >= {
                    PREFIX + rel for rel in PLATE if rel != BIG
                }
                return parts >= {"1", "2", "4"} and small

            wait_until(the_rest_arrived, 60, "every part but the third, and the small objects")
        finally:
            first.kill()
            _, err = first.communicate(timeout=30)
    assert first.returncode == -9, err.decode(errors="replace")[-2000:]
    assert big_key not in all_objects(s3_client, bucket)

    url, src_url = s3_server.endpoint_url, source_server.endpoint_url
    second = run_upload(f"s3://{lab}/Batch8/", dest, url, state, *source_args(src_url, state))
    assert second.returncode == 0, describe(second)
    assert all_objects(s3_client, bucket) == {PREFIX + rel: size for rel, size in PLATE.items()}
    for rel, data in contents.items():
        assert read_object(s3_client, bucket, PREFIX + rel) == data, rel
    sent = Counter(r.query["partNumber"] for r in s3_server.upload_part_requests(bucket, big_key))
    assert sent == {"1": 1, "2": 1, "3": 1, "4": 1}, sent  # no part sent twice

    # A third run sends nothing, with the journal or without it (then the objects at the
    # destination are compared with the source's by size and checksum).
    for state_dir in (state, tmp_path / "journal-lost"):
        mark = s3_server.mark()
        again = run_upload(
            f"s3://{lab}/Batch8/", dest, url, state_dir, *source_args(src_url, state)
        )
        assert again.returncode == 0, describe(again)
        assert summary(again)["present"] == len(PLATE), describe(again)
        assert [r for r in s3_server.requests(mark) if r.method in ("PUT", "POST")] == []


def test_one_object_or_file_to_a_named_key_lands_at_that_key(
    s3_server: S3Server, s3_client: Any, bucket: str, source_server: S3Server, tmp_path: Path
) -> None:
    """``aws s3 cp`` semantics: DEST without a trailing / names the object; with one, it
    is the folder the object goes into under its own name."""
    source_client = make_client(source_server.endpoint_url)
    lab, contents = fill_source(source_client, {"meta/plate1.csv": 5000})
    src = f"s3://{lab}/Batch8/meta/plate1.csv"
    named = f"s3://{bucket}/{PREFIX}metadata/renamed_plate1.csv"
    folder = f"s3://{bucket}/{PREFIX}metadata/"
    url, src_url = s3_server.endpoint_url, source_server.endpoint_url
    state = tmp_path / "state"
    for dest in (named, folder):
        result = run_upload(src, dest, url, state, *source_args(src_url, state))
        assert result.returncode == 0, describe(result)
    local = tmp_path / "data" / "plate1.csv"
    local.parent.mkdir()
    local.write_bytes(b"local,csv\n" * 100)
    result = run_upload(local, f"s3://{bucket}/{PREFIX}local/renamed.csv", url, state)
    assert result.returncode == 0, describe(result)
    assert all_objects(s3_client, bucket) == {
        PREFIX + "metadata/renamed_plate1.csv": 5000,
        PREFIX + "metadata/plate1.csv": 5000,
        PREFIX + "local/renamed.csv": 1000,
    }
    data = contents["meta/plate1.csv"]
    assert read_object(s3_client, bucket, PREFIX + "metadata/renamed_plate1.csv") == data
    assert read_object(s3_client, bucket, PREFIX + "local/renamed.csv") == local.read_bytes()


@pytest.mark.anyio
async def test_parts_that_do_not_match_the_sources_own_checksum_are_refused() -> None:
    """Bytes read part by part are combined into the whole object's CRC and compared with
    the one the source bucket keeps before the upload is completed."""
    store = MemoryStore("CRC32C", buckets=("lab",))
    data = os.urandom(3 * MIB)
    crc = ALGORITHMS["CRC32C"]
    await store.put_object("lab", "p/big.bin", data, encode(crc.digest(data)))
    source = ObjectSource(store, S3Location("lab", "p/"))
    expected = FileStat(len(data), 0)

    async def read_all() -> None:
        file = source.file("big.bin")
        assert await file.stat() == expected
        for offset in range(0, len(data), MIB):
            await file.read(offset, MIB, expected, "CRC32C")
        await file.confirm(expected)

    await read_all()  # the bytes are the object's: confirmed
    store.buckets["lab"]["p/big.bin"].checksums["CRC32C"] = encode(crc.digest(b"other bytes"))
    with pytest.raises(RetryableError, match="do not match the source's CRC32C checksum"):
        await read_all()
    await anyio.lowlevel.checkpoint()


def test_with_the_destinations_keys_and_endpoint_objects_are_copied_within_s3(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """SRC on the same endpoint, read with the same keys: CopyObject, no byte through
    this machine, and the copy's checksum is the one S3 computed; --no-server-side-copy
    streams instead."""
    lab, contents = fill_source(s3_client, {"a/1.csv": 3000, "b/2.bin": 70_000})
    url = s3_server.endpoint_url
    for extra, copied in (((), True), (("--no-server-side-copy",), False)):
        dest = f"s3://{bucket}/{PREFIX}{len(extra)}/"
        mark = s3_server.mark()
        result = run_upload(f"s3://{lab}/Batch8/", dest, url, tmp_path / "state", *extra)
        assert result.returncode == 0, describe(result)
        assert ("copied within S3" in result.stdout) == copied, describe(result)
        requests = s3_server.requests(mark)
        reads = [r for r in requests if r.method == "GET" and r.bucket == lab and r.key]
        assert len(reads) == (0 if copied else len(contents)), reads
        for rel, data in contents.items():
            key = f"{PREFIX}{len(extra)}/{rel}"
            assert read_object(s3_client, bucket, key) == data
            head = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            assert head["ChecksumCRC32C"] == encode(ALGORITHMS["CRC32C"].digest(data))


@pytest.mark.anyio
async def test_a_refused_server_side_copy_streams_that_object_and_every_later_one(
    tmp_path: Path,
) -> None:
    """Keys that may write the destination but not read the source (S3 answers the
    CopyObject with AccessDenied): the object is streamed instead, and no further copy
    is tried."""
    store = MemoryStore("CRC32C", buckets=("lab", "staging"))
    contents = {name: os.urandom(1000 + index) for index, name in enumerate(("a.csv", "b.csv"))}
    for name, data in contents.items():
        await store.put_object("lab", f"p/{name}", data, encode(ALGORITHMS["CRC32C"].digest(data)))
    store.fail("CopyObject", SkipFileError("CopyObject: access denied (AccessDenied)"))
    source = ObjectSource(store, S3Location("lab", "p/"), server_side=True)
    async with opened_journal(tmp_path / "journal.sqlite") as journal:
        await journal.record_discovered(
            WATCH,
            [
                Discovered(name, "staging", f"x/{name}", len(data), 0)
                for name, data in contents.items()
            ],
        )
        uploader = Uploader(journal, S3Config(), anyio.CapacityLimiter(4))
        for name in contents:
            record = await claim_one(journal, name)
            assert await uploader.upload(store, record, source.file(name)) == "uploaded"
    assert not source.server_side
    assert [c.operation for c in store.calls if c.operation in ("CopyObject", "GetObject")] == [
        "CopyObject",
        "GetObject",
        "GetObject",
    ]
    for name, data in contents.items():
        assert store.object_bytes("staging", f"x/{name}") == data


def test_verify_compares_an_s3_source_with_staging_and_finds_a_changed_object(
    s3_server: S3Server, s3_client: Any, bucket: str, source_server: S3Server, tmp_path: Path
) -> None:
    """``verify --source s3://... --destination s3://...``: with upload's journal, one
    listing of each side proves it; without the journal every object is read through
    and its checksum compared; an object replaced at the destination is found."""
    lab, contents = fill_source(make_client(source_server.endpoint_url), PLATE)
    url, src_url = s3_server.endpoint_url, source_server.endpoint_url
    dest, state = f"s3://{bucket}/{PREFIX}", tmp_path / "state"
    args = source_args(src_url, state)
    uploaded = run_upload(f"s3://{lab}/Batch8/", dest, url, state, *args)
    assert uploaded.returncode == 0, describe(uploaded)

    def verify(state_dir: Path) -> subprocess.CompletedProcess[str]:
        return run_cli(
            *("verify", "--source", f"s3://{lab}/Batch8/", "--destination", dest),
            *("--endpoint-url", url, "--source-endpoint-url", src_url),
            *("--state-dir", str(state_dir)),
        )

    for state_dir in (state, tmp_path / "no-journal"):
        result = verify(state_dir)
        assert result.returncode == 0, describe(result)
        assert f"{len(PLATE)} match, 0 missing, 0 size_mismatch, 0 checksum_mismatch" in (
            result.stdout
        ), describe(result)
    changed = bytes(len(contents["Plate1/Plate1.csv"]))  # same size, other bytes
    s3_client.put_object(Bucket=bucket, Key=PREFIX + "Plate1/Plate1.csv", Body=changed)
    result = verify(tmp_path / "no-journal")
    assert result.returncode == 1, describe(result)
    assert "checksum_mismatch: s3://" in result.stdout and "Plate1/Plate1.csv" in result.stdout


def test_an_empty_or_mistyped_source_prefix_is_said_not_silently_done(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    url, dest = s3_server.endpoint_url, f"s3://{bucket}/{PREFIX}"
    result = run_upload(f"s3://{bucket}/no-such-prefix/", dest, url, tmp_path)
    assert result.returncode == 0, describe(result)
    assert summary(result)["files"] == 0
    assert f"nothing to upload under s3://{bucket}/no-such-prefix/" in result.stderr
    missing = run_upload("s3://no-such-lab-bucket/x/", dest, url, tmp_path)
    assert missing.returncode == 1, describe(missing)
    assert "the bucket does not exist (NoSuchBucket)" in missing.stderr


def test_a_single_file_or_object_whose_name_looks_like_a_glob_is_still_itself(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """``plate[1].csv`` and ``what?.csv``: the name, not a pattern, chooses the file."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("plate[1].csv", "plate1.csv", "what?.csv"):
        (src / name).write_bytes(name.encode() * 10)
    url = s3_server.endpoint_url
    for name in ("plate[1].csv", "what?.csv"):
        result = run_upload(src / name, f"s3://{bucket}/{PREFIX}local/", url, tmp_path / "s")
        assert result.returncode == 0, describe(result)
    lab, _ = fill_source(s3_client, {"odd[1].csv": 100})
    result = run_upload(
        f"s3://{lab}/Batch8/odd[1].csv", f"s3://{bucket}/{PREFIX}s3/", url, tmp_path / "s"
    )
    assert result.returncode == 0, describe(result)
    assert all_objects(s3_client, bucket) == {
        PREFIX + "local/plate[1].csv": 120,
        PREFIX + "local/what?.csv": 90,
        PREFIX + "s3/odd[1].csv": 100,
    }


@pytest.mark.anyio
async def test_a_large_object_is_copied_part_by_part_and_an_interrupted_copy_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From multipart_threshold on, a copy within S3 is an UploadPartCopy per part, each
    journaled; a copy that failed at part 2 goes on from part 2 on the next attempt (part
    1 is not copied again), and S3's part checksums make the object's."""
    monkeypatch.setattr(uploader_module, "COPY_PART_SIZE", 5 * MIB)
    store = MemoryStore("CRC32C", buckets=("lab", "staging"))
    data = os.urandom(12 * MIB + 5)
    crc = ALGORITHMS["CRC32C"]
    await store.put_object("lab", "p/big.sqlite", data, encode(crc.digest(data)))
    store.fail("UploadPartCopy", RetryableError("UploadPartCopy: 500"), part_number=2)
    source = ObjectSource(store, S3Location("lab", "p/"), server_side=True)
    s3 = S3Config(multipart_threshold=5 * MIB, part_size=5 * MIB)
    async with opened_journal(tmp_path / "journal.sqlite") as journal:
        await journal.record_discovered(
            WATCH, [Discovered("big.sqlite", "staging", "x/big.sqlite", len(data), 0)]
        )
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(1))
        record = await claim_one(journal, "big.sqlite")
        with pytest.raises(RetryableError):
            await uploader.upload(store, record, source.file("big.sqlite"))
        await journal.requeue(record.id)
        record = await claim_one(journal, "big.sqlite")
        assert await uploader.upload(store, record, source.file("big.sqlite")) == "uploaded"
        assert (await journal.get(WATCH, "big.sqlite")).checksum == encode(crc.digest(data))
    assert store.object_bytes("staging", "x/big.sqlite") == data
    copies = Counter(c.part_number for c in store.calls if c.operation == "UploadPartCopy")
    assert copies == {1: 1, 2: 2, 3: 1}, copies
    assert not [c for c in store.calls if c.operation in ("GetObject", "UploadPart")]
    assert uploader.bytes_copied == len(data)


def test_a_large_object_is_copied_within_s3_part_by_part(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """The same against a real server (moto reports no part checksums: each part's is
    computed by reading its range, and nothing is uploaded)."""
    lab, contents = fill_source(s3_client, {"big.sqlite": 3 * PART + 77})
    state = tmp_path / "state"
    config = tmp_path / "multipart.toml"
    config.write_text('[s3]\nmultipart_threshold = "5MiB"\npart_size = "5MiB"\n')
    mark = s3_server.mark()
    result = run_upload(
        f"s3://{lab}/Batch8/",
        f"s3://{bucket}/{PREFIX}",
        s3_server.endpoint_url,
        state,
        "-c",
        str(config),
    )
    assert result.returncode == 0, describe(result)
    assert "copied within S3" in result.stdout, describe(result)
    key = PREFIX + "big.sqlite"
    assert read_object(s3_client, bucket, key) == contents["big.sqlite"]
    assert s3_server.upload_part_requests(bucket, key, mark)  # UploadPartCopy looks the same
    writes = [r for r in s3_server.requests(mark) if r.method == "PUT" and r.bucket == bucket]
    assert all(r.is_upload_part for r in writes), writes  # no PutObject of the bytes


def test_a_dry_run_of_an_s3_source_says_what_would_go_and_writes_nothing(
    s3_server: S3Server, s3_client: Any, bucket: str, source_server: S3Server, tmp_path: Path
) -> None:
    lab, contents = fill_source(make_client(source_server.endpoint_url), PLATE)
    url, src_url = s3_server.endpoint_url, source_server.endpoint_url
    dest = f"s3://{bucket}/{PREFIX}"
    s3_client.put_object(
        Bucket=bucket,
        Key=PREFIX + "Plate1/Plate1.csv",
        Body=contents["Plate1/Plate1.csv"],
        ChecksumAlgorithm="CRC32C",
    )
    state = tmp_path / "state"
    mark = s3_server.mark()
    args = (*source_args(src_url, state), "--dry-run", "--json")
    result = run_upload(f"s3://{lab}/Batch8/", dest, url, state, *args)
    assert result.returncode == 0, describe(result)
    document = json.loads(result.stdout)
    actions = {entry["path"]: entry["action"] for entry in document["entries"]}
    assert actions == {rel: "upload" for rel in PLATE} | {"Plate1/Plate1.csv": "skip"}
    assert [r for r in s3_server.requests(mark) if r.method in ("PUT", "POST")] == []
    assert not any(state.glob("*.sqlite3"))  # no journal written
