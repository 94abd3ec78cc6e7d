"""Integration tests of ``cpg-daemon upload SRC DEST`` run as a real subprocess.

Every test runs ``python -m cpg_daemon upload`` against a real moto_server and checks
what arrived in the bucket (keys, bytes, checksums) and what went over the wire (the
server's access log, or moto's request recorder for headers).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import boto3  # type: ignore[import-untyped]
import daemonproc
import pytest
from awscrt import checksums
from botocore.config import Config
from s3server import Request, S3Server

MIB = 1024 * 1024
PREFIX = "some/prefix/"
RUN_TIMEOUT = 60.0
SUMMARY_RE = re.compile(
    r"(?P<files>\d+) files: (?P<uploaded>\d+) uploaded, "
    r"(?P<present>\d+) already present, (?P<failed>\d+) failed"
)

# Relative path (with "/") -> size. The big one crosses the 5 MiB threshold of
# ``small_multipart_config`` and is sent in three 5 MiB parts.
BIG = "images/plate 1/big.tif"
TREE: dict[str, int] = {
    "top.csv": 3000,
    "empty.txt": 0,
    "a/b/c/deep.npy": 70_000,
    "with spaces/file name with spaces.txt": 123,
    "données/é 日本.tiff": 4567,
    BIG: 2 * 5 * MIB + 4321,
}


# -- helpers -------------------------------------------------------------------------


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(checksums.crc32c(data).to_bytes(4, "big")).decode("ascii")


def write_tree(root: Path, tree: dict[str, int], seed: int = 1234) -> dict[str, bytes]:
    rng = random.Random(seed)
    contents: dict[str, bytes] = {}
    for rel, size in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        path.write_bytes(data)
        contents[rel] = data
    return contents


def write_config(path: Path, endpoint_url: str) -> Path:
    path.write_text(
        "[s3]\n"
        f'endpoint_url = "{endpoint_url}"\n'
        'part_size = "5MiB"\n'
        'multipart_threshold = "5MiB"\n'
        "\n"
        "[credentials]\n"
        'source = "environment"\n',
        encoding="utf-8",
    )
    return path


def run_upload(
    src: Path | str,
    dest: str,
    endpoint_url: str,
    state_dir: Path,
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """Run the one-shot command; the environment (dummy credentials) passes through."""
    env = dict(os.environ)
    env.pop("CPG_DAEMON_CONFIG", None)
    cmd = [
        sys.executable,
        "-m",
        "cpg_daemon",
        "upload",
        str(src),
        dest,
        "--endpoint-url",
        endpoint_url,
        "--state-dir",
        str(state_dir),
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = SUMMARY_RE.search(result.stdout)
    assert match is not None, describe(result)
    return {name: int(value) for name, value in match.groupdict().items()}


def writes(requests: Sequence[Request], bucket: str) -> list[Request]:
    """PutObject, UploadPart, CreateMultipartUpload and CompleteMultipartUpload requests."""
    return [r for r in requests if r.bucket == bucket and r.key and r.method in ("PUT", "POST")]


def all_objects(s3_client: Any, bucket: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj["Size"]
    return found


def read_object(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def make_client(endpoint_url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )


@pytest.fixture
def config_file(tmp_path: Path, s3_server: S3Server) -> Path:
    return write_config(tmp_path / "config.toml", s3_server.endpoint_url)


# -- 1. a folder of awkward names, one multipart file ------------------------------


def test_uploads_a_tree_byte_identical_under_the_expected_keys(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path, config_file: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, TREE)
    mark = s3_server.mark()

    result = run_upload(
        src,
        f"s3://{bucket}/{PREFIX}",
        s3_server.endpoint_url,
        tmp_path / "state",
        "-c",
        str(config_file),
    )

    assert result.returncode == 0, describe(result)
    assert summary(result) == {
        "files": len(TREE),
        "uploaded": len(TREE),
        "present": 0,
        "failed": 0,
    }, describe(result)
    expected = {PREFIX + rel: len(data) for rel, data in contents.items()}
    assert all_objects(s3_client, bucket) == expected
    for rel, data in contents.items():
        assert read_object(s3_client, bucket, PREFIX + rel) == data, rel

    big_key = PREFIX + BIG
    parts = s3_server.upload_part_requests(bucket, big_key, since=mark)
    assert len(parts) == 3, parts
    assert {r.query["partNumber"] for r in parts} == {"1", "2", "3"}
    assert all(r.status == 200 for r in parts)
    assert s3_server.put_object_requests(bucket, big_key, since=mark) == []
    for rel in TREE:
        if rel != BIG:  # small files: one PutObject each, no parts
            assert len(s3_server.put_object_requests(bucket, PREFIX + rel, since=mark)) == 1
            assert s3_server.upload_part_requests(bucket, PREFIX + rel, since=mark) == []

    head = s3_client.head_object(Bucket=bucket, Key=big_key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(contents[BIG])
    assert head.get("ChecksumCRC32C") == crc32c_b64(contents[BIG]), head
    assert head.get("ChecksumType") == "FULL_OBJECT", head

    small = "données/é 日本.tiff"
    head = s3_client.head_object(Bucket=bucket, Key=PREFIX + small, ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C") == crc32c_b64(contents[small]), head


# -- 2. the canned ACL, proven on the wire -----------------------------------------


class RecordingServer:
    """A moto_server of its own with moto's request recorder (headers of every request)."""

    def __init__(self, server: S3Server, recording: Path) -> None:
        self.server = server
        self.recording = recording

    def _call(self, action: str) -> str:
        request = urllib.request.Request(
            f"{self.server.endpoint_url}/moto-api/recorder/{action}",
            method="GET" if action == "download-recording" else "POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text: str = response.read().decode("utf-8")
            return text

    def start(self) -> None:
        self._call("reset-recording")
        self._call("start-recording")

    def stop(self) -> list[dict[str, Any]]:
        self._call("stop-recording")
        text = self._call("download-recording")
        # Entries are JSON objects one per line, but moto's threads writing at once can
        # leave two on one line: read them one object at a time.
        decoder, entries, at = json.JSONDecoder(), [], 0
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            if at == len(text):
                return entries
            entry, at = decoder.raw_decode(text, at)
            entries.append(entry)


@pytest.fixture(scope="module")
def recording_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingServer]:
    log_dir = tmp_path_factory.mktemp("recording_moto_server")
    recording = log_dir / "moto_recording.jsonl"
    # S3Server copies os.environ when it spawns: point the recorder at a file of ours
    # (by default it writes ./moto_recording in the working directory). Recording is
    # switched on and off through the moto-api, only around the command under test.
    with mock.patch.dict(os.environ, {"MOTO_RECORDER_FILEPATH": str(recording)}):
        server = S3Server.start(log_dir)
    try:
        yield RecordingServer(server, recording)
    finally:
        server.stop()


