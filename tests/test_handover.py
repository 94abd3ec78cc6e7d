"""Keys as contributors really have them: obtained on a laptop and handed to the server.

S3 is the real moto server behind a proxy that refuses unknown and expired keys as S3
does (tests/fakes.py); the keys are minted by the fake's registry, as
``aws s3control get-data-access`` would print them, with lifetimes of seconds. The
long-term test keys in the daemon's environment are not accepted by S3 at all.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, journal_rows, object_bytes, run_cli, wait_until, write_config
from fakes import AuthProxy, KeyRegistry, MintedKeys
from s3server import S3Server

from cpg_daemon.cli.keys import KeysFormatError, keys_from_environment, parse_keys
from cpg_daemon.cli.localserver import free_port
from cpg_daemon.ops.daemon import status_line
from cpg_daemon.ops.status import from_wire, render

PREFIX = "cpg0001-test/broad/images/"
MiB = 1024 * 1024


# -- what the command reads (pure) ------------------------------------------------------


GET_DATA_ACCESS = {
    "Credentials": {
        "AccessKeyId": "ASIAEXAMPLEEXAMPLE01",
        "SecretAccessKey": "secret/EXAMPLE",
        "SessionToken": "token+EXAMPLE==",
        "Expiration": "2026-12-03T03:14:15+00:00",
    },
    "MatchedGrantTarget": "s3://staging-cellpainting-gallery/cpg0123-example/*",
}


@pytest.mark.parametrize(
    ("text", "expiration", "target"),
    [
        (json.dumps(GET_DATA_ACCESS, indent=4), "2026-12-03T03:14:15+00:00", True),
        (  # aws configure export-credentials --format process
            json.dumps(
                {"Version": 1, **GET_DATA_ACCESS["Credentials"]}  # type: ignore[dict-item]
            ),
            "2026-12-03T03:14:15+00:00",
            False,
        ),
        (  # --format env, or pasted from a shell
            "export AWS_ACCESS_KEY_ID=ASIAEXAMPLEEXAMPLE01\n"
            "export AWS_SECRET_ACCESS_KEY='secret/EXAMPLE'\n"
            'export AWS_SESSION_TOKEN="token+EXAMPLE=="\n'
            "export AWS_CREDENTIAL_EXPIRATION=2026-12-03T03:14:15Z\n",
            "2026-12-03T03:14:15Z",
            False,
        ),
        (  # Windows: cmd's set, PowerShell's $Env:
            "set AWS_ACCESS_KEY_ID=ASIAEXAMPLEEXAMPLE01\r\n"
            '$Env:AWS_SECRET_ACCESS_KEY="secret/EXAMPLE"\r\n'
            "AWS_SESSION_TOKEN=token+EXAMPLE==\r\n",
            None,
            False,
        ),
    ],
    ids=["get-data-access", "export-credentials", "export-lines", "windows"],
)
def test_the_forms_keys_are_carried_in(text: str, expiration: str | None, target: bool) -> None:
    keys = parse_keys(text)
    assert (keys.access_key_id, keys.secret_access_key, keys.session_token) == (
        "ASIAEXAMPLEEXAMPLE01",
        "secret/EXAMPLE",
        "token+EXAMPLE==",
    )
    assert keys.expiration == expiration
    assert keys.target == (GET_DATA_ACCESS["MatchedGrantTarget"] if target else None)
    assert "secret" not in repr(keys) and "token" not in repr(keys).replace("target", "")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "no keys given"),
        ('{"Credentials": {"AccessKeyId": "ASIA', "not valid JSON (cut short"),
        ('{"Credentials": {"AccessKeyId": "ASIAX"}}', "the secret access key missing"),
        ("hello\nworld\n", "no keys found"),
    ],
)
def test_what_is_not_keys_is_named_without_quoting_it(text: str, said: str) -> None:
    with pytest.raises(KeysFormatError, match=said.replace("(", r"\(")) as caught:
        parse_keys(text)
    assert "ASIA" not in str(caught.value)


def test_with_nothing_piped_in_the_commands_own_environment_is_read() -> None:
    keys = keys_from_environment(
        {"AWS_ACCESS_KEY_ID": "ASIAX", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    )
    assert (keys.access_key_id, keys.session_token, keys.expiration) == ("ASIAX", "t", None)
    with pytest.raises(KeysFormatError, match="no keys given"):
        keys_from_environment({})


# -- a running daemon --------------------------------------------------------------------


@pytest.fixture
def registry() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture
def proxy(s3_server: S3Server, registry: KeyRegistry) -> Iterator[AuthProxy]:
    with AuthProxy(s3_server.endpoint_url, registry) as server:
        yield server


def handed_over(bucket: str, **overrides: Any) -> dict[str, Any]:
    table = {"source": "handed-over", "target": f"s3://{bucket}/cpg0001-test/*"}
    table.update(overrides)
    return table


def make_config(
    tmp_path: Path,
    proxy: AuthProxy,
    credentials: dict[str, Any],
    bucket: str,
    *,
    daemon: dict[str, Any] | None = None,
    **s3: Any,
) -> Path:
    return write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url=proxy.endpoint_url,
        watches=[
            {
                "name": "plates",
                "path": str(tmp_path / "outbox"),
                "destination": f"s3://{bucket}/{PREFIX}",
                "settle": "0.3s",
            }
        ],
        s3=s3 or None,
        credentials=credentials,
        daemon=daemon,
    )


def as_printed(keys: MintedKeys, target: str) -> str:
    """What ``aws s3control get-data-access --output json`` prints for these keys."""
    return json.dumps(
        {
            "Credentials": {
                "AccessKeyId": keys.access_key_id,
                "SecretAccessKey": keys.secret_access_key,
                "SessionToken": keys.session_token,
                "Expiration": keys.expiration.isoformat(),
            },
            "MatchedGrantTarget": target,
        },
        indent=4,
    )


def drop(tmp_path: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        path = tmp_path / "outbox" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def uploaded(s3_client: Any, bucket: str, files: dict[str, bytes]) -> bool:
    return all(object_bytes(s3_client, bucket, PREFIX + k) == v for k, v in files.items())


def status_of(config: Path) -> dict[str, Any]:
    answer = run_cli("status", "--json", "-c", str(config))
    assert answer.returncode == 0, answer.stdout + answer.stderr
    status: dict[str, Any] = json.loads(answer.stdout)
    return status


def test_a_daemon_without_keys_waits_and_uploads_once_keys_are_handed_over(
    tmp_path: Path, proxy: AuthProxy, registry: KeyRegistry, s3_client: Any, bucket: str
) -> None:
    target = f"s3://{bucket}/cpg0001-test/*"
    config = make_config(tmp_path, proxy, handed_over(bucket), bucket)
    files = drop(tmp_path, {f"plate/{i}.tiff": os.urandom(1000 + i) for i in range(5)})
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        waiting = wait_until(
            lambda: (s := status_of(config))["files"]["queued"] == 5 and s, 20, "5 queued"
        )
        (cred,) = waiting["credentials"]
        assert cred["state"] == "waiting" and "credentials set" in cred["last_error"]
        assert waiting["files"]["failed"] == 0
        shown = run_cli("status", "-c", str(config)).stdout
        assert "WAITING for keys, files wait" in shown
        assert status_line(from_wire(waiting)).startswith("KEYS WAITING (")

        keys = registry.mint(lifetime=2 * 3600)  # more than warn_before (1 h) ahead
        given = run_cli("credentials", "set", "-c", str(config), input=as_printed(keys, target))
        assert given.returncode == 0, given.stdout + given.stderr
        assert f"credentials {target}: handed to the daemon, valid until" in given.stdout
        assert "watches using them: plates" in given.stdout
        wait_until(lambda: uploaded(s3_client, bucket, files), 30, "the queue uploaded")
        cred = status_of(config)["credentials"][0]
        assert cred["state"] == "valid" and cred["warning"] is None
        assert datetime.fromisoformat(cred["expires_at"]) == keys.expiration.replace(
            microsecond=0
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    kept = tmp_path / "state" / "handed-over-keys.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    rows = journal_rows(tmp_path / "state")
    assert [(r["state"], r["attempts"]) for r in rows] == [("uploaded", 0)] * 5
    handed = [e for e in daemon.events() if e.get("event") == "control_command"]
    assert handed and handed[-1]["args"] == "(not logged)"

    # A restart keeps the keys: a new file goes without another hand-over.
    again = Daemon.started(config, tmp_path / "again.log")
    try:
        more = drop(tmp_path, {"plate/after-restart.tiff": b"after"})
        wait_until(lambda: uploaded(s3_client, bucket, more), 30, "uploaded after a restart")
    finally:
        assert again.terminate() == 0, again.log_text()[-3000:]


def test_refused_or_expired_keys_are_refused_by_the_command_and_the_old_ones_stay(
    tmp_path: Path, proxy: AuthProxy, registry: KeyRegistry, s3_client: Any, bucket: str
) -> None:
    target = f"s3://{bucket}/cpg0001-test/*"
    config = make_config(tmp_path, proxy, handed_over(bucket), bucket)
    (tmp_path / "outbox").mkdir()
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        good = registry.mint(lifetime=3600)
        assert run_cli("credentials", "set", "-c", str(config), input=as_printed(good, target))
        revoked = registry.mint(lifetime=3600)
        registry.expire(revoked.access_key_id)  # S3 answers ExpiredToken
        refused = run_cli(
            "credentials", "set", "-c", str(config), input=as_printed(revoked, target)
        )
        assert refused.returncode == 1
        assert "S3 refused these keys" in refused.stderr and "the old keys stay" in refused.stderr
        other = run_cli(
            "credentials",
            "set",
            "--target",
            f"s3://{bucket}/elsewhere/*",
            "-c",
            str(config),
            input=as_printed(good, target),
        )
        assert other.returncode == 1 and "names no handed-over entry" in other.stderr
        files = drop(tmp_path, {"still.tiff": b"the old keys"})
        wait_until(lambda: uploaded(s3_client, bucket, files), 30, "uploaded with the old keys")
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]


def _metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def test_keys_that_expire_warn_ahead_pause_the_queue_and_new_keys_resume_it(
    tmp_path: Path, proxy: AuthProxy, registry: KeyRegistry, s3_client: Any, bucket: str
) -> None:
    """Nothing renews handed-over keys: the daemon warns (log, status, STATUS=, metrics)
    ``warn_before`` ahead, and when they expire mid-upload the files wait (none fails,
    attempts untouched), the multipart upload is kept (no part sent twice), and new
    keys resume the queue."""
    target = f"s3://{bucket}/cpg0001-test/*"
    port = free_port()
    config = make_config(
        tmp_path,
        proxy,
        handed_over(bucket, warn_before="1h"),
        bucket,
        daemon={"metrics_listen": f"127.0.0.1:{port}"},
        part_size="5MiB",
        multipart_threshold="5MiB",
        max_concurrency=2,
        max_bandwidth="2MB",
    )
    (tmp_path / "outbox").mkdir()
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        short = registry.mint(lifetime=6)
        given = run_cli("credentials", "set", "-c", str(config), input=as_printed(short, target))
        assert given.returncode == 0, given.stderr
        status = status_of(config)
        (cred,) = status["credentials"]
        assert cred["state"] == "valid" and "credentials set" in cred["warning"]
        assert status_line(from_wire(status)).startswith("KEYS EXPIRE ")
        assert "WARNING: the keys expire at" in render(from_wire(status))
        assert _metric(port, "cpg_daemon_credentials_expiring") == 1
        daemon.wait_for_event("credentials_expiring")

        big = os.urandom(12 * MiB)  # 6 s at 2 MB/s: the 6 s keys end part-way
        files = drop(tmp_path, {"big.sqlite": big, "small.csv": b"a,b\n"})
        wait_until(
            lambda: status_of(config)["credentials"][0]["state"] in ("expired", "refused"),
            30,
            "the keys to end",
        )
        assert object_bytes(s3_client, bucket, PREFIX + "big.sqlite") is None, "not mid-upload"
        time.sleep(3)  # the queue stands still: nothing fails, nothing is sent
        rows = journal_rows(tmp_path / "state")
        assert not [r for r in rows if r["state"] == "failed"]
        status = status_of(config)
        assert status["files"]["failed"] == 0
        assert status_line(from_wire(status)).split(" (")[0] in (
            "KEYS EXPIRED",
            "KEYS REFUSED",
        )
        assert _metric(port, "cpg_daemon_credentials_valid") == 0

        fresh = registry.mint(lifetime=3600)
        given = run_cli("credentials", "set", "-c", str(config), input=as_printed(fresh, target))
        assert given.returncode == 0, given.stderr
        wait_until(lambda: uploaded(s3_client, bucket, files), 60, "the queue uploaded")
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    rows = journal_rows(tmp_path / "state")
    assert sorted((r["state"], r["attempts"]) for r in rows) == [("uploaded", 0)] * 2
    events = daemon.events()
    started = [e for e in events if e.get("event") == "multipart_started"]
    assert len(started) == 1, "the multipart upload was started again"
    parts = [
        re.search(r"partNumber=(\d+)", request).group(1)  # type: ignore[union-attr]
        for request, status in proxy.answered
        if request.startswith("PUT ") and "partNumber=" in request and status == 200
    ]
    assert sorted(parts, key=int) == [str(n) for n in range(1, 4)], "a part sent twice"


def test_new_keys_pasted_into_the_profile_file_resume_the_queue_without_a_reload(
    tmp_path: Path, proxy: AuthProxy, registry: KeyRegistry, s3_client: Any, bucket: str
) -> None:
    credentials_file = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])

    def paste(keys: MintedKeys) -> None:
        credentials_file.write_text(
            "[cpg_staging]\n"
            f"aws_access_key_id = {keys.access_key_id}\n"
            f"aws_secret_access_key = {keys.secret_access_key}\n"
            f"aws_session_token = {keys.session_token}\n"
        )

    paste(registry.mint(lifetime=3600))
    config = make_config(
        tmp_path, proxy, {"source": "profile", "profile": "cpg_staging"}, bucket
    )
    first = drop(tmp_path, {"first.tiff": b"first"})
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        wait_until(lambda: uploaded(s3_client, bucket, first), 30, "the first file")
        registry.expire()  # the pasted keys end (S3 answers ExpiredToken)
        second = drop(tmp_path, {"second.tiff": b"second"})
        wait_until(
            lambda: status_of(config)["credentials"][0]["state"] == "refused",
            30,
            "the keys to show as refused",
        )
        time.sleep(2)
        status = status_of(config)
        assert status["files"]["failed"] == 0 and status["files"]["queued"] == 1
        assert "ExpiredToken" in status["credentials"][0]["last_error"]
        shown = run_cli("status", "-c", str(config)).stdout
        assert "REFUSED by S3, files wait for new keys" in shown
        paste(registry.mint(lifetime=3600))  # no reload, no restart
        wait_until(lambda: uploaded(s3_client, bucket, second), 30, "the second file")
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    rows = journal_rows(tmp_path / "state")
    assert sorted((r["state"], r["attempts"]) for r in rows) == [("uploaded", 0)] * 2
    assert any(e.get("event") == "credentials_waiting" for e in daemon.events())


def test_the_expiry_of_keys_from_a_credential_process_shows_in_status(
    tmp_path: Path, proxy: AuthProxy, registry: KeyRegistry, s3_client: Any, bucket: str
) -> None:
    """botocore knows when a ``credential_process``'s keys expire: so does status."""
    keys = registry.mint(lifetime=2 * 3600)
    printed = tmp_path / "process-output.json"
    printed.write_text(
        json.dumps(
            {
                "Version": 1,
                "AccessKeyId": keys.access_key_id,
                "SecretAccessKey": keys.secret_access_key,
                "SessionToken": keys.session_token,
                "Expiration": keys.expiration.isoformat(),
            }
        )
    )
    Path(os.environ["AWS_CONFIG_FILE"]).write_text(
        f"[profile lab]\ncredential_process = cat {printed}\n"
    )
    config = make_config(tmp_path, proxy, {"source": "profile", "profile": "lab"}, bucket)
    files = drop(tmp_path, {"a.tiff": b"a"})
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        wait_until(lambda: uploaded(s3_client, bucket, files), 30, "uploaded")
        (cred,) = status_of(config)["credentials"]
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert cred["state"] == "valid" and cred["warning"] is None
    assert datetime.fromisoformat(cred["expires_at"]) == keys.expiration.replace(microsecond=0)
