"""``cpg-daemon check``: validates the configuration and proves write access to each destination."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from daemonproc import run_cli, write_config
from s3server import S3Server


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "-c", str(config), *extra)


def _one_watch(tmp_path: Path, s3_server: S3Server, destination: str, **watch: Any) -> Path:
    """A config with one watch "plates" of an empty outbox, through the test server."""
    (tmp_path / "outbox").mkdir()
    table = {"name": "plates", "path": str(tmp_path / "outbox"), "destination": destination}
    return write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=s3_server.endpoint_url,
        watches=[{**table, **watch}],
    )


def test_check_proves_write_access_and_leaves_nothing_behind(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    config = _one_watch(tmp_path, s3_server, f"s3://{bucket}/cpg0001-test/broad/images/")
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


def test_check_also_proves_write_access_where_manifests_go_with_upload_manifest(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    destination = f"s3://{bucket}/cpg0001-test/broad/images/"
    config = _one_watch(tmp_path, s3_server, destination, upload_manifest=True)
    mark = s3_server.mark()
    result = _check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    manifests = f"s3://{bucket}/cpg0001-test/broad/workspace/qc/upload_manifests/"
    for place in (destination, manifests):
        assert f"watch plates: write access to {place} confirmed" in result.stdout
    requests = s3_server.requests(since=mark)
    puts = [r.key for r in requests if r.method == "PUT" and r.bucket == bucket]
    assert [key.rpartition(".cpg-daemon-check/")[0] for key in puts] == [
        "cpg0001-test/broad/images/",
        "cpg0001-test/broad/workspace/qc/upload_manifests/",
    ]


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
    # For scripts: the same findings in one JSON document, and the same exit status.
    document = _check(config, "--json")
    assert document.returncode == 1
    found = json.loads(document.stdout)
    assert (found["command"], found["problems"], found["offline"]) == ("check", 2, False)
    (watch,) = found["watches"]
    assert watch["name"] == "plates" and watch["plan"] is None
    assert watch["problems"] == [f"{tmp_path / 'not-there'} does not exist or is not a folder"]
    (access,) = watch["write_access"]
    assert access["destination"] == f"s3://{bucket}-nope/x/"
    assert "bucket does not exist" in access["error"]


def test_check_offline_prints_the_plan_and_every_structure_warning(tmp_path: Path) -> None:
    """A dry run: files, bytes, the first keys, the warnings, and what reject keeps out."""
    outbox = tmp_path / "outbox"
    sizes = {f"images/P1/r01c01f0{i}p01-ch1.tiff": 1000 for i in range(1, 8)}
    sizes["images/P1/odd name.tiff"] = 10  # advice: uploaded even under reject
    sizes["Plate 2/x.tiff"] = 5  # a plate outside images/, with a space: kept out by reject
    sizes[".hidden/never.tiff"] = 1  # excluded, as the daemon does
    for rel, size in sizes.items():
        (outbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (outbox / rel).write_bytes(b"x" * size)
    prefix = "cpg0123-example/broad/images/2024_04_01_Batch8/"

    def config(structure: str) -> Path:
        return write_config(
            tmp_path / f"{structure}.toml",
            state_dir=tmp_path / "state",
            endpoint_url="http://127.0.0.1:9",
            watches=[
                {
                    "name": "plates",
                    "path": str(outbox),
                    "destination": f"s3://bucket/{prefix}",
                    "structure": structure,
                }
            ],
        )

    warn = _check(config("warn"), "--offline")
    assert warn.returncode == 0, warn.stdout + warn.stderr  # warnings are not problems
    lines = warn.stdout.splitlines()
    plan = lines.index(next(line for line in lines if line.startswith("  plan: ")))
    assert lines[plan].startswith("  plan: 9 files, 6.9 KiB (7,015 bytes) to upload")
    assert lines[plan + 1 : plan + 7] == [
        f"    {prefix}Plate 2/x.tiff",
        f"    {prefix}images/P1/odd name.tiff",
        *(f"    {prefix}images/P1/r01c01f0{i}p01-ch1.tiff" for i in range(1, 4)),
        "    ... and 4 more",
    ]
    out = warn.stdout
    assert 'structure (structure = "warn"): 3 warnings, one per folder and rule:' in out
    assert f"      {prefix}Plate 2/ (1 file, required): folder 'Plate 2' in batch folder" in out
    assert f"      {prefix}Plate 2/ (1 file, required): folder name 'Plate 2' contains" in out
    assert f"      {prefix}images/P1/ (1 file, advice): file name 'odd name.tiff'" in out
    assert "    [batch-content] see Cell Painting Gallery data_structure.md" in out
    assert 'with structure = "reject", 1 file (5 B) would be kept out' in out
    assert ".hidden" not in out

    document = json.loads(_check(config("warn"), "--offline", "--json").stdout)
    (watch,) = document["watches"]
    assert (document["problems"], document["offline"], watch["write_access"]) == (0, True, [])
    assert (watch["plan"]["files"], watch["plan"]["bytes"]) == (9, 7015)
    findings = watch["plan"]["structure"]["findings"]
    assert {(f["folder"], f["required"], f["files"]) for f in findings} == {
        (f"{prefix}Plate 2/", True, 1),
        (f"{prefix}images/P1/", False, 1),
    }
    assert len(findings) == 3 and watch["plan"]["structure"]["blocked_files"] == 1

    reject = _check(config("reject"), "--offline")
    assert reject.returncode == 1  # the daemon would keep a file out: a problem to fix
    assert "  plan: 8 files, 6.8 KiB (7,010 bytes) to upload" in reject.stdout
    assert f"    {prefix}Plate 2/x.tiff" not in reject.stdout
    assert 'problem: 1 file (5 B) kept out by structure = "reject"' in reject.stdout

    off = _check(config("off"), "--offline")
    assert off.returncode == 0
    assert "  plan: 9 files" in off.stdout
    assert 'structure: not checked (structure = "off")' in off.stdout
