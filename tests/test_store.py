"""The S3 adapter's own settings, on a real local S3 server."""

from __future__ import annotations

import json
from typing import Any

import aioboto3
import pytest
from s3server import S3Server

from cpg_daemon.core.config import S3Config
from cpg_daemon.s3.store import ObjectStore, unreferenced_endpoint_parameters


def test_the_endpoint_rule_set_never_refers_to_the_object_key() -> None:
    session = aioboto3.Session()
    assert "Key" in unreferenced_endpoint_parameters(session)
    loader = session._session.get_component("data_loader")
    ruleset = json.dumps(loader.load_service_model("s3", "endpoint-rule-set-1"))
    assert json.dumps({"ref": "Bucket"}) in ruleset  # the check would see a reference


@pytest.mark.anyio
async def test_endpoints_are_resolved_once_per_bucket_not_per_object(
    s3_server: S3Server, bucket: str
) -> None:
    # botocore's own path (the CRT data plane resolves once per bucket by construction).
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="botocore")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        client: Any = store._client
        resolve = client._ruleset_resolver._provider.resolve_endpoint
        before = resolve.cache_info()  # botocore's LRU cache (process-wide)
        for i in range(20):
            await store.put_object(bucket, f"k/{i}", b"x", "")
            assert await store.head(bucket, f"k/{i}") is not None
        after = resolve.cache_info()
    # 40 requests, two operations, one bucket: a couple of evaluations, then cache hits
    # (each evaluation of S3's rule set costs about 1 ms of CPU).
    assert after.misses - before.misses <= 4, (before, after)
    assert after.hits - before.hits >= 36, (before, after)
