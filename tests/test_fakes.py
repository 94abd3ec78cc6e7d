"""Contract tests for tests/fakes.py: real botocore clients against the local fakes.

The control plane must answer GetDataAccess and AssumeRole in the exact wire formats
botocore parses, and the proxy must let minted keys through to moto until they expire,
then refuse them the way S3 does, so that broken key renewal fails a test.
"""

from __future__ import annotations

import http.client
import io
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import aiobotocore.session
import anyio
import boto3  # type: ignore[import-untyped]
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError
from fakes import (
    AuthProxy,
    FakeControlPlane,
    KeyRegistry,
    MintedKeys,
    grant_covers,
    route_s3control_to_endpoint,
)
from s3server import S3Server

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/cpg-uploader"
MiB = 1024 * 1024
ONE_ATTEMPT = {"total_max_attempts": 1}


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def registry() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture
def control_plane(registry: KeyRegistry) -> Iterator[FakeControlPlane]:
    with FakeControlPlane(registry, expected_account_id=ACCOUNT_ID) as plane:
        yield plane
    assert not plane.errors


@pytest.fixture
def proxy(s3_server: S3Server, registry: KeyRegistry) -> Iterator[AuthProxy]:
    with AuthProxy(s3_server.endpoint_url, registry) as gate:
        yield gate
    assert not gate.errors


def s3control(plane: FakeControlPlane, access_key_id: str = "testing") -> Any:
    client = boto3.client(
        "s3control",
        endpoint_url=plane.endpoint_url,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key="testing-secret",
        config=Config(retries=ONE_ATTEMPT),
    )
    route_s3control_to_endpoint(client)
    return client


def sts(plane: FakeControlPlane, access_key_id: str = "testing") -> Any:
    return boto3.client(
        "sts",
        endpoint_url=plane.endpoint_url,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key="testing-secret",
        config=Config(retries=ONE_ATTEMPT),
    )


def s3_via(proxy: AuthProxy, credentials: dict[str, Any]) -> Any:
    """An S3 client through the proxy using a Credentials dict (or client kwargs)."""
    if "AccessKeyId" in credentials:
        credentials = {
            "aws_access_key_id": credentials["AccessKeyId"],
            "aws_secret_access_key": credentials["SecretAccessKey"],
            "aws_session_token": credentials["SessionToken"],
        }
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint_url,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries=ONE_ATTEMPT),
        **credentials,
    )


def data_access(
    plane: FakeControlPlane, target: str, permission: str = "READWRITE", **kwargs: Any
) -> dict[str, Any]:
    reply: dict[str, Any] = s3control(plane).get_data_access(
        AccountId=ACCOUNT_ID, Target=target, Permission=permission, **kwargs
    )
    return reply


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    response = exc.value.response
    return (
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Code"],
        response["Error"]["Message"],
    )


# -- KeyRegistry ---------------------------------------------------------------------------


def test_registry_mints_and_checks_keys() -> None:
    registry = KeyRegistry(lifetime=600)
    keys = registry.mint()
    assert keys.access_key_id.startswith("ASIA") and len(keys.access_key_id) == 20
    assert keys.access_key_id[4:].isalnum() and keys.access_key_id.isupper()
    assert keys.expiration.tzinfo is not None
    assert 599 <= keys.lifetime <= 600
    assert registry.check(keys.access_key_id, keys.session_token) is None
    assert registry.check(keys.access_key_id, "other-token") == "InvalidToken"
    assert registry.check(keys.access_key_id, None) == "InvalidToken"
    assert registry.check("ASIAUNKNOWNUNKNOWN00", keys.session_token) == "InvalidAccessKeyId"

    short = registry.mint(0.2)
    assert registry.mints == [keys, short]
    time.sleep(0.3)
    assert registry.check(short.access_key_id, short.session_token) == "ExpiredToken"
    registry.expire(keys.access_key_id)
    assert registry.check(keys.access_key_id, keys.session_token) == "ExpiredToken"
    assert registry.mints[0] is keys  # the history keeps the keys as minted


@pytest.mark.parametrize(
    ("grant", "target", "covered"),
    [
        ("s3://b/p/*", "s3://b/p/*", True),
        ("s3://b/p/*", "s3://b/p/q/*", True),
        ("s3://b/p/*", "s3://b/p/file.tif", True),
        ("s3://b/p/*", "s3://b/other/*", False),
        ("s3://b/p/*", "s3://c/p/*", False),
        ("s3://*", "s3://any/thing/*", True),
        ("s3://b/p/file.tif", "s3://b/p/file.tif", True),
        ("s3://b/p/file.tif", "s3://b/p/*", False),
    ],
)
def test_grant_covers(grant: str, target: str, covered: bool) -> None:
    assert grant_covers(grant, target) is covered


