"""The S3 adapter's own settings, on a real local S3 server."""

from __future__ import annotations

import aioboto3
import pytest
from s3server import S3Server

from cpg_daemon.core.config import S3Config
from cpg_daemon.s3 import _botocore
from cpg_daemon.s3.store import ObjectStore

# The rule set's check (it never refers to the object key) is in test_botocore_internals.py.


@pytest.mark.anyio
async def test_endpoints_are_resolved_once_per_bucket_not_per_object(
    s3_server: S3Server, bucket: str
) -> None:
    # botocore's own path (the CRT data plane resolves once per bucket by construction).
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, data_plane="botocore")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        before = _botocore.endpoint_cache_info(store._client)  # botocore's LRU (process-wide)
        for i in range(20):
            await store.put_object(bucket, f"k/{i}", b"x", "")
            assert await store.head(bucket, f"k/{i}") is not None
        after = _botocore.endpoint_cache_info(store._client)
    # 40 requests, two operations, one bucket: a couple of evaluations, then cache hits
    # (each evaluation of S3's rule set costs about 1 ms of CPU).
    assert after.misses - before.misses <= 4, (before, after)
    assert after.hits - before.hits >= 36, (before, after)
