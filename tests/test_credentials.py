"""Short-lived keys from S3 Access Grants (and STS AssumeRole), renewed by the daemon itself.

The grants endpoint is a local fake speaking S3 Control's and STS's wire formats
(tests/fakes.py) that mints keys living a few seconds; S3 is the real moto server
behind a proxy that refuses unknown and expired keys as S3 does. If renewal were
broken, uploads here would fail: the long-term keys the daemon starts with are not
accepted by S3 at all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SECRET_ACCESS_KEY
from daemonproc import Daemon, journal_rows, object_bytes, run_cli, wait_until, write_config
from fakes import AuthProxy, FakeControlPlane, KeyRegistry
from s3server import S3Server

ACCOUNT = "309624411020"
PREFIX = "cpg0001-test/broad/images/"
MiB = 1024 * 1024


@pytest.fixture
def plane(bucket: str) -> Iterator[FakeControlPlane]:
    registry = KeyRegistry(lifetime=3.0)
    with FakeControlPlane(
        registry, grants=[f"s3://{bucket}/cpg0001-test/*"], expected_account_id=ACCOUNT
    ) as server:
        yield server


@pytest.fixture
def proxy(s3_server: S3Server, plane: FakeControlPlane) -> Iterator[AuthProxy]:
    with AuthProxy(s3_server.endpoint_url, plane.registry) as server:
        yield server


def grant(plane: FakeControlPlane, bucket: str, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "source": "access-grants",
        "account_id": ACCOUNT,
        "target": f"s3://{bucket}/cpg0001-test/*",
        "permission": "READWRITE",
        "duration": "15m",  # the fake grants at most its own lifetime (seconds)
        "refresh_before": "1s",
        "endpoint_url": plane.endpoint_url,
    }
    table.update(overrides)
    return table


def config(
    tmp_path: Path,
    watch: Path,
    proxy: AuthProxy,
    credentials: dict[str, Any] | list[dict[str, Any]],
    destination: str,
    **s3: Any,
) -> Path:
    return write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=proxy.endpoint_url,
        watches=[
            {"name": "plates", "path": str(watch), "destination": destination, "settle": "0.5s"}
        ],
        s3=s3 or None,
        credentials=credentials,
    )


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def wait_objects(s3_client: Any, bucket: str, files: dict[str, bytes], timeout: float) -> None:
    wait_until(
        lambda: all(object_bytes(s3_client, bucket, PREFIX + k) == v for k, v in files.items()),
        timeout,
        f"{len(files)} objects to hold their files' bytes",
    )


def assert_no_secrets(text: str, plane: FakeControlPlane) -> None:
    for keys in plane.registry.mints:
        assert keys.secret_access_key not in text
        assert keys.session_token not in text
    assert TEST_SECRET_ACCESS_KEY not in text


def test_uploads_run_through_several_key_lifetimes(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    watch = tmp_path / "outbox"
    rng = random.Random(3)
    files = {f"plate/{i:02d}.tiff": rng.randbytes(200_000) for i in range(10)}
    files["plate/big.sqlite"] = rng.randbytes(24 * MiB)  # multipart, across renewals
    for rel, data in files.items():
        write(watch / rel, data)
    cfg = config(
        tmp_path,
        watch,
        proxy,
        grant(plane, bucket),
        f"s3://{bucket}/{PREFIX}",
        part_size="5MiB",
        multipart_threshold="5MiB",
        max_concurrency=2,
        max_bandwidth="3MB",  # about 9 s of uploading: three key lifetimes or more
    )
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_objects(s3_client, bucket, files, timeout=60)
    finally:
        assert daemon.terminate() == 0
    rows = journal_rows(tmp_path / "state")
    assert [r["state"] for r in rows] == ["uploaded"] * len(files)
    calls = plane.data_access_calls
    assert len(calls) >= 3, "the keys were not renewed"
    assert {(c.target, c.permission, c.account_id) for c in calls} == {
        (f"s3://{bucket}/cpg0001-test/*", "READWRITE", ACCOUNT)
    }
    assert all(c.duration_seconds == 900 for c in calls)
    assert proxy.rejections.get("InvalidAccessKeyId", 0) == 0  # never the long-term keys
    assert proxy.rejections.get("ExpiredToken", 0) == 0  # renewed before, not after, expiry
    events = daemon.events()
    started = next(e for e in events if e.get("event") == "multipart_started")
    done = next(
        e for e in events if e.get("event") == "uploaded" and e["key"].endswith("big.sqlite")
    )
    renewals_during = [
        e
        for e in events
        if e.get("event") == "credentials_renewed"
        and started["timestamp"] < e["timestamp"] < done["timestamp"]
    ]
    assert renewals_during, "the multipart upload did not outlive its first keys"
    assert_no_secrets(daemon.log_text(), plane)


def test_outage_longer_than_the_keys_pauses_uploads_and_they_resume(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    watch = tmp_path / "outbox"
    first = {"before/a.tiff": write(watch / "before/a.tiff", b"before the outage")}
    cfg = config(tmp_path, watch, proxy, grant(plane, bucket), f"s3://{bucket}/{PREFIX}")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_objects(s3_client, bucket, first, timeout=30)
        plane.registry.down = True  # the grants endpoint goes away ...
        time.sleep(plane.registry.lifetime + 1.0)  # ... for longer than the keys live
        during = {
            f"during/{i}.tiff": write(watch / f"during/{i}.tiff", b"x" * i) for i in range(1, 6)
        }
        time.sleep(3.0)
        rows = journal_rows(tmp_path / "state")
        assert not [r for r in rows if r["state"] == "failed"], "a file failed for lack of keys"
        assert all(object_bytes(s3_client, bucket, PREFIX + k) is None for k in during)
        failures = [e for e in daemon.events() if e.get("event") == "credentials_renewal_failed"]
        assert failures and failures[-1]["keys_valid_for_s"] == 0
        def settled_status() -> dict[str, Any] | None:
            # Between renewal attempts; during one, the state is "refreshing".
            answer: dict[str, Any] = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
            return answer if answer["credentials"][0]["state"] in ("expired", "error") else None

        status = wait_until(settled_status, 20, "the keys to show as expired or in error")
        (cred,) = status["credentials"]
        assert "cannot reach the endpoint" in cred["last_error"]
        assert status["files"]["failed"] == 0
        print("status during the outage:", json.dumps(cred))
        plane.registry.down = False  # back: uploads resume by themselves
        wait_objects(s3_client, bucket, during, timeout=45)
    finally:
        assert daemon.terminate() == 0
    rows = journal_rows(tmp_path / "state")
    assert [r["state"] for r in rows] == ["uploaded"] * 6
    assert_no_secrets(daemon.log_text(), plane)


def test_keys_refused_by_s3_are_renewed_at_once(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    plane.registry.lifetime = 3600.0  # long-lived: only a refusal can trigger a renewal
    watch = tmp_path / "outbox"
    cfg = config(tmp_path, watch, proxy, grant(plane, bucket), f"s3://{bucket}/{PREFIX}")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_objects(s3_client, bucket, {"a.tiff": write(watch / "a.tiff", b"a")}, timeout=30)
        minted = len(plane.registry.mints)
        plane.registry.expire()  # revoked on the server side while the daemon trusts them
        wait_objects(s3_client, bucket, {"b.tiff": write(watch / "b.tiff", b"b")}, timeout=30)
    finally:
        assert daemon.terminate() == 0
    assert proxy.rejections.get("ExpiredToken", 0) >= 1
    assert len(plane.registry.mints) == minted + 1
    assert any(e.get("event") == "credentials_refused" for e in daemon.events())
    rows = journal_rows(tmp_path / "state")
    assert [(r["state"], r["attempts"]) for r in rows] == [("uploaded", 0), ("uploaded", 0)]


def test_assume_role_keys_are_renewed_too(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    watch = tmp_path / "outbox"
    role = {
        "source": "assume-role",
        "role_arn": f"arn:aws:iam::{ACCOUNT}:role/cpg-upload",
        "duration": "15m",
        "refresh_before": "1s",
        "endpoint_url": plane.endpoint_url,
    }
    cfg = config(tmp_path, watch, proxy, role, f"s3://{bucket}/{PREFIX}", max_bandwidth="200kB")
    files = {f"{i}.tiff": write(watch / f"{i}.tiff", os.urandom(150_000)) for i in range(8)}
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_objects(s3_client, bucket, files, timeout=60)
    finally:
        assert daemon.terminate() == 0
    calls = plane.assume_role_calls
    assert len(calls) >= 2
    assert {c.role_arn for c in calls} == {role["role_arn"]}
    assert_no_secrets(daemon.log_text(), plane)


def test_destination_outside_every_grant_is_refused_up_front(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, bucket: str
) -> None:
    (tmp_path / "outbox").mkdir()
    grants = [
        grant(plane, bucket, target=f"s3://{bucket}/cpg0001-test/*"),
        grant(plane, bucket, target=f"s3://{bucket}/cpg0002-other/*"),
    ]
    cfg = config(tmp_path, tmp_path / "outbox", proxy, grants, f"s3://{bucket}/cpg0003-x/images/")
    for command in (["check", "--offline"], ["run"]):
        result = run_cli(*command, "-c", str(cfg))
        assert result.returncode == 2, result.stderr
        assert f"s3://{bucket}/cpg0003-x/images/" in result.stderr
        assert f"s3://{bucket}/cpg0001-test/*" in result.stderr
        assert "watch[0].destination" in result.stderr


def test_check_obtains_keys_once_per_grant_and_proves_write_access(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, s3_client: Any, bucket: str
) -> None:
    plane.registry.lifetime = 3600.0
    (tmp_path / "outbox").mkdir()
    cfg = config(
        tmp_path, tmp_path / "outbox", proxy, grant(plane, bucket), f"s3://{bucket}/{PREFIX}"
    )
    result = run_cli("check", "-c", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"credentials s3://{bucket}/cpg0001-test/*: obtained, valid until 20" in result.stdout
    assert "write access to" in result.stdout
    assert len(plane.data_access_calls) == 1
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert_no_secrets(result.stdout + result.stderr, plane)


@pytest.mark.parametrize(
    ("setup", "sentence"),
    [
        ("no-grant", "no grant matches target"),
        ("wrong-region", "the request went to region us-west-2, but the grants are in us-east-1"),
        ("bad-keys", "the long-term keys (the environment) were refused (InvalidAccessKeyId)"),
        ("unreachable", "cannot reach the endpoint"),
    ],
)
def test_access_grants_errors_people_hit_read_as_one_sentence(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    sentence: str,
) -> None:
    (tmp_path / "outbox").mkdir()
    table = grant(plane, bucket)
    if setup == "no-grant":
        plane.grants = [f"s3://{bucket}/cpg9999-someone-else/*"]
    elif setup == "wrong-region":
        plane.registry.fail_with = (
            403,
            "AccessDenied",
            f"User: arn:aws:iam::{ACCOUNT}:user/x is not authorized to perform: "
            f"s3:GetDataAccess on resource: arn:aws:s3:us-west-2:{ACCOUNT}:access-grants/default",
        )
    elif setup == "bad-keys":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    else:
        table["endpoint_url"] = "http://127.0.0.1:9"  # nothing listens there
    cfg = config(tmp_path, tmp_path / "outbox", proxy, table, f"s3://{bucket}/{PREFIX}")
    result = run_cli("check", "-c", str(cfg))
    assert result.returncode == 1
    assert sentence in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert_no_secrets(result.stdout + result.stderr, plane)


def test_each_watch_uses_the_grant_that_covers_it(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, s3_client: Any, bucket: str
) -> None:
    plane.registry.lifetime = 3600.0
    plane.grants = [f"s3://{bucket}/cpg0001-test/*", f"s3://{bucket}/cpg0002-other/*"]
    grants = [
        grant(plane, bucket, target=f"s3://{bucket}/cpg0001-test/*"),
        grant(plane, bucket, target=f"s3://{bucket}/cpg0002-other/*"),
    ]
    first, second = tmp_path / "one", tmp_path / "two"
    write(first / "a.tiff", b"one")
    write(second / "b.tiff", b"two")
    cfg = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=proxy.endpoint_url,
        watches=[
            {
                "name": "one",
                "path": str(first),
                "destination": f"s3://{bucket}/cpg0001-test/x/",
                "settle": "0.5s",
            },
            {
                "name": "two",
                "path": str(second),
                "destination": f"s3://{bucket}/cpg0002-other/y/",
                "settle": "0.5s",
            },
        ],
        credentials=grants,
    )
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_until(
            lambda: (
                object_bytes(s3_client, bucket, "cpg0001-test/x/a.tiff") == b"one"
                and object_bytes(s3_client, bucket, "cpg0002-other/y/b.tiff") == b"two"
            ),
            30,
            "both watches to upload",
        )
    finally:
        assert daemon.terminate() == 0
    assert sorted(c.target or "" for c in plane.data_access_calls) == [
        f"s3://{bucket}/cpg0001-test/*",
        f"s3://{bucket}/cpg0002-other/*",
    ]


def test_long_term_keys_from_systemd_load_credential(
    tmp_path: Path,
    plane: FakeControlPlane,
    proxy: AuthProxy,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plane.registry.lifetime = 3600.0
    directory = tmp_path / "credentials"  # what systemd makes for LoadCredential=
    directory.mkdir()
    (directory / "aws-credentials").write_text(
        "[cpg_staging]\naws_access_key_id = testing\n"
        f"aws_secret_access_key = {TEST_SECRET_ACCESS_KEY}\n"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "outbox").mkdir()
    table = grant(plane, bucket, profile="cpg_staging")
    cfg = config(tmp_path, tmp_path / "outbox", proxy, table, f"s3://{bucket}/{PREFIX}")
    result = run_cli("check", "-c", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c.caller_access_key_id for c in plane.data_access_calls] == ["testing"]


def test_keys_written_into_the_config_file_are_refused_without_echoing_them(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[credentials]\nsource = "environment"\n'
        'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n'
    )
    result = run_cli("check", "--offline", "-c", str(cfg))
    assert result.returncode == 2
    assert "credentials.aws_secret_access_key" in result.stderr
    assert "do not belong in the configuration file" in result.stderr
    assert "wJalrXUtnFEMI" not in result.stdout + result.stderr


def test_a_profile_that_does_not_exist_is_a_configuration_error(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, bucket: str
) -> None:
    (tmp_path / "outbox").mkdir()
    table = grant(plane, bucket, profile="cpg_staging")
    cfg = config(tmp_path, tmp_path / "outbox", proxy, table, f"s3://{bucket}/{PREFIX}")
    result = run_cli("run", "-c", str(cfg))
    assert result.returncode == 2
    assert "credentials.profile" in result.stderr
    assert "no AWS profile named 'cpg_staging'" in result.stderr
    upload = run_cli("upload", str(tmp_path / "outbox"), f"s3://{bucket}/x/", "--profile", "nope")
    assert upload.returncode == 2
    assert "no AWS profile named 'nope'" in upload.stderr


def test_a_one_shot_upload_gets_its_keys_from_access_grants_without_a_config_file(
    tmp_path: Path, plane: FakeControlPlane, proxy: AuthProxy, s3_client: Any, bucket: str
) -> None:
    """``upload --access-grants``: the long-term keys (the environment's here, which S3
    itself refuses) only ask GetDataAccess for keys, for the destination's first folder."""
    plane.registry.lifetime = 3600.0
    source = tmp_path / "plate"
    files = {f"{i}.tiff": write(source / f"{i}.tiff", os.urandom(2000 + i)) for i in range(3)}
    dest = f"s3://{bucket}/{PREFIX}"
    common = [
        "upload", str(source), dest, "--endpoint-url", proxy.endpoint_url,
        "--state-dir", str(tmp_path / "state"), "--access-grants",
    ]  # fmt: skip
    missing = run_cli(*common, "--grants-endpoint-url", plane.endpoint_url)
    assert missing.returncode == 2
    assert "needs the grants instance's 12-digit account (--account-id)" in missing.stderr
    done = run_cli(
        *common, "--account-id", ACCOUNT, "--grants-endpoint-url", plane.endpoint_url
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wait_objects(s3_client, bucket, files, 5)
    assert {(c.target, c.permission) for c in plane.data_access_calls} == {
        (f"s3://{bucket}/cpg0001-test/*", "READWRITE")
    }
    assert proxy.rejections.get("InvalidAccessKeyId", 0) == 0  # the long-term keys: never S3
    assert_no_secrets(done.stdout + done.stderr, plane)


def test_the_guides_bare_section_in_aws_config_is_named_with_the_fix(tmp_path: Path) -> None:
    """The gallery's guide had people add ``[cpg_staging]`` to ~/.aws/config, where the
    AWS CLI and botocore read only ``[profile cpg_staging]``."""
    Path(os.environ["AWS_CONFIG_FILE"]).write_text("[cpg_staging]\nregion = us-east-1\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text('[credentials]\nsource = "profile"\nprofile = "cpg_staging"\n')
    result = run_cli("check", "--offline", "-c", str(cfg))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "credentials.profile" in result.stderr
    assert f"{os.environ['AWS_CONFIG_FILE']} has a section [cpg_staging]" in result.stderr
    assert "rename it to [profile cpg_staging]" in result.stderr


@pytest.mark.parametrize(
    "pasted",
    [
        "[cpg_staging]\naws_access_key_id = \"AKIAIOSFODNN7EXAMPLE\"\n",
        "[profile cpg_staging]\ncredential_process = /opt/get-keys\n",  # not even TOML
    ],
)
def test_an_aws_profile_pasted_into_the_config_points_to_the_aws_files(
    tmp_path: Path, pasted: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(pasted)
    result = run_cli("check", "--offline", "-c", str(cfg))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is an AWS profile, which belongs in the AWS files" in result.stderr
    assert "~/.aws/credentials under [cpg_staging]" in result.stderr
    assert 'profile = "cpg_staging"' in result.stderr
    assert "AKIAIOSFODNN7EXAMPLE" not in result.stdout + result.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv, to run cpg-daemon as a user who may not read the folder",
)
def test_a_credentials_directory_it_may_not_read_is_one_sentence_not_a_traceback() -> None:
    """systemd's $CREDENTIALS_DIRECTORY, inherited by a shell of another user, say."""
    top = Path(tempfile.mkdtemp(prefix="cpg-credentials-"))
    try:
        top.chmod(0o755)
        private = top / "credentials"
        private.mkdir(mode=0o700)  # root's, as systemd makes it for the service's user
        (private / "aws-credentials").write_text("[cpg_staging]\n")
        cfg = top / "config.toml"
        cfg.write_text('[credentials]\nsource = "profile"\nprofile = "cpg_staging"\n')
        cfg.chmod(0o644)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*as_nobody, sys.executable, "-m", "cpg_daemon", "check", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CREDENTIALS_DIRECTORY": str(private), "HOME": str(top)},
            cwd=top,
        )
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"$CREDENTIALS_DIRECTORY ({private})" in result.stderr
    assert "Permission denied" in result.stderr