# -- S3 Control GetDataAccess --------------------------------------------------------------


def test_get_data_access_wire_format(control_plane: FakeControlPlane) -> None:
    control_plane.grants = ["s3://other/*", "s3://bucket/*", "s3://bucket/cpg0001/*"]
    before = datetime.now(timezone.utc)
    reply = data_access(control_plane, "s3://bucket/cpg0001/plate1/*", DurationSeconds=900)

    credentials = reply["Credentials"]
    assert credentials["AccessKeyId"].startswith("ASIA")
    assert credentials["SecretAccessKey"] and credentials["SessionToken"]
    expiration = credentials["Expiration"]
    assert isinstance(expiration, datetime) and expiration.tzinfo is not None
    assert before + timedelta(seconds=899) <= expiration <= before + timedelta(seconds=901)
    assert reply["MatchedGrantTarget"] == "s3://bucket/cpg0001/*"  # the most specific
    assert reply["Grantee"]["GranteeType"] == "IAM"

    [call] = control_plane.data_access_calls
    assert (call.target, call.permission, call.duration_seconds) == (
        "s3://bucket/cpg0001/plate1/*",
        "READWRITE",
        900,
    )
    assert (call.account_id, call.caller_access_key_id, call.status) == (ACCOUNT_ID, "testing", 200)
    assert call.keys is not None and call.keys.access_key_id == credentials["AccessKeyId"]
    assert call.keys.expiration == expiration  # the wire carries the exact expiration


def test_get_data_access_lifetime_is_capped_by_the_registry(
    control_plane: FakeControlPlane, registry: KeyRegistry
) -> None:
    registry.lifetime = 30
    reply = data_access(control_plane, "s3://bucket/x/*", DurationSeconds=3600)
    [keys] = registry.mints
    assert keys.lifetime == pytest.approx(30, abs=0.01)
    assert keys.expiration == reply["Credentials"]["Expiration"]


def test_no_matching_grant_is_access_denied(
    control_plane: FakeControlPlane, registry: KeyRegistry
) -> None:
    control_plane.grants = ["s3://bucket/granted/*"]
    with pytest.raises(ClientError) as exc:
        data_access(control_plane, "s3://bucket/elsewhere/*")
    assert error_of(exc) == (
        403,
        "AccessDenied",
        "You do not have permission to perform this action. No matching grant found.",
    )
    assert [call.status for call in control_plane.data_access_calls] == [403]
    assert registry.mints == []


def test_wrong_account_id_is_access_denied(control_plane: FakeControlPlane) -> None:
    with pytest.raises(ClientError) as exc:
        s3control(control_plane).get_data_access(
            AccountId="999999999999", Target="s3://bucket/x/*", Permission="READ"
        )
    assert error_of(exc)[:2] == (403, "AccessDenied")


def test_wrong_long_term_key_is_refused(control_plane: FakeControlPlane) -> None:
    with pytest.raises(ClientError) as exc:
        s3control(control_plane, access_key_id="AKIAWRONGWRONGWRONG0").get_data_access(
            AccountId=ACCOUNT_ID, Target="s3://bucket/x/*", Permission="READ"
        )
    assert error_of(exc)[:2] == (403, "InvalidAccessKeyId")
    with pytest.raises(ClientError) as exc:
        sts(control_plane, access_key_id="AKIAWRONGWRONGWRONG0").assume_role(
            RoleArn=ROLE_ARN, RoleSessionName="upload"
        )
    assert error_of(exc) == (
        403,
        "InvalidClientTokenId",
        "The security token included in the request is invalid.",
    )
    assert control_plane.registry.mints == []


# -- the proxy -----------------------------------------------------------------------------


