"""Grants: which keys and client each watch uses, and the end of a grant a reload drops."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anyio
import pytest
from s3server import S3Server

from cpg_daemon.core.config import Config, CredentialsConfig, S3Config, WatchConfig
from cpg_daemon.core.errors import ConfigError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.grants import Grants, assign

pytestmark = pytest.mark.anyio

A = CredentialsConfig(target="s3://bkt/a/*")
A_DEEPER = CredentialsConfig(target="s3://bkt/a/deeper/*")
B = CredentialsConfig(target="s3://bkt/b/*")


def _config(*credentials: CredentialsConfig, s3: S3Config | None = None) -> Config:
    watches = (
        WatchConfig("wa", Path("/data/a"), S3Location("bkt", "a/x/")),
        WatchConfig("wdeep", Path("/data/d"), S3Location("bkt", "a/deeper/y/")),
        WatchConfig("wb", Path("/data/b"), S3Location("bkt", "b/")),
    )
    return Config(
        path=Path("/c.toml"), s3=s3 or S3Config(), credentials=credentials, watches=watches
    )


def test_each_watch_gets_the_most_specific_covering_entry() -> None:
    assignment = assign(_config(A, A_DEEPER, B))
    assert {name: p.config for name, p in assignment.by_watch.items()} == {
        "wa": A,
        "wdeep": A_DEEPER,
        "wb": B,
    }


def test_a_watch_no_entry_covers_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"watch\[2\]\.destination.*no \[credentials\] target"):
        assign(_config(A, A_DEEPER))


def test_manifests_the_watch_keys_cannot_write_are_a_config_error_naming_the_fix() -> None:
    """upload_manifest sends to <project>/<source>/workspace/qc/upload_manifests/ with the
    watch's own keys: a target below the source cannot cover it, and every manifest would
    be refused, so the daemon does not start that way."""
    deep = CredentialsConfig(target="s3://bkt/cpg0001-x/broad/images/*")
    wide = CredentialsConfig(target="s3://bkt/cpg0001-x/*")
    watch = WatchConfig(
        "w", Path("/data/w"), S3Location("bkt", "cpg0001-x/broad/images/"), upload_manifest=True
    )
    refused = Config(path=Path("/c.toml"), credentials=(deep,), watches=(watch,))
    with pytest.raises(ConfigError) as excinfo:
        assign(refused)
    assert excinfo.value.key == "watch[0].upload_manifest"
    assert "s3://bkt/cpg0001-x/broad/workspace/qc/upload_manifests/" in excinfo.value.problem
    assert "s3://bkt/cpg0001-x/broad/images/*" in excinfo.value.problem
    assert "upload_manifest = false" in excinfo.value.problem
    # The target the gallery's guide asks for (the project) covers it; so does no target.
    assert assign(dataclasses.replace(refused, credentials=(wide,))).by_watch["w"].config == wide
    assert assign(dataclasses.replace(refused, credentials=(CredentialsConfig(),))).by_watch
    # Without upload_manifest the deep target is all the watch needs.
    off = dataclasses.replace(watch, upload_manifest=False)
    assert assign(dataclasses.replace(refused, watches=(off,))).by_watch["w"].config == deep


def test_a_reload_keeps_the_providers_of_unchanged_entries() -> None:
    first = assign(_config(A, B))
    again = assign(_config(A, A_DEEPER, B), first.providers)
    assert again.providers[0] is first.providers[0]
    assert again.providers[2] is first.providers[1]
    assert again.providers[1] not in first.providers


async def test_a_dropped_grant_closes_its_client_after_its_last_lease(
    s3_server: S3Server, bucket: str
) -> None:
    config = _config(A, B, s3=S3Config(endpoint_url=s3_server.endpoint_url))
    first = await anyio.to_thread.run_sync(assign, config)
    async with Grants.open(config, first) as grants:
        table = grants.table(config, first)
        assert table["wa"].grant is table["wdeep"].grant  # one client per entry
        kept, old_b = table["wa"].grant, table["wb"].grant
        assert kept is not old_b
        # A reload drops B's entry and its watch, while a file of wb is in flight.
        reloaded = dataclasses.replace(config, credentials=(A,), watches=config.watches[:2])
        retired = anyio.Event()

        async def retire() -> None:
            await old_b.retire()
            retired.set()

        async with anyio.create_task_group() as tg:
            with old_b.lease() as store:
                assignment = await anyio.to_thread.run_sync(assign, reloaded, grants.providers)
                dropped = await grants.adopt(assignment)
                assert dropped == [old_b]
                tg.start_soon(retire)
                await anyio.sleep(0.2)
                assert not retired.is_set() and not old_b.closed
                assert await store.head(bucket, "missing") is None  # still usable
            with anyio.fail_after(10):
                await retired.wait()
        assert old_b.closed and not kept.closed
        assert list(grants) == [kept]
        assert grants.table(reloaded, assignment)["wa"].grant is kept
    assert kept.closed  # leaving Grants.open closes the rest
