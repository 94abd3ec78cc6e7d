"""Grants: each ``[credentials]`` entry at work, with its keys, its S3 client and their end.

A grant is created once per entry (a reload keeps an unchanged entry's grant, and so
its keys and renewal schedule), owns the S3 client built on its keys and the task that
renews them, and closes both when it is dropped. Uploads take a lease on the grant for
each file, so a grant dropped by a reload closes its client only once the files in
flight with it are done. ``run``, ``upload``, ``verify`` and ``check`` all get their
keys and clients here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from cpg_daemon.core.config import Config, S3Config
from cpg_daemon.core.errors import ConfigError, CpgError, CredentialsError
from cpg_daemon.core.objectkeys import manifest_folder
from cpg_daemon.engine.watches import ActiveWatch, WatchTable
from cpg_daemon.s3.credentials import (
    CredentialProvider,
    HandedOverProvider,
    Keys,
    RenewingProvider,
    build_providers,
    provider_for,
)
from cpg_daemon.s3.store import ObjectStore, Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Assignment:
    """Which provider serves which watch: the part of building grants that can fail."""

    providers: tuple[CredentialProvider, ...]
    by_watch: dict[str, CredentialProvider]


def assign(config: Config, running: Sequence[CredentialProvider] = ()) -> Assignment:
    """One provider per ``[credentials]`` entry, and the one that covers each watch.

    ``running``: the providers of the configuration in use (a reload keeps those whose
    entry did not change). A missing profile or a watch no target covers is a
    ``ConfigError`` naming the key, raised before anything is created.
    """
    providers = build_providers(config, running)
    file = str(config.path) if config.path else "<config>"
    by_watch: dict[str, CredentialProvider] = {}
    for i, watch in enumerate(config.watches):
        provider = provider_for(providers, watch.destination, file, f"watch[{i}].destination")
        if watch.upload_manifest and not provider.covers(manifest_folder(watch.destination)):
            # An error, not a warning: every manifest would be refused, and a warning
            # in an unattended daemon's log is found when the maintainers ask for it.
            raise ConfigError(
                file,
                f"watch[{i}].upload_manifest",
                f"the manifests go to {manifest_folder(watch.destination)}, which the "
                f"target of this watch's keys ({provider.config.target}) does not cover: "
                "widen the target (to s3://BUCKET/cpgNNNN-name/*) or set "
                "upload_manifest = false",
            )
        by_watch[watch.name] = provider
    return Assignment(tuple(providers), by_watch)


Connect = Callable[[CredentialProvider, S3Config], AbstractAsyncContextManager[Storage]]
"""Opens the S3 client of one grant (tests hand in an in-memory store)."""


def connect_store(
    provider: CredentialProvider, s3: S3Config
) -> AbstractAsyncContextManager[Storage]:
    """The real client: an ObjectStore on the provider's keys."""
    return ObjectStore.connect(provider.session, s3)