def test_data_access_keys_work_through_the_proxy(
    control_plane: FakeControlPlane, proxy: AuthProxy, bucket: str, s3_client: Any
) -> None:
    control_plane.grants = [f"s3://{bucket}/cpg0001/*"]
    s3 = s3_via(proxy, data_access(control_plane, f"s3://{bucket}/cpg0001/*")["Credentials"])
    small = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="cpg0001/small.bin", Body=small)
    # A file-like body makes botocore send "Expect: 100-continue".
    s3.put_object(Bucket=bucket, Key="cpg0001/stream.bin", Body=io.BytesIO(small[:1000]))

    assert s3.get_object(Bucket=bucket, Key="cpg0001/small.bin")["Body"].read() == small
    assert s3.head_object(Bucket=bucket, Key="cpg0001/small.bin")["ContentLength"] == len(small)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="cpg0001/")
    assert [o["Key"] for o in listing["Contents"]] == ["cpg0001/small.bin", "cpg0001/stream.bin"]
    # Really stored upstream (read directly from moto with the long-term key).
    stored = s3_client.get_object(Bucket=bucket, Key="cpg0001/stream.bin")["Body"].read()
    assert stored == small[:1000]
    with pytest.raises(ClientError) as exc:
        s3.head_object(Bucket=bucket, Key="cpg0001/missing")
    assert error_of(exc)[:2] == (404, "404")  # upstream errors are relayed
    assert proxy.rejections == {}
    assert proxy.forwarded == 6


@pytest.mark.parametrize(
    ("permission", "reads", "writes"),
    [("READ", True, False), ("WRITE", False, True), ("READWRITE", True, True)],
)
def test_a_grants_permission_decides_what_its_keys_may_do(
    control_plane: FakeControlPlane,
    proxy: AuthProxy,
    bucket: str,
    s3_client: Any,
    permission: str,
    reads: bool,
    writes: bool,
) -> None:
    control_plane.grants = [f"s3://{bucket}/cpg0001/*"]
    s3_client.put_object(Bucket=bucket, Key="cpg0001/there.bin", Body=b"there")
    keys = data_access(control_plane, f"s3://{bucket}/cpg0001/*", permission)["Credentials"]
    s3 = s3_via(proxy, keys)

    def allowed(call: Any) -> bool:
        try:
            call()
        except ClientError as exc:
            status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
            assert (status, exc.response["Error"]["Code"]) == (403, "AccessDenied")
            return False
        return True

    assert allowed(lambda: s3.list_objects_v2(Bucket=bucket, Prefix="cpg0001/")) is reads
    assert allowed(lambda: s3.get_object(Bucket=bucket, Key="cpg0001/there.bin")) is reads
    assert allowed(lambda: s3.put_object(Bucket=bucket, Key="cpg0001/new.bin", Body=b"x")) is (
        writes
    )
    assert allowed(lambda: s3.delete_object(Bucket=bucket, Key="cpg0001/there.bin")) is writes


