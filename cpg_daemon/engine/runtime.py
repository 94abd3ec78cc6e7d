"""The engine: the upload pipeline, built once, for the daemon and the one-shot upload.

``Engine.open`` builds journal -> grants -> uploader -> scheduler -> batch tracker in
that order (a configuration mistake is raised before the journal is touched) and closes
them in reverse. The engine owns the watch table (one immutable ``WatchTable``, swapped
whole by ``reload``), the grants and their clients, and one watcher per watch. What
runs around it - signals, the control socket, systemd - is the supervisor's
(``cpg_daemon.ops.daemon``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import Config
from cpg_daemon.core.errors import CpgError, SkipFileError
from cpg_daemon.discovery.watcher import Watcher, WatcherStatistics
from cpg_daemon.engine.batches import BatchTracker
from cpg_daemon.engine.grants import Assignment, Connect, Grants, assign
from cpg_daemon.engine.pacing import InFlightPolicy
from cpg_daemon.engine.scheduler import Scheduler
from cpg_daemon.engine.sources import ObjectSource
from cpg_daemon.engine.uploader import Uploader
from cpg_daemon.engine.watches import ReloadPlan, WatchTable, plan_reload
from cpg_daemon.journal import Journal
from cpg_daemon.s3.store import Storage

log = structlog.get_logger(__name__)


async def remote_sizes(store: Storage, bucket: str, prefix: str) -> dict[str, int]:
    """Sizes of the objects already under a destination (to spot files uploaded before)."""
    return {obj.key: obj.size async for obj in store.list_objects(bucket, prefix)}


@dataclass
class _RunningWatch:
    watcher: Watcher
    scope: anyio.CancelScope


@dataclass(frozen=True)
class Resumed:
    """What the journal held at start: files a crash left in flight, failures retried."""

    in_flight: int
    failed: int


class Engine:
    """One pipeline over one journal: ``async with Engine.open(config, path) as engine``."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        grants: Grants,
        assignment: Assignment,
        resumed: Resumed,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.config = config
        self._clock = clock
        self.journal = journal
        self.grants = grants
        self.resumed = resumed
        self.table: WatchTable = grants.table(config, assignment)
        self.uploader = Uploader(
            journal,
            config.s3,
            anyio.CapacityLimiter(config.s3.max_concurrency),
            clock=clock,
            in_flight=InFlightPolicy(config.s3.max_concurrency),
        )
        self.scheduler = Scheduler(
            journal,
            self.uploader,
            lambda: self.table,
            workers=config.s3.max_concurrency,
            file_attempts=config.daemon.file_attempts,
            clock=clock,
        )
        self.batches = BatchTracker(
            journal, lambda: self.table.configs(), self._settling, clock=clock, send=self.put_file
        )
        self.scheduler.on_finished(lambda record: self.batches.touch(record.watch, record.rel_path))
        grants.on_usable(self.scheduler.wake)
        self._watchers: dict[str, _RunningWatch] = {}
        self._task_group: TaskGroup | None = None
        self._watch_group: TaskGroup | None = None
        self._watching = anyio.CancelScope()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: Config,
        journal_path: Path,
        *,
        assignment: Assignment | None = None,
        clock: Clock = SYSTEM_CLOCK,
        connect: Connect | None = None,
    ) -> AsyncIterator[Engine]:
        """Open the journal (crash leftovers re-queued, failures given new attempts), the
        grants and the pipeline; close them all on the way out.

        ``assignment``: ``assign(config)``, if the caller has it already; ``clock`` and
        ``connect`` (each grant's S3 client) are for tests.
        """
        if assignment is None:  # a ConfigError here leaves the journal untouched
            assignment = await anyio.to_thread.run_sync(assign, config)
        journal = await Journal.open(journal_path, clock)
        try:
            in_flight = await journal.reset_in_flight()
            # A restart is a person's way to say "try again": failed files get a new
            # round of attempts (names S3 cannot take stay failed).
            failed = await journal.retry_failed()
            async with Grants.open(config, assignment, connect) as grants:
                resumed = Resumed(in_flight, failed)
                yield cls(config, journal, grants, assignment, resumed, clock=clock)
        finally:
            await journal.close()

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew keys, follow the bandwidth timetable, feed files to the uploader, follow
        batches; until cancelled.

        Ready once all of them run; watchers are started afterwards (``start_watches``).
        """
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            await self.grants.start_renewals(tg)
            await tg.start(self.uploader.bandwidth.follow)
            await tg.start(self.scheduler.run)
            await tg.start(self.batches.run)
            await tg.start(self._host_watchers)
            task_status.started()

    async def _host_watchers(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with self._watching:
            async with anyio.create_task_group() as group:
                self._watch_group = group
                task_status.started()
                await anyio.sleep_forever()  # a reload may add watches later

    async def start_watches(self) -> None:
        """Start a watcher per watch, each once it runs (its first walk follows)."""
        known = await self._known_watches()
        for watch in self.table:
            await self._start_watch(watch, known, wait=True)

    async def _known_watches(self) -> set[str]:
        return set((await self.journal.statistics()).by_watch)

    async def _start_watch(self, name: str, known: set[str], *, wait: bool) -> None:
        """Start one watch's watcher (with ``wait``, until it runs).

        A watch the journal has never seen may point at data uploaded before
        (by hand, or by a lost journal): its destination is listed first, so
        those files are checked on the server rather than sent again.
        """
        assert self._watch_group is not None, "Engine.run first"
        active = self.table[name]
        watcher = Watcher(
            active.config,
            self.journal,
            self.scheduler.wake,
            self.config.daemon.rescan_interval,
            on_rejected=self.scheduler.remember,
            clock=self._clock,
        )
        scope = anyio.CancelScope()
        self._watchers[name] = _RunningWatch(watcher, scope)

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                if name not in known:
                    await self._expect_remote(watcher, active.grant.store, strict=False)
                await watcher.run(task_status=task_status)

        if wait:
            await self._watch_group.start(run)
        else:  # a reload: listing a large destination must not hold up the reply
            self._watch_group.start_soon(run)

    @staticmethod
    async def _expect_remote(watcher: Watcher, store: Storage, *, strict: bool) -> None:
        """List the watch's destination for its first walk; ``strict``: a failure raises."""
        destination = watcher.watch.destination
        try:
            sizes = await remote_sizes(store, destination.bucket, destination.prefix)
        except CpgError as exc:
            if strict:
                raise
            log.warning(
                "destination_not_listed",
                watch=watcher.watch.name,
                error=str(exc),
                consequence="each file found now is looked up on the server before upload",
            )
            watcher.expect_remote(None)
        else:
            watcher.expect_remote(sizes)

    async def walk_once(self, name: str) -> None:
        """List a watch's destination, then walk its folder once (the one-shot upload)."""
        active = self.table[name]
        watcher = Watcher(
            active.config, self.journal, lambda: None, rescan_interval=3600, clock=self._clock
        )
        await self._expect_remote(watcher, active.grant.store, strict=True)
        await watcher.scan()

    async def walk_objects(self, name: str, source: ObjectSource) -> None:
        """List a watch's destination, then its S3 source once (the one-shot upload from
        another bucket); the watch's files are read from ``source`` from now on."""
        active = self.table[name]
        store = active.grant.store
        destination = active.config.destination
        sizes = await remote_sizes(store, destination.bucket, destination.prefix)
        self.scheduler.read_objects(name, source)
        await source.walk(active.config, self.journal, sizes)

    async def put_file(self, watch: str, bucket: str, key: str, path: Path) -> str:
        """One of the daemon's own files (a batch's manifest) to S3, with the keys and
        client of ``watch``'s grant and the uploader's limits; returns the ETag."""
        active = self.table.get(watch)
        if active is None:
            raise SkipFileError(f"the watch {watch} was removed by a reload")
        with active.grant.lease() as store:
            return await self.uploader.put_file(store, bucket, key, path)

    def rescan(self, name: str | None = None) -> None:
        for running in self._watchers.values():
            if name is None or running.watcher.watch.name == name:
                running.watcher.request_rescan()

    def watcher_statistics(self) -> list[WatcherStatistics]:
        return [r.watcher.statistics() for r in self._watchers.values()]

    def _settling(self, watch: str, folder: str) -> bool:
        """Whether files under a watch's top-level folder may still reach the journal."""
        running = self._watchers.get(watch)
        return running is None or running.watcher.settling_under(folder)

    # -- reload --------------------------------------------------------------------------

    async def reload(self, new: Config) -> ReloadPlan:
        """Run ``new`` from now on, without touching the queue or the uploads in flight.

        Everything that can fail (a missing profile, a watch no target covers) is done
        first: a ``ConfigError`` changes nothing. Unchanged ``[credentials]`` entries keep
        their grant (and keys); a dropped grant stops renewing and closes its client once
        its files in flight are done. Watchers of removed or changed watches stop; new and
        changed ones start (listing the destination first for a watch never seen).
        """
        assert self._task_group is not None, "Engine.run first"
        plan = plan_reload(self.config, new)
        # Reads profiles from disk and builds sessions: off the loop.
        assignment = await anyio.to_thread.run_sync(assign, plan.config, self.grants.providers)
        dropped = await self.grants.adopt(assignment)
        for grant in dropped:
            self._task_group.start_soon(grant.retire)
        await self.grants.start_renewals(self._task_group)
        self.config = plan.config
        self.uploader.bandwidth.set_limit(plan.config.s3.max_bandwidth)
        self.table = self.grants.table(plan.config, assignment)
        self.scheduler.file_attempts = plan.config.daemon.file_attempts
        self.scheduler.watches_changed()
        for name in plan.removed + plan.changed:
            running = self._watchers.pop(name)
            running.watcher.stop()
            running.scope.cancel()
        known = await self._known_watches()
        for name in plan.added + plan.changed:
            await self._start_watch(name, known, wait=False)
        return plan

    # -- stopping ------------------------------------------------------------------------

    def stop_watching(self) -> None:
        """Stop every watcher and start no new file (files in flight carry on)."""
        for running in self._watchers.values():
            running.watcher.stop()
        self._watching.cancel()
        self.scheduler.drain()
        self.batches.stop()

    async def drain(self, grace: float) -> None:
        """After ``stop_watching``: wait for the files in flight, at most ``grace`` s,
        then for a running hook's grace period."""
        with anyio.move_on_after(grace) as deadline:
            await self.scheduler.wait_idle()
        if deadline.cancelled_caught:
            log.warning("drain_timeout", seconds=grace)
        await self.batches.wait_hooks()  # a running hook's grace; then it is killed