def _header(entry: dict[str, Any], name: str) -> str | None:
    for key, value in entry["headers"].items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _object_writes(entries: list[dict[str, Any]], bucket: str) -> dict[str, list[dict[str, Any]]]:
    """PutObject and CreateMultipartUpload requests from the recording, by kind."""
    kinds: dict[str, list[dict[str, Any]]] = {"PutObject": [], "CreateMultipartUpload": []}
    for entry in entries:
        path, _, query = entry["url"].partition("://")[2].partition("/")[2].partition("?")
        if not path.startswith(f"{bucket}/"):
            continue
        params = query.split("&") if query else []
        if entry["method"] == "PUT" and not any(p.startswith("partNumber=") for p in params):
            kinds["PutObject"].append(entry)
        elif entry["method"] == "POST" and "uploads" in [p.split("=")[0] for p in params]:
            kinds["CreateMultipartUpload"].append(entry)
    return kinds


@pytest.mark.parametrize(
    ("acl_args", "expected"),
    [((), "bucket-owner-full-control"), (("--acl", ""), None)],
    ids=["default-acl", "no-acl"],
)
def test_sends_the_canned_acl_header(
    recording_server: RecordingServer,
    tmp_path: Path,
    acl_args: tuple[str, ...],
    expected: str | None,
) -> None:
    endpoint = recording_server.server.endpoint_url
    client = make_client(endpoint)
    bucket = f"acl-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    src = tmp_path / "src"
    contents = write_tree(src, {"small.csv": 2048, "sub/big.tif": 5 * MIB + 100})
    config = write_config(tmp_path / "config.toml", endpoint)

    recording_server.start()
    try:
        result = run_upload(
            src,
            f"s3://{bucket}/{PREFIX}",
            endpoint,
            tmp_path / "state",
            "-c",
            str(config),
            *acl_args,
        )
    finally:
        entries = recording_server.stop()

    assert result.returncode == 0, describe(result)
    for rel, data in contents.items():
        assert read_object(client, bucket, PREFIX + rel) == data
    kinds = _object_writes(entries, bucket)
    assert len(kinds["PutObject"]) == 1, entries
    assert len(kinds["CreateMultipartUpload"]) == 1, entries
    for kind, found in kinds.items():
        for entry in found:
            assert _header(entry, "x-amz-acl") == expected, (kind, entry["headers"])