def test_multipart_upload_through_the_proxy(
    control_plane: FakeControlPlane, proxy: AuthProxy, s3_server: S3Server, bucket: str
) -> None:
    s3 = s3_via(proxy, data_access(control_plane, f"s3://{bucket}/mp/*")["Credentials"])
    parts_data = [os.urandom(5 * MiB), os.urandom(12345)]
    mark = s3_server.mark()
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="mp/big.bin")["UploadId"]
    parts = []
    for number, data in enumerate(parts_data, start=1):
        reply = s3.upload_part(
            Bucket=bucket, Key="mp/big.bin", UploadId=upload_id, PartNumber=number, Body=data
        )
        parts.append({"PartNumber": number, "ETag": reply["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket, Key="mp/big.bin", UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    assert s3.get_object(Bucket=bucket, Key="mp/big.bin")["Body"].read() == b"".join(parts_data)
    assert len(s3_server.upload_part_requests(bucket, "mp/big.bin", since=mark)) == 2


def test_expired_keys_are_refused(
    control_plane: FakeControlPlane, registry: KeyRegistry, proxy: AuthProxy, bucket: str
) -> None:
    registry.lifetime = 1.5
    credentials = data_access(control_plane, f"s3://{bucket}/*", DurationSeconds=900)["Credentials"]
    s3 = s3_via(proxy, credentials)
    s3.put_object(Bucket=bucket, Key="before", Body=b"ok")

    delay = (credentials["Expiration"] - datetime.now(timezone.utc)).total_seconds()
    assert 0 < delay <= 1.5
    time.sleep(delay + 0.1)
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="after", Body=io.BytesIO(os.urandom(2 * MiB)))
    assert error_of(exc) == (400, "ExpiredToken", "The provided token has expired.")
    with pytest.raises(ClientError) as exc:
        s3.head_object(Bucket=bucket, Key="before")
    assert error_of(exc)[:2] == (400, "400")  # HEAD errors have no body, as in S3
    # botocore follows a HeadObject 400 with a HeadBucket to look for a region redirect.
    assert set(proxy.rejections) == {"ExpiredToken"} and proxy.rejections["ExpiredToken"] >= 2

    # Renewed keys work again.
    s3 = s3_via(proxy, data_access(control_plane, f"s3://{bucket}/*")["Credentials"])
    assert s3.get_object(Bucket=bucket, Key="before")["Body"].read() == b"ok"


def test_unknown_and_mismatched_keys_are_refused(
    registry: KeyRegistry, proxy: AuthProxy, bucket: str
) -> None:
    unknown = {"aws_access_key_id": "ASIAUNKNOWNUNKNOWN00", "aws_secret_access_key": "x"}
    with pytest.raises(ClientError) as exc:
        s3_via(proxy, {**unknown, "aws_session_token": "t"}).get_object(Bucket=bucket, Key="k")
    assert error_of(exc) == (
        403,
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    )

    keys = registry.mint(600)
    wrong_token = {**keys.client_kwargs(), "aws_session_token": "not-the-token"}
    with pytest.raises(ClientError) as exc:
        s3_via(proxy, wrong_token).put_object(Bucket=bucket, Key="k", Body=b"x")
    assert error_of(exc)[:2] == (400, "InvalidToken")

    unsigned = boto3.client(
        "s3",
        endpoint_url=proxy.endpoint_url,
        region_name=REGION,
        config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
    )
    with pytest.raises(ClientError) as exc:
        unsigned.get_object(Bucket=bucket, Key="k")
    assert error_of(exc)[:2] == (403, "AccessDenied")
    assert proxy.rejections == {"InvalidAccessKeyId": 1, "InvalidToken": 1, "AccessDenied": 1}
    assert proxy.forwarded == 0


def test_presigned_chunked_put_and_connection_close(
    registry: KeyRegistry, proxy: AuthProxy, bucket: str, s3_client: Any
) -> None:
    keys = registry.mint(600)
    url = s3_via(proxy, keys.client_kwargs()).generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "chunked.bin"}
    )
    data = os.urandom(300_000)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        path = url.split(str(proxy.port), 1)[1]
        pieces = iter([data[:100_000], data[100_000:]])
        conn.request("PUT", path, body=pieces, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
        conn.request("GET", "/", headers={"Connection": "close"})  # unsigned: refused
        response = conn.getresponse()
        assert (response.status, response.getheader("Connection")) == (403, "close")
        assert b"<Code>AccessDenied</Code>" in response.read()
    finally:
        conn.close()
    assert s3_client.get_object(Bucket=bucket, Key="chunked.bin")["Body"].read() == data


def test_stop_closes_idle_keep_alive_connections(
    registry: KeyRegistry, s3_server: S3Server
) -> None:
    proxy = AuthProxy(s3_server.endpoint_url, registry).start()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()  # the connection stays open (keep-alive)
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 2
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("GET", "/")
            conn.getresponse()
    finally:
        conn.close()
        proxy.stop()


# -- STS AssumeRole ------------------------------------------------------------------------


def test_assume_role_keys_work_through_the_proxy(
    control_plane: FakeControlPlane, registry: KeyRegistry, proxy: AuthProxy, bucket: str
) -> None:
    registry.lifetime = 120
    reply = sts(control_plane).assume_role(
        RoleArn=ROLE_ARN, RoleSessionName="cpg-daemon", DurationSeconds=900
    )
    assert reply["AssumedRoleUser"]["Arn"] == (
        f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/cpg-uploader/cpg-daemon"
    )
    assert reply["AssumedRoleUser"]["AssumedRoleId"].endswith(":cpg-daemon")
    credentials = reply["Credentials"]
    [keys] = registry.mints
    assert keys.access_key_id == credentials["AccessKeyId"]
    assert keys.expiration == credentials["Expiration"]
    assert keys.lifetime == pytest.approx(120, abs=0.01)

    s3 = s3_via(proxy, credentials)
    s3.put_object(Bucket=bucket, Key="sts.bin", Body=b"assumed")
    assert s3.get_object(Bucket=bucket, Key="sts.bin")["Body"].read() == b"assumed"

    [call] = control_plane.assume_role_calls
    assert (call.role_arn, call.role_session_name, call.duration_seconds, call.status) == (
        ROLE_ARN,
        "cpg-daemon",
        900,
        200,
    )
    assert call.caller_access_key_id == "testing"


def test_assume_role_on_another_role_is_denied(control_plane: FakeControlPlane) -> None:
    control_plane.allowed_role_arns = {ROLE_ARN}
    with pytest.raises(ClientError) as exc:
        sts(control_plane).assume_role(
            RoleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/admin", RoleSessionName="x1"
        )
    status, code, message = error_of(exc)
    assert (status, code) == (403, "AccessDenied")
    assert "sts:AssumeRole" in message


# -- outages -------------------------------------------------------------------------------


def test_down_control_plane_drops_connections(
    control_plane: FakeControlPlane, registry: KeyRegistry
) -> None:
    registry.down = True
    with pytest.raises(ConnectionClosedError):
        data_access(control_plane, "s3://bucket/x/*")
    with pytest.raises(ConnectionClosedError):
        sts(control_plane).assume_role(RoleArn=ROLE_ARN, RoleSessionName="down")
    assert control_plane.data_access_calls == [] and control_plane.assume_role_calls == []

    registry.down = False
    assert data_access(control_plane, "s3://bucket/x/*")["Credentials"]["AccessKeyId"]


def test_fail_with_makes_the_control_plane_answer_errors(
    control_plane: FakeControlPlane, registry: KeyRegistry
) -> None:
    registry.fail_with = (503, "ServiceUnavailable", "Please try again.")
    with pytest.raises(ClientError) as exc:
        data_access(control_plane, "s3://bucket/x/*")
    assert error_of(exc) == (503, "ServiceUnavailable", "Please try again.")
    with pytest.raises(ClientError) as exc:
        sts(control_plane).assume_role(RoleArn=ROLE_ARN, RoleSessionName="fail")
    assert error_of(exc) == (503, "ServiceUnavailable", "Please try again.")
    assert registry.mints == []

    registry.fail_with = None
    assert sts(control_plane).assume_role(RoleArn=ROLE_ARN, RoleSessionName="ok")["Credentials"]


# -- aiobotocore (aiohttp) ------------------------------------------------------------------


def _load_models(session: Any) -> None:
    """Parse botocore's model files off the event loop (see cpg_daemon.s3.store)."""
    loader = session.get_component("data_loader")
    for service in ("s3", "s3control"):
        for kind in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model(service, kind)
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        loader.load_data(name)


@pytest.mark.anyio
async def test_aiobotocore_through_the_fakes(
    control_plane: FakeControlPlane, registry: KeyRegistry, proxy: AuthProxy, bucket: str
) -> None:
    session = aiobotocore.session.get_session()
    await anyio.to_thread.run_sync(_load_models, session)
    async with session.create_client(
        "s3control",
        endpoint_url=control_plane.endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    ) as control:
        route_s3control_to_endpoint(control)
        reply = await control.get_data_access(
            AccountId=ACCOUNT_ID, Target=f"s3://{bucket}/*", Permission="READWRITE"
        )
    credentials = reply["Credentials"]
    keys = MintedKeys(
        access_key_id=credentials["AccessKeyId"],
        secret_access_key=credentials["SecretAccessKey"],
        session_token=credentials["SessionToken"],
        expiration=credentials["Expiration"],
        issued_at=datetime.now(timezone.utc),
    )
    body = os.urandom(6 * MiB)
    async with session.create_client(
        "s3",
        endpoint_url=proxy.endpoint_url,
        region_name=REGION,
        config=aiobotocore.config.AioConfig(s3={"addressing_style": "path"}, retries=ONE_ATTEMPT),
        **keys.client_kwargs(),
    ) as s3:
        for round_ in range(3):  # reuses pooled keep-alive connections
            await s3.put_object(Bucket=bucket, Key=f"async-{round_}", Body=body)
            head = await s3.head_object(Bucket=bucket, Key=f"async-{round_}")
            assert head["ContentLength"] == len(body)
            reply = await s3.get_object(Bucket=bucket, Key=f"async-{round_}")
            async with reply["Body"] as stream:
                assert await stream.read() == body

        async def put(index: int) -> None:
            await s3.put_object(Bucket=bucket, Key=f"many/{index}", Body=body[:100_000])

        async with anyio.create_task_group() as tg:  # more connections than the pool holds
            for index in range(24):
                tg.start_soon(put, index)
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix="many/")
        assert listing["KeyCount"] == 24

        registry.expire(keys.access_key_id)
        with pytest.raises(ClientError) as exc:
            await s3.put_object(Bucket=bucket, Key="expired", Body=body)
        assert exc.value.response["Error"]["Code"] == "ExpiredToken"
        with pytest.raises(ClientError) as exc:
            await s3.head_object(Bucket=bucket, Key="async-0")
        assert exc.value.response["Error"]["Code"] == "400"
    assert set(proxy.rejections) == {"ExpiredToken"} and proxy.rejections["ExpiredToken"] >= 2
    assert proxy.forwarded == 9 + 24 + 1