class Grant:
    """One entry's keys (``provider``) and the S3 client that uses them (``store``)."""

    def __init__(self, provider: CredentialProvider, store: Storage, stack: AsyncExitStack):
        self.provider = provider
        self.store = store
        self._stack = stack
        self._renewal = anyio.CancelScope()
        self._renewing = False
        self._leases = 0
        self._unused = anyio.Event()
        self._unused.set()
        self._closed = False

    @classmethod
    def borrowed(cls, store: Storage, provider: CredentialProvider) -> Grant:
        """A grant around a client its caller opened and closes (tests, benchmarks)."""
        return cls(provider, store, AsyncExitStack())

    @classmethod
    async def open(
        cls, provider: CredentialProvider, s3: S3Config, connect: Connect | None = None
    ) -> Grant:
        """A grant with a client of its own (``connect``: ObjectStore's, unless a test's)."""
        stack = AsyncExitStack()
        store = await stack.enter_async_context((connect or connect_store)(provider, s3))
        return cls(provider, store, stack)

    @property
    def usable(self) -> bool:
        """Whether uploads may use the keys now (a watch with no usable keys is not fed)."""
        return self.provider.usable

    @property
    def target(self) -> str:
        return self.provider.statistics().target

    async def renew_now(self) -> bool:
        """Renew at once (the server refused the keys); whether that worked."""
        return await self.provider.renew_now()

    @contextmanager
    def lease(self) -> Iterator[Storage]:
        """Use the client for one file; a retired grant waits for every lease to end."""
        if self._leases == 0:
            self._unused = anyio.Event()
        self._leases += 1
        try:
            yield self.store
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._unused.set()

    async def renew(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the keys fresh until the grant is retired or the caller is cancelled."""
        self._renewing = True
        with self._renewal:
            await self.provider.run(task_status=task_status)

    @property
    def renewing(self) -> bool:
        return self._renewing

    @property
    def closed(self) -> bool:
        return self._closed

    async def retire(self) -> None:
        """Stop renewing; close the client once the files in flight with it are done."""
        self._renewal.cancel()
        await self._unused.wait()
        await self.close()

    async def close(self) -> None:
        """Close the client now (shielded: it runs on the way out of a cancelled scope)."""
        self._renewal.cancel()
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()


class Grants:
    """Every grant of the running configuration, and the watch table built on them."""

    def __init__(self, s3: S3Config, connect: Connect | None = None) -> None:
        self._s3 = s3
        self._connect = connect
        self._grants: list[Grant] = []
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: Config, assignment: Assignment | None = None, connect: Connect | None = None
    ) -> AsyncIterator[Grants]:
        """Grants for ``config`` (a ``ConfigError`` first if a watch has none); closed after."""
        if assignment is None:  # profiles read, sessions built: off the loop
            assignment = await anyio.to_thread.run_sync(assign, config)
        grants = cls(config.s3, connect)
        try:
            await grants.adopt(assignment)
            yield grants
        finally:
            for grant in grants._grants:
                await grant.close()

    def __iter__(self) -> Iterator[Grant]:
        return iter(self._grants)

    @property
    def providers(self) -> tuple[CredentialProvider, ...]:
        return tuple(g.provider for g in self._grants)

    def on_usable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a grant's keys become usable again (now and later)."""
        self._listeners.append(callback)
        for grant in self._grants:
            grant.provider.on_usable(callback)

    async def adopt(self, assignment: Assignment) -> list[Grant]:
        """Make the assignment's providers the grants in use; returns those dropped.

        A provider already in use keeps its grant (and its client); a new one gets a
        client. The dropped grants are the caller's to ``retire``.
        """
        current = {g.provider: g for g in self._grants}
        kept: list[Grant] = []
        for provider in assignment.providers:
            grant = current.pop(provider, None)
            if grant is None:
                grant = await Grant.open(provider, self._s3, self._connect)
                for callback in self._listeners:
                    provider.on_usable(callback)
            kept.append(grant)
        self._grants = kept
        return list(current.values())

    def table(self, config: Config, assignment: Assignment) -> WatchTable:
        """The watch table: each watch with the grant of the provider that covers it."""
        by_provider = {g.provider: g for g in self._grants}
        return WatchTable(
            tuple(
                ActiveWatch(watch, by_provider[assignment.by_watch[watch.name]])
                for watch in config.watches
            )
        )

    async def start_renewals(self, tg: TaskGroup) -> None:
        """Start renewing the keys of every grant not renewing yet, in ``tg``."""
        for grant in self._grants:
            if not grant.renewing:
                await tg.start(grant.renew)

    async def obtain(self) -> None:
        """Renew each renewing grant's keys now (``verify``, ``check``); raise if one fails."""
        for grant in self._grants:
            if isinstance(grant.provider, RenewingProvider) and not await grant.renew_now():
                stats = grant.provider.statistics()
                raise CredentialsError(f"credentials {stats.target}: {stats.last_error}")

    async def first_keys(self) -> None:
        """After ``start_renewals``: wait for each grant's first attempt; raise if it failed."""
        for grant in self._grants:
            if not await grant.provider.first_attempt():
                raise CredentialsError(grant.provider.statistics().last_error or "no credentials")


@dataclass(frozen=True)
class HandOver:
    """What became of keys handed to the daemon."""

    target: str
    expires_at: str | None
    watches: tuple[str, ...]
    note: str | None
    """Set when the keys were taken but could not be confirmed (no permission to list)."""


async def hand_over(grants: Grants, table: WatchTable, keys: Keys, target: str) -> HandOver:
    """Give handed-over keys to the entry for ``target`` (or the only such entry).

    The keys are tried with one listing of a destination they serve: keys S3
    refuses (expired, unknown, a broken token) are refused here and the old ones
    stay. Taken keys are used at once by every watch of the entry, resume what
    waited, and are kept in the state folder for a restart.
    """
    handed = [g for g in grants if isinstance(g.provider, HandedOverProvider)]
    if not handed:
        raise CredentialsError(
            'no [credentials] entry has source = "handed-over": keys can only be handed '
            "to such an entry (README: \"Keys from a laptop\")"
        )
    chosen = [g for g in handed if target and g.provider.config.target == target]
    if not chosen and not target and len(handed) == 1:
        chosen = handed
    if not chosen:
        targets = ", ".join(g.provider.config.target for g in handed)
        asked = f"target {target}" if target else "no target"
        raise CredentialsError(
            f"{asked} names no handed-over entry; name one with --target "
            f"(handed-over targets: {targets})"
        )
    grant = chosen[0]
    provider = grant.provider
    assert isinstance(provider, HandedOverProvider)
    watches = [a for a in table.values() if a.grant is grant]
    before = await provider.hand_over(keys)
    note = None
    if watches:
        destination = watches[0].config.destination
        try:
            async for _ in grant.store.list_objects(destination.bucket, destination.prefix):
                break
        except CredentialsError as exc:
            await provider.restore(before)
            raise CredentialsError(f"S3 refused these keys ({exc}); the old keys stay") from None
        except CpgError as exc:
            note = f"taken, but a listing of {destination} to try them failed: {exc}"
    if not provider.usable:
        stats = provider.statistics()
        await provider.restore(before)
        raise CredentialsError(f"these keys cannot be used: {stats.last_error or stats.state}")
    await provider.keep()
    stats = provider.statistics()
    log.info(
        "credentials_handed_over",
        target=stats.target,
        expires_at=stats.expires_at,
        watches=[a.name for a in watches],
    )
    return HandOver(stats.target, stats.expires_at, tuple(a.name for a in watches), note)
