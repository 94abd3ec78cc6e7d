"""``cpg-daemon verify`` against a real local S3 server: what a data champion relies on."""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from daemonproc import Daemon, journal_rows, run_cli, wait_until, write_config
from s3server import S3Server

MiB = 1024 * 1024
PREFIX = "cpg0001-test/broad/images/"
HEADER = "path,key,local_size,remote_size,checksum_algorithm,local_checksum,remote_checksum,status"


def _tree(root: Path, seed: int = 7) -> dict[str, bytes]:
    """A batch: small images, an illum file and one file big enough for multipart."""
    rng = random.Random(seed)
    files = {f"Batch1/images/P1/r01c0{i}f01p01-ch1.tiff": rng.randbytes(70_000) for i in range(6)}
    files["Batch1/illum/P1/P1_IllumDNA.npy"] = rng.randbytes(9_000)
    files["Batch1/images/P1/P1.sqlite"] = rng.randbytes(12 * MiB + 123)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    return files


def _config(tmp_path: Path, s3_server: S3Server, bucket: str, state: str = "state") -> Path:
    return write_config(
        tmp_path / f"{state}.toml",
        state_dir=tmp_path / state,
        endpoint_url=s3_server.endpoint_url,
        watches=[
            {
                "name": "images",
                "path": str(tmp_path / "outbox"),
                "destination": f"s3://{bucket}/{PREFIX}",
                "settle": "1s",
            }
        ],
        s3={"part_size": "5MiB", "multipart_threshold": "5MiB"},
    )


def _report(path: Path) -> dict[str, dict[str, str]]:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == HEADER
    return {row["key"]: row for row in csv.DictReader(text.splitlines())}


def _wait_all_uploaded(state: Path, count: int) -> None:
    wait_until(
        lambda: [r["state"] for r in journal_rows(state)] == ["uploaded"] * count,
        60,
        "every file uploaded",
    )


@pytest.fixture
def uploaded(tmp_path: Path, s3_server: S3Server, bucket: str) -> tuple[Path, dict[str, bytes]]:
    """The tree uploaded by the daemon, which is then stopped; returns the config."""
    files = _tree(tmp_path / "outbox")
    config = _config(tmp_path, s3_server, bucket)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        _wait_all_uploaded(tmp_path / "state", len(files))
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    return config, files


