"""Helpers for tests that assemble part of the pipeline by hand (scheduler, batches)."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from contextlib import closing
from pathlib import Path

import anyio

from cpg_daemon.core.config import CredentialsConfig, WatchConfig
from cpg_daemon.engine.grants import Grant
from cpg_daemon.engine.watches import ActiveWatch, WatchTable
from cpg_daemon.s3.credentials import CredentialProvider
from cpg_daemon.s3.store import ObjectStore

STANDARD_CHAIN = CredentialProvider(CredentialsConfig(), "us-east-1")
"""Keys that are never renewed, made once (reading the environment is no work for a loop)."""


def table_of(
    watches: Mapping[str, WatchConfig], stores: Mapping[str, ObjectStore]
) -> Callable[[], WatchTable]:
    """The watch table a scheduler reads: each watch with a grant around its store."""
    grants = {store: Grant.borrowed(store, STANDARD_CHAIN) for store in stores.values()}
    table = WatchTable(
        tuple(ActiveWatch(config, grants[stores[name]]) for name, config in watches.items())
    )
    return lambda: table


def configs_of(*watches: WatchConfig) -> Callable[[], Mapping[str, WatchConfig]]:
    """The watches a batch tracker reads, by name."""
    by_name = {w.name: w for w in watches}
    return lambda: by_name


async def until(condition: Callable[[], bool | Awaitable[bool]], seconds: float = 10.0) -> None:
    """Wait in real time (worker threads, the journal's thread or another process do the
    work) until ``condition`` holds; ``TimeoutError`` after ``seconds``."""
    with anyio.fail_after(seconds):
        while True:
            held = condition()
            if not isinstance(held, bool):
                held = await held
            if held:
                return
            await anyio.sleep(0.002)


def assert_counts_agree(path: Path) -> None:
    """The journal's ``counts`` (kept by triggers) say what counting ``files`` says."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        kept = db.execute(
            "SELECT watch, state, files, bytes FROM counts WHERE files != 0 OR bytes != 0"
        ).fetchall()
        counted = db.execute(
            "SELECT watch, state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY watch, state"
        ).fetchall()
    assert sorted(kept) == sorted(counted)
