"""``cpg-daemon check-dataset``: list a dataset, on S3 or on disk, and analyse it.

The analysis is ``core.dataset.analyse``, a pure function of the listing; this module
lists. A bucket prefix of hundreds of thousands of objects is listed the way the
gallery lays it out: level by level with ``Delimiter="/"`` (sources, areas, batches,
plates: few objects, many folders) down to the plate folders, which are then listed
whole, at most ``concurrency`` requests in flight. One ListObjectsV2 of the whole
prefix would be a thousand objects per request, one request after another. A local
folder is walked as ``upload`` would walk it (``discovery.scan``, regular files only,
the default excludes), in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import aioboto3
import anyio
import anyio.abc
import anyio.to_thread

from cpg_daemon.core.config import DEFAULT_EXCLUDE, CredentialsConfig, S3Config
from cpg_daemon.core.dataset import DatasetReport, analyse
from cpg_daemon.core.errors import CredentialsError
from cpg_daemon.core.objectkeys import PathFilter, S3Location
from cpg_daemon.core.structure import AREAS
from cpg_daemon.discovery.scan import walk
from cpg_daemon.s3.credentials import RenewingProvider, make_provider
from cpg_daemon.s3.store import ObjectStore, Storage

PLATE_DEPTH = 4
"""Folders below a source down to a plate folder: images/<batch>/images/<plate>/,
workspace/<folder>/<batch>/<plate>/. Folders down to there are listed one level at a
time, the folders found there each as a whole."""

DEFAULT_CONCURRENCY = 32
"""Listings in flight at once."""


@dataclass(frozen=True)
class Listing:
    """Objects below a target, as (path relative to the target, size)."""

    entries: list[tuple[str, int]]
    requests: int
    """Listings started (one per folder listed; each may be several pages)."""
    seconds: float


@dataclass(frozen=True)
class Checked:
    report: DatasetReport
    listing: Listing


async def list_prefix(
    store: Storage,
    location: S3Location,
    *,
    depth: int,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Listing:
    """Every object below ``location``: ``depth`` levels of folders one level at a time,
    then each folder found there whole; every listing waits for one of ``concurrency``
    slots (the tasks are one per folder, the requests in flight at most that many)."""
    started = time.monotonic()
    bucket, top = location.bucket, location.prefix
    entries: list[tuple[str, int]] = []
    requests = 0
    slots = anyio.CapacityLimiter(concurrency)

    async def whole(prefix: str) -> None:
        nonlocal requests
        async with slots:
            requests += 1
            async for obj in store.list_objects(bucket, prefix):
                entries.append((obj.key[len(top) :], obj.size))

    async def level(prefix: str, below: int, tg: anyio.abc.TaskGroup) -> None:
        nonlocal requests
        async with slots:
            requests += 1
            found = await store.list_level(bucket, prefix)
        entries.extend((obj.key[len(top) :], obj.size) for obj in found.objects)
        for folder in found.folders:
            if below + 1 < depth:
                tg.start_soon(level, folder, below + 1, tg)
            else:
                tg.start_soon(whole, folder)

    async with anyio.create_task_group() as tg:
        if depth > 0:
            tg.start_soon(level, top, 0, tg)
        else:
            tg.start_soon(whole, top)
    entries.sort()
    return Listing(entries, requests, time.monotonic() - started)


def list_folder(root: Path) -> Listing:
    """Every file below a local folder that ``upload`` would send (blocking: a thread)."""
    started = time.monotonic()
    files = walk(root, PathFilter(("**",), DEFAULT_EXCLUDE))
    entries = [(seen.rel_path, seen.size) for seen in files]
    return Listing(entries, 0, time.monotonic() - started)


def is_source_folder(root: Path) -> bool:
    """Whether a local folder is a source (it has images/, workspace/ or workspace_dl/)
    rather than a project (whose folders are sources). Blocking."""
    return any((root / area).is_dir() for area in AREAS)


@asynccontextmanager
async def open_store(
    s3: S3Config,
    credentials: CredentialsConfig | None,
    state_dir: Path | None = None,
    *,
    reads: bool = False,
) -> AsyncIterator[Storage]:
    """A store that lists with these keys (``None``: unsigned requests, no keys at all;
    ``state_dir``: where handed-over keys are kept).

    Keys an entry renews itself (Access Grants, a role) are obtained first; the listing
    takes minutes at most, well inside their lifetime. Only botocore is needed to list;
    ``reads``: objects are read too (an S3 SRC), through the configured data plane (the
    CRT's, by default: a fraction of the CPU per object).
    """
    if not reads:
        s3 = replace(s3, data_plane="botocore")
    if credentials is None:
        # Dummy static keys, never sent: they spare botocore's search of the chain
        # (and its wait for an instance-metadata service that is not there).
        session = aioboto3.Session(
            aws_access_key_id="unsigned", aws_secret_access_key="unsigned", region_name=s3.region
        )
        async with ObjectStore.connect(session, s3, unsigned=True) as store:
            yield store
        return
    provider = await anyio.to_thread.run_sync(make_provider, credentials, s3.region, state_dir)
    if isinstance(provider, RenewingProvider) and not await provider.renew_now():
        stats = provider.statistics()
        raise CredentialsError(f"credentials {stats.target}: {stats.last_error}")
    async with ObjectStore.connect(provider.session, s3) as store:
        yield store


async def check_s3(
    location: S3Location,
    s3: S3Config,
    credentials: CredentialsConfig | None,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    state_dir: Path | None = None,
) -> Checked:
    """List ``s3://bucket/<project>/[<source>/]`` and analyse it."""
    project, _, rest = location.prefix.partition("/")
    source = rest.rstrip("/") or None
    s3 = replace(s3, max_concurrency=concurrency)  # the client's connection pool
    async with open_store(s3, credentials, state_dir) as store:
        listing = await list_prefix(
            store,
            location,
            depth=PLATE_DEPTH + (1 if source is None else 0),
            concurrency=concurrency,
        )
    # 100,000 keys are a few tenths of a second of CPU: not on the event loop.
    report = await anyio.to_thread.run_sync(
        partial(analyse, listing.entries, project=project, source=source)
    )
    return Checked(report, listing)


def check_folder(root: Path) -> Checked:
    """Walk a local project or source folder and analyse it (blocking: a thread).

    A source folder's project is its parent folder's name; the project-name rule is
    left out, as a local folder's name need not be the destination's.
    """
    listing = list_folder(root)
    if is_source_folder(root):
        project, source = root.absolute().parent.name, root.name
    else:
        project, source = root.absolute().name, None
    report = analyse(listing.entries, project=project, source=source, check_project_name=False)
    return Checked(report, listing)
