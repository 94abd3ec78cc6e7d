"""``cpg-daemon check``: validates the configuration and proves write access to each destination."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from daemonproc import run_cli, write_config
from s3server import S3Server


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "-c", str(config), *extra)


def test_check_proves_write_access_and_leaves_nothing_behind(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    (tmp_path / "outbox").mkdir()
    config = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=s3_server.endpoint_url,
        watches=[
            {
                "name": "plates",
                "path": str(tmp_path / "outbox"),
                "destination": f"s3://{bucket}/cpg0001-test/broad/images/",
            }
        ],
    )
    mark = s3_server.mark()
    result = _check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"watch plates: {tmp_path / 'outbox'} -> s3://{bucket}/cpg0001-test/broad/images/" in (
        result.stdout
    )
    assert "write access to" in result.stdout and "confirmed" in result.stdout
    puts = [r for r in s3_server.requests(since=mark) if r.method == "PUT" and r.bucket == bucket]
    assert len(puts) == 1 and puts[0].key.startswith("cpg0001-test/broad/images/.cpg-daemon-check/")
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_check_reports_a_destination_it_cannot_write_and_a_missing_folder(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=s3_server.endpoint_url,
        watches=[
            {
                "name": "plates",
                "path": str(tmp_path / "not-there"),
                "destination": f"s3://{bucket}-nope/x/",
            }
        ],
    )
    offline = _check(config, "--offline")
    assert offline.returncode == 1
    assert "does not exist" in offline.stdout
    online = _check(config)
    assert online.returncode == 1
    assert f"cannot write to s3://{bucket}-nope/x/" in online.stdout
    assert "bucket does not exist" in online.stdout