def test_a_clean_upload_verifies_and_quick_agrees(
    tmp_path: Path, uploaded: tuple[Path, dict[str, bytes]]
) -> None:
    config, files = uploaded
    report = tmp_path / "report.csv"
    result = run_cli("verify", "-c", str(config), "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verify: {len(files)} match, 0 missing, 0 size_mismatch, 0 checksum_mismatch" in (
        result.stdout
    )
    rows = _report(report)
    assert set(rows) == {PREFIX + rel for rel in files}
    for rel, data in files.items():
        row = rows[PREFIX + rel]
        assert row["status"] == "match"
        assert row["path"] == str(tmp_path / "outbox" / rel)
        assert int(row["local_size"]) == int(row["remote_size"]) == len(data)
        assert row["checksum_algorithm"] == "CRC32C"
        assert row["local_checksum"] == row["remote_checksum"] != ""
    quick = run_cli("verify", "-c", str(config), "--quick")
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert f"{len(files)} match" in quick.stdout


def test_tampered_missing_extra_and_changed_files_are_each_reported(
    tmp_path: Path, uploaded: tuple[Path, dict[str, bytes]], s3_client: Any, bucket: str
) -> None:
    config, files = uploaded
    tiffs = sorted(rel for rel in files if rel.endswith(".tiff"))
    overwritten, deleted, grown = tiffs[0], tiffs[1], tiffs[2]
    # Same size, other bytes: only a checksum can tell.
    data = bytearray(files[overwritten])
    data[100] ^= 0xFF
    s3_client.put_object(Bucket=bucket, Key=PREFIX + overwritten, Body=bytes(data))
    s3_client.delete_object(Bucket=bucket, Key=PREFIX + deleted)
    s3_client.put_object(Bucket=bucket, Key=PREFIX + "Batch1/stray.txt", Body=b"not ours")
    with open(tmp_path / "outbox" / grown, "ab") as handle:
        handle.write(b"more")
    # The big multipart object, overwritten with same-size bytes too.
    big = "Batch1/images/P1/P1.sqlite"
    s3_client.put_object(Bucket=bucket, Key=PREFIX + big, Body=os.urandom(len(files[big])))
    report = tmp_path / "report.csv"
    result = run_cli("verify", "-c", str(config), "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    statuses = {key: row["status"] for key, row in _report(report).items()}
    assert statuses.pop(PREFIX + overwritten) == "checksum_mismatch"
    assert statuses.pop(PREFIX + big) == "checksum_mismatch"
    assert statuses.pop(PREFIX + deleted) == "missing"
    assert statuses.pop(PREFIX + grown) == "size_mismatch"
    assert statuses.pop(PREFIX + "Batch1/stray.txt") == "extra"
    assert set(statuses.values()) == {"match"}
    assert "1 missing, 1 size_mismatch, 2 checksum_mismatch, 1 extra" in result.stdout
    assert f"checksum_mismatch: {tmp_path / 'outbox' / overwritten}" in result.stdout
    # --quick sees presence and size only.
    quick = run_cli("verify", "-c", str(config), "--quick")
    assert quick.returncode == 1
    assert "1 missing, 1 size_mismatch, 0 checksum_mismatch, 1 extra" in quick.stdout
    # For scripts: the counts and every difference as one JSON document.
    document = run_cli("verify", "-c", str(config), "--quick", "--json")
    assert document.returncode == 1
    found = json.loads(document.stdout)
    assert found["ok"] is False
    assert found["counts"] == {
        "match": len(files) - 2,
        "missing": 1,
        "size_mismatch": 1,
        "checksum_mismatch": 0,
        "extra": 1,
        "unverified": 0,
    }
    assert {(row["key"], row["status"]) for row in found["differences"]} == {
        (PREFIX + deleted, "missing"),
        (PREFIX + grown, "size_mismatch"),
        (PREFIX + "Batch1/stray.txt", "extra"),
    }


def test_without_a_journal_checksums_come_from_the_disk_and_the_objects(
    tmp_path: Path, uploaded: tuple[Path, dict[str, bytes]], s3_server: S3Server, bucket: str
) -> None:
    assert len(uploaded[1]) == 8
    fresh = _config(tmp_path, s3_server, bucket, state="elsewhere")  # no journal there
    report = tmp_path / "report.csv"
    result = run_cli("verify", "-c", str(fresh), "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _report(report)
    assert {row["status"] for row in rows.values()} == {"match"}
    assert {row["checksum_algorithm"] for row in rows.values()} == {"CRC32C"}
    assert not (tmp_path / "elsewhere" / "journal.sqlite3").exists(), "verify made a journal"


@pytest.mark.parametrize(
    "how", ["boto3-default", "boto3-no-checksum", "boto3-sha256", "boto3-crc32c"]
)
def test_objects_uploaded_by_other_tools_verify_by_their_own_checksums(
    tmp_path: Path, s3_server: S3Server, bucket: str, how: str
) -> None:
    """What labs staged before with the AWS CLI (s3transfer) must verify too."""
    files = _tree(tmp_path / "outbox", seed=11)
    extra: dict[str, Any] = {}
    if how == "boto3-no-checksum":
        client_config = BotoConfig(request_checksum_calculation="when_required")
    else:
        client_config = BotoConfig()
        if how != "boto3-default":
            extra["ChecksumAlgorithm"] = how.split("-")[1].upper()
    client = boto3.client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1", config=client_config
    )
    transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    for rel in files:
        client.upload_file(
            str(tmp_path / "outbox" / rel), bucket, PREFIX + rel, ExtraArgs=extra, Config=transfer
        )
    config = _config(tmp_path, s3_server, bucket)
    report = tmp_path / "report.csv"
    result = run_cli("verify", "-c", str(config), "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _report(report)
    assert {row["status"] for row in rows.values()} == {"match"}
    big = rows[PREFIX + "Batch1/images/P1/P1.sqlite"]
    assert big["remote_checksum"]
    # And a same-size change is still caught on such an object.
    data = bytearray(files["Batch1/images/P1/P1.sqlite"])
    data[7 * MiB] ^= 1
    (tmp_path / "outbox" / "Batch1/images/P1/P1.sqlite").write_bytes(bytes(data))
    result = run_cli("verify", "-c", str(config), "--report", str(report))
    assert result.returncode == 1
    assert _report(report)[PREFIX + "Batch1/images/P1/P1.sqlite"]["status"] == "checksum_mismatch"


def test_verify_via_the_running_daemon_and_one_watch_by_name(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    files = _tree(tmp_path / "outbox", seed=3)
    config = _config(tmp_path, s3_server, bucket)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        _wait_all_uploaded(tmp_path / "state", len(files))
        report = tmp_path / "report.csv"
        result = run_cli("verify", "--via-daemon", "-c", str(config), "--report", str(report))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(files)} match" in result.stdout
        assert {row["status"] for row in _report(report).values()} == {"match"}
        # A name S3 cannot take (a newline) is never uploaded: it stays missing.
        (tmp_path / "outbox" / "Batch1/bad\nname.tiff").write_bytes(b"never staged")
        result = run_cli("verify", "--via-daemon", "-c", str(config), "images")
        assert result.returncode == 1
        assert f"missing: {tmp_path / 'outbox' / 'Batch1/bad'}" in result.stdout
        assert "1 missing" in result.stdout
        document = run_cli("verify", "--via-daemon", "--json", "-c", str(config))
        assert document.returncode == 1
        found = json.loads(document.stdout)
        assert (found["counts"]["match"], found["counts"]["missing"]) == (len(files), 1)
        assert [row["path"] for row in found["differences"]] == [
            str(tmp_path / "outbox" / "Batch1/bad\nname.tiff")
        ]
        unknown = run_cli("verify", "--via-daemon", "-c", str(config), "nope")
        assert unknown.returncode == 1
        assert "no watch named 'nope'" in unknown.stderr
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    unknown = run_cli("verify", "-c", str(config), "nope")
    assert unknown.returncode == 1
    assert "no watch named 'nope'" in unknown.stderr