def _signing_region(entry: dict[str, Any]) -> str:
    """The region in a request's SigV4 credential scope (KEY/DATE/REGION/s3/aws4_request)."""
    authorization = _header(entry, "Authorization") or ""
    match = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/aws4_request", authorization)
    assert match is not None, entry["headers"]
    return match.group(1)


def test_upload_signs_for_the_region_of_its_flag_its_config_or_the_aws_files(
    recording_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--region, then -c's [s3] region, then AWS_REGION, AWS_DEFAULT_REGION, the profile's
    region: what the requests are signed for shows which was taken."""
    endpoint = recording_server.server.endpoint_url
    client = make_client(endpoint)
    bucket = f"region-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    aws_config, aws_credentials = tmp_path / "aws-config", tmp_path / "aws-credentials"
    aws_config.write_text("[profile lab]\nregion = eu-west-2\n", encoding="utf-8")
    aws_credentials.write_text(
        "[lab]\naws_access_key_id = testing\naws_secret_access_key = testing-secret\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_credentials))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    config = tmp_path / "config.toml"
    config.write_text('[s3]\nregion = "ca-central-1"\n', encoding="utf-8")
    src = tmp_path / "src"
    write_tree(src, {"a.csv": 100})
    cases: list[tuple[dict[str, str], tuple[str, ...], str]] = [
        ({}, (), "eu-west-2"),  # the profile's
        ({"AWS_DEFAULT_REGION": "ap-south-1"}, (), "ap-south-1"),
        ({"AWS_DEFAULT_REGION": "ap-south-1", "AWS_REGION": "us-west-1"}, (), "us-west-1"),
        ({"AWS_REGION": "us-west-1"}, ("-c", str(config)), "ca-central-1"),
        ({"AWS_REGION": "us-west-1"}, ("-c", str(config), "--region", "sa-east-1"), "sa-east-1"),
    ]
    signed = []
    for number, (environment, extra, _) in enumerate(cases):
        with monkeypatch.context() as env:
            for name, value in environment.items():
                env.setenv(name, value)
            recording_server.start()
            try:
                result = daemonproc.run_cli(
                    "upload",
                    str(src),
                    f"s3://{bucket}/{number}/",
                    "--endpoint-url",
                    endpoint,
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--profile",
                    "lab",
                    *extra,
                )
            finally:
                entries = recording_server.stop()
        assert result.returncode == 0, describe(result)
        (put,) = _object_writes(entries, bucket)["PutObject"]
        signed.append(_signing_region(put))
    assert signed == [expected for _, _, expected in cases]


# -- 3. a second run sends nothing -------------------------------------------------


def test_second_run_uploads_nothing_with_or_without_the_journal(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path, config_file: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, TREE)
    dest = f"s3://{bucket}/{PREFIX}"
    args = ("-c", str(config_file))

    first = run_upload(src, dest, s3_server.endpoint_url, tmp_path / "state", *args)
    assert first.returncode == 0, describe(first)
    assert summary(first)["uploaded"] == len(TREE), describe(first)

    for state_dir in (tmp_path / "state", tmp_path / "other-state"):
        mark = s3_server.mark()
        again = run_upload(src, dest, s3_server.endpoint_url, state_dir, *args)
        assert again.returncode == 0, describe(again)
        assert writes(s3_server.requests(since=mark), bucket) == [], state_dir
        assert summary(again) == {
            "files": len(TREE),
            "uploaded": 0,
            "present": len(TREE),
            "failed": 0,
        }, describe(again)

    for rel, data in contents.items():
        assert read_object(s3_client, bucket, PREFIX + rel) == data


# -- 4. a changed file is sent again -----------------------------------------------


@pytest.mark.parametrize("same_journal", [True, False], ids=["same-journal", "journal-lost"])
def test_changed_file_is_uploaded_again(
    s3_server: S3Server,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    config_file: Path,
    same_journal: bool,
) -> None:
    src = tmp_path / "src"
    tree = {"keep.csv": 1000, "change/me.tif": 50_000, BIG: 5 * MIB + 7}
    contents = write_tree(src, tree)
    dest = f"s3://{bucket}/{PREFIX}"
    args = ("-c", str(config_file))
    first = run_upload(src, dest, s3_server.endpoint_url, tmp_path / "state", *args)
    assert first.returncode == 0, describe(first)

    changed = {"change/me.tif", BIG}
    for rel in changed:
        path = src / rel
        before = path.stat()
        new = random.Random(rel).randbytes(before.st_size)
        assert new != contents[rel]
        path.write_bytes(new)
        # Same size, a later mtime (but not in the future: see the future-mtime test).
        mtime_ns = time.time_ns() - 1_000_000
        assert mtime_ns > before.st_mtime_ns
        os.utime(path, ns=(before.st_atime_ns, mtime_ns))
        contents[rel] = new

    mark = s3_server.mark()
    state = tmp_path / ("state" if same_journal else "fresh-state")
    second = run_upload(src, dest, s3_server.endpoint_url, state, *args)
    assert second.returncode == 0, describe(second)
    assert summary(second) == {
        "files": len(tree),
        "uploaded": len(changed),
        "present": len(tree) - len(changed),
        "failed": 0,
    }, describe(second)
    for rel, data in contents.items():
        assert read_object(s3_client, bucket, PREFIX + rel) == data, rel
    written = {r.key for r in writes(s3_server.requests(since=mark), bucket)}
    assert written == {PREFIX + rel for rel in changed}
    head = s3_client.head_object(Bucket=bucket, Key=PREFIX + BIG, ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32C") == crc32c_b64(contents[BIG]), head


def test_file_with_future_mtime_is_not_silently_skipped(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"ok.csv": 100, "skewed.csv": 200})
    future_ns = time.time_ns() + 3600 * 10**9  # e.g. copied from a PC whose clock runs fast
    os.utime(src / "skewed.csv", ns=(future_ns, future_ns))

    result = run_upload(src, f"s3://{bucket}/{PREFIX}", s3_server.endpoint_url, tmp_path / "state")

    assert result.returncode == 0, describe(result)
    assert summary(result)["files"] == 2, describe(result)
    for rel, data in contents.items():
        assert read_object(s3_client, bucket, PREFIX + rel) == data, rel


# -- 5. a single file ---------------------------------------------------------------


def test_single_file_goes_to_prefix_plus_its_name(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"one file é.csv": 4096, "sibling.csv": 10, "sub/other.csv": 10})

    result = run_upload(
        src / "one file é.csv",
        f"s3://{bucket}/{PREFIX}",
        s3_server.endpoint_url,
        tmp_path / "state",
    )

    assert result.returncode == 0, describe(result)
    assert all_objects(s3_client, bucket) == {PREFIX + "one file é.csv": 4096}
    assert read_object(s3_client, bucket, PREFIX + "one file é.csv") == contents["one file é.csv"]


# -- 6. an unreadable file ----------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root: chmod 000 does not stop root reading a file, "
    "so a permission-denied file cannot be produced",
)
def test_unreadable_file_fails_alone(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"ok/one.csv": 100, "ok/two.csv": 200, "locked/secret.csv": 300})
    locked = src / "locked" / "secret.csv"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this user can still read a chmod 000 file")
        result = run_upload(
            src, f"s3://{bucket}/{PREFIX}", s3_server.endpoint_url, tmp_path / "state"
        )
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)

    assert result.returncode == 1, describe(result)
    assert "secret.csv" in result.stderr, describe(result)
    assert summary(result)["failed"] == 1, describe(result)
    assert all_objects(s3_client, bucket) == {
        PREFIX + "ok/one.csv": 100,
        PREFIX + "ok/two.csv": 200,
    }
    for rel in ("ok/one.csv", "ok/two.csv"):
        assert read_object(s3_client, bucket, PREFIX + rel) == contents[rel]


# -- 7. usage errors -----------------------------------------------------------------


def test_bad_destination_uri_exits_2(s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.csv": 10})
    result = run_upload(src, "http://x", s3_server.endpoint_url, tmp_path / "state")
    assert result.returncode == 2, describe(result)
    assert "http://x" in result.stderr, describe(result)
    assert "s3://" in result.stderr, describe(result)


def test_nonexistent_source_exits_2(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"
    mark = s3_server.mark()
    result = run_upload(
        missing, f"s3://{bucket}/{PREFIX}", s3_server.endpoint_url, tmp_path / "state"
    )
    assert result.returncode == 2, describe(result)
    assert str(missing) in result.stderr, describe(result)
    assert writes(s3_server.requests(since=mark), bucket) == []
