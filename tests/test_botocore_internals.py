"""Every private botocore/aiobotocore/aioboto3 access of cpg_daemon/s3/_botocore.py, exercised.

The daemon reaches into these libraries' internals in that one module only. An upgrade
that renames or removes one of them must fail here, by name, rather than in an upload
(several of them degrade silently by design: the endpoint-parameter trim does nothing,
the client is built on the loop). pyproject.toml allows ``aioboto3>=13.0,<16``, which
pins aiobotocore and botocore; these tests run against whatever is installed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from typing import Any

import aioboto3
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from s3server import S3Server

from cpg_daemon.core.errors import CredentialsError
from cpg_daemon.s3 import _botocore
from cpg_daemon.s3.store import ObjectStore, client_config, unreferenced_endpoint_parameters

TEST_REGION = "us-east-1"


def test_the_installed_versions_are_the_supported_ones() -> None:
    major = int(version("aioboto3").split(".")[0])
    assert 13 <= major < 16, "pyproject.toml allows aioboto3>=13.0,<16"


def test_the_s3_models_are_preloaded_into_the_sessions_loader() -> None:
    session = aioboto3.Session()
    _botocore.preload_models(session, "s3")
    loader = _botocore._data_loader(session)
    # botocore's loader caches by call: a second load is served from memory.
    assert loader.load_service_model("s3", "service-2") is loader.load_service_model(
        "s3", "service-2"
    )


def test_sessions_of_one_process_share_the_parsed_models() -> None:
    first, second = aioboto3.Session(), aioboto3.Session(region_name="eu-west-1")
    _botocore.preload_models(first, "s3")
    _botocore.preload_models(second, "s3")
    # The second session's client is built from the first's parsed model, not a new parse.
    model = _botocore._core(second).get_component("data_loader").load_service_model
    assert model("s3", "service-2") is _botocore._data_loader(first).load_service_model(
        "s3", "service-2"
    )


def test_the_endpoint_rule_set_is_read_and_never_refers_to_the_object_key() -> None:
    session = aioboto3.Session()
    ruleset = _botocore.s3_endpoint_ruleset(session)
    assert "parameters" in ruleset and "Key" in ruleset["parameters"]
    assert json.dumps({"ref": "Bucket"}) in json.dumps(ruleset)  # the check sees references
    assert "Key" in unreferenced_endpoint_parameters(session)


def test_the_ca_bundle_comes_from_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert _botocore.ca_bundle(aioboto3.Session()) is None
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/extra.pem")
    assert _botocore.ca_bundle(aioboto3.Session()) == "/etc/ssl/extra.pem"


@pytest.mark.anyio
@pytest.mark.parametrize("service", ["s3", "sts", "s3control"])
async def test_the_client_is_built_off_the_loop(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    original = _botocore._finish_without_a_loop

    def spy(coroutine: Any) -> Any:
        client = original(coroutine)  # raises _NeedsTheLoop if it wanted to wait for I/O
        built.append(client)
        return client

    monkeypatch.setattr(_botocore, "_finish_without_a_loop", spy)
    async with _botocore.client(
        aioboto3.Session(), service, region_name=TEST_REGION, endpoint_url="http://127.0.0.1:9"
    ) as client:
        assert built == [client]
        assert client.meta.region_name == TEST_REGION


@pytest.mark.anyio
async def test_without_credentials_the_client_is_built_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with _botocore.client(
        aioboto3.Session(), "s3", region_name=TEST_REGION, endpoint_url="http://127.0.0.1:9"
    ) as client:
        assert _botocore.signing_credentials(client) is None


@pytest.mark.anyio
async def test_endpoint_parameters_are_left_out_and_endpoints_resolved(
    s3_server: S3Server, bucket: str
) -> None:
    from cpg_daemon.core.config import S3Config

    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="botocore")
    session = aioboto3.Session()
    async with _botocore.client(
        session,
        "s3",
        region_name=TEST_REGION,
        endpoint_url=s3.endpoint_url,
        config=client_config(s3),
    ) as client:
        definitions = client._ruleset_resolver._param_definitions
        assert "Key" in definitions
        _botocore.leave_out_endpoint_parameters(client, ("Key",))
        assert "Key" not in definitions
        url, properties = await _botocore.bucket_endpoint(client, bucket)
        assert url == f"{s3_server.endpoint_url}/{bucket}"
        assert properties["authSchemes"][0]["signingRegion"] == TEST_REGION
        before = _botocore.endpoint_cache_info(client)
        await _botocore.bucket_endpoint(client, bucket)
        assert _botocore.endpoint_cache_info(client).hits > before.hits


@pytest.mark.anyio
async def test_the_signing_credentials_are_the_clients() -> None:
    async with _botocore.client(aioboto3.Session(), "s3", region_name=TEST_REGION) as client:
        credentials = _botocore.signing_credentials(client)
        assert credentials is not None
        frozen = await credentials.get_frozen_credentials()
        assert frozen.access_key == "testing"


def renewable(fetch: Callable[[], Awaitable[dict[str, str]]]) -> Any:
    """Refreshable credentials that start expired, as the renewing provider makes them."""
    return _botocore.RenewableCredentials(
        access_key="",
        secret_key="",
        token="",
        expiry_time=datetime(1970, 1, 1, tzinfo=timezone.utc),
        refresh_using=fetch,
        method="test",
    )


@pytest.mark.anyio
async def test_shared_renewable_credentials_reach_every_client_and_renew_on_demand() -> None:
    fetched: list[int] = []

    async def fetch() -> dict[str, str]:
        fetched.append(1)
        expiry = datetime.now(timezone.utc) + timedelta(hours=1)
        return {
            "access_key": f"AKID{len(fetched)}",
            "secret_key": "secret",
            "token": "token",
            "expiry_time": expiry.isoformat(),
        }

    credentials = renewable(fetch)
    assert isinstance(credentials, AioRefreshableCredentials)
    session = aioboto3.Session(region_name=TEST_REGION)
    _botocore.share_credentials(session, credentials)
    async with _botocore.client(session, "s3") as one, _botocore.client(session, "s3") as two:
        assert _botocore.signing_credentials(one) is credentials
        assert _botocore.signing_credentials(two) is credentials
        await credentials.renew()
        await credentials.renew()  # on demand, although the keys are fresh
        assert len(fetched) == 2
        assert (await credentials.get_frozen_credentials()).access_key == "AKID2"


@pytest.mark.anyio
async def test_a_renewal_that_brings_expired_keys_is_a_credentials_error() -> None:
    async def fetch() -> dict[str, str]:
        expired = datetime.now(timezone.utc) - timedelta(minutes=5)
        return {
            "access_key": "a",
            "secret_key": "s",
            "token": "t",
            "expiry_time": expired.isoformat(),
        }

    credentials = renewable(fetch)
    with pytest.raises(CredentialsError):
        await credentials.renew()


@pytest.mark.anyio
async def test_a_store_connects_through_these_functions(s3_server: S3Server, bucket: str) -> None:
    from cpg_daemon.core.config import S3Config

    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="crt")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        await store.put_object(bucket, "k", b"x", "")
        assert await store.head(bucket, "k") is not None


def test_a_factory_that_waits_or_looks_for_the_loop_is_refused_in_the_thread() -> None:
    async def waits() -> None:
        await asyncio.sleep(0)

    async def looks() -> None:
        asyncio.get_running_loop()

    for factory in (waits(), looks()):
        with pytest.raises(_botocore._NeedsTheLoop):
            _botocore._finish_without_a_loop(factory)


@pytest.mark.anyio
async def test_then_the_client_is_built_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(coroutine: Any) -> Any:
        coroutine.close()
        raise _botocore._NeedsTheLoop

    monkeypatch.setattr(_botocore, "_finish_without_a_loop", refuse)
    async with _botocore.client(aioboto3.Session(), "s3", region_name=TEST_REGION) as client:
        assert _botocore.signing_credentials(client) is not None
