"""The supervisor: opens the journal, starts every component in one task group, stops cleanly.

Start order: journal (crash leftovers re-queued) -> S3 clients -> scheduler ->
watchers. Stop (SIGTERM, SIGINT or ``request_stop``): stop watching and stop
starting files, let in-flight requests finish until ``daemon.drain_timeout``,
then cancel what is left; the journal already holds every finished part, so
the next start resumes from there. A second signal skips the wait.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog

from cpg_daemon import __version__
from cpg_daemon.config import Config
from cpg_daemon.control import CommandError, ControlServer, Registry, prepare_socket_path
from cpg_daemon.credentials import CredentialProvider, build_providers, provider_for
from cpg_daemon.errors import CpgError
from cpg_daemon.journal import Journal, JournalStatistics
from cpg_daemon.metrics import MetricsServer
from cpg_daemon.scheduler import Scheduler
from cpg_daemon.status import gather
from cpg_daemon.store import ObjectStore
from cpg_daemon.uploader import Uploader
from cpg_daemon.watcher import Watcher

log = structlog.get_logger("cpg_daemon.daemon")

JOURNAL_NAME = "journal.sqlite3"


async def remote_sizes(store: ObjectStore, bucket: str, prefix: str) -> dict[str, int]:
    """Sizes of the objects already under a destination (to spot files uploaded before)."""
    return {obj.key: obj.size async for obj in store.list_objects(bucket, prefix)}


class Daemon:
    """One run of the daemon: ``await Daemon(config).run()``."""

    def __init__(self, config: Config, *, handle_signals: bool = True) -> None:
        self.config = config
        self._handle_signals = handle_signals
        self._stopping = anyio.Event()
        self._force = anyio.Event()
        self._running = anyio.Event()
        self._journal: Journal | None = None
        self._providers: list[CredentialProvider] = []
        self._state = "starting"
        self._started_at = datetime.now(timezone.utc)

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stopping.set()

    async def wait_running(self) -> None:
        """Return once every watcher has started its first walk."""
        await self._running.wait()

    async def journal_statistics(self) -> JournalStatistics:
        assert self._journal is not None, "the daemon is not running"
        return await self._journal.statistics()

    async def run(self) -> None:
        config = self.config
        file = str(config.path) if config.path else "<config>"
        providers = build_providers(config)
        watch_providers = {
            watch.name: provider_for(providers, watch.destination, file, f"watch[{i}].destination")
            for i, watch in enumerate(config.watches)
        }
        await anyio.to_thread.run_sync(
            prepare_socket_path, config.daemon.socket, config.daemon.socket_group
        )
        journal = await Journal.open(config.daemon.state_dir / JOURNAL_NAME)
        self._journal = journal
        try:
            requeued = await journal.reset_in_flight()
            # A restart is a person's way to say "try again": failed files get a new
            # round of attempts (names S3 cannot take stay failed).
            retried = await journal.retry_failed()
            log.info(
                "starting",
                version=__version__,
                journal=str(journal.path),
                new_journal=journal.created,
                resumed_files=requeued,
                retried_failed_files=retried,
                watches=[w.name for w in config.watches],
            )
            async with AsyncExitStack() as stack:
                by_provider = {
                    id(p): await stack.enter_async_context(
                        ObjectStore.connect(p.session, config.s3)
                    )
                    for p in providers
                }
                stores = {name: by_provider[id(p)] for name, p in watch_providers.items()}
                uploader = Uploader(
                    journal, config.s3, anyio.CapacityLimiter(config.s3.max_concurrency)
                )
                scheduler = Scheduler(
                    journal,
                    uploader,
                    {w.name: w for w in config.watches},
                    stores,
                    workers=config.s3.max_concurrency,
                    file_attempts=config.daemon.file_attempts,
                    providers=watch_providers,
                )
                for provider in providers:
                    provider.on_usable(scheduler.wake)
                self._providers = providers
                await self._supervise(journal, scheduler, uploader, stores)
        finally:
            self._journal = None
            await journal.close()
        log.info("stopped")

    async def _supervise(
        self,
        journal: Journal,
        scheduler: Scheduler,
        uploader: Uploader,
        stores: dict[str, ObjectStore],
    ) -> None:
        watchers = [
            Watcher(w, journal, scheduler.wake, self.config.daemon.rescan_interval)
            for w in self.config.watches
        ]
        registry = self._commands(journal, scheduler, uploader, watchers)
        control = ControlServer(
            self.config.daemon.socket, registry, self.config.daemon.socket_group
        )
        async with anyio.create_task_group() as tg:
            if self._handle_signals:
                tg.start_soon(self._signals)
            await tg.start(control.run)
            if self.config.daemon.metrics_listen:
                status = registry.commands["status"].handler
                metrics = MetricsServer(self.config.daemon.metrics_listen, lambda: status({}))
                await tg.start(metrics.run)
            for provider in self._providers:
                await tg.start(provider.run)
            await tg.start(scheduler.run)
            watching = anyio.CancelScope()

            async def watch_all() -> None:
                with watching:
                    async with anyio.create_task_group() as group:
                        for watcher in watchers:
                            if journal.created:
                                # A new journal may sit beside data uploaded before: list
                                # the destination so those files are checked, not re-sent.
                                await self._list_destination(watcher, stores)
                            await group.start(watcher.run)
                        log.info("running")
                        self._state = "running"
                        self._running.set()

            tg.start_soon(watch_all)
            await self._stopping.wait()
            self._state = "stopping"
            for watcher in watchers:
                watcher.stop()
            watching.cancel()
            scheduler.drain()
            async with anyio.create_task_group() as drain:

                async def until_idle() -> None:
                    with anyio.move_on_after(self.config.daemon.drain_timeout) as deadline:
                        await scheduler.wait_idle()
                    if deadline.cancelled_caught:
                        log.warning("drain_timeout", seconds=self.config.daemon.drain_timeout)
                    drain.cancel_scope.cancel()

                drain.start_soon(until_idle)
                await self._force.wait()
                drain.cancel_scope.cancel()
            tg.cancel_scope.cancel()

    def _commands(
        self,
        journal: Journal,
        scheduler: Scheduler,
        uploader: Uploader,
        watchers: list[Watcher],
    ) -> Registry:
        """The control socket's commands; adding one is one entry here."""
        names = [w.name for w in self.config.watches]

        def chosen(args: Mapping[str, Any]) -> str | None:
            watch = args.get("watch")
            if watch is None:
                return None
            if watch not in names:
                known = ", ".join(names) or "none"
                raise CommandError(f"no watch named {watch!r} (watches: {known})")
            return str(watch)

        def selected(watch: str | None) -> list[str]:
            return names if watch is None else [watch]

        async def status(args: Mapping[str, Any]) -> dict[str, Any]:
            stats = scheduler.statistics()
            state = self._state
            everything = stats.paused_all or (names and set(names) <= set(stats.paused))
            if state == "running" and everything:
                state = "paused"
            return gather(
                state=state,
                started_at=self._started_at,
                watches=self.config.watches,
                journal=await journal.statistics(),
                scheduler=stats,
                uploader=uploader.statistics(),
                watchers=[w.statistics() for w in watchers],
                credentials=[p.statistics() for p in self._providers],
            )

        async def pause(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            scheduler.pause(watch)
            return {"paused": selected(watch)}

        async def resume(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            scheduler.resume(watch)
            return {"resumed": selected(watch)}

        async def retry(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            count = await journal.retry_failed(watch)
            scheduler.wake()
            return {"requeued": count, "watches": selected(watch)}

        async def rescan(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            for watcher in watchers:
                if watch is None or watcher.watch.name == watch:
                    watcher.request_rescan()
            return {"rescanning": selected(watch)}

        registry = Registry()

        async def help_(args: Mapping[str, Any]) -> dict[str, str]:
            return registry.help()

        registry.add(
            "status", status, "what the daemon is doing, as one JSON object", mutating=False
        )
        registry.add(
            "pause", pause, "stop starting new files (all watches, or args.watch)", mutating=True
        )
        registry.add("resume", resume, "start new files again (all, or args.watch)", mutating=True)
        registry.add("retry", retry, "queue failed files again (all, or args.watch)", mutating=True)
        registry.add(
            "rescan", rescan, "walk the watched folders now (all, or args.watch)", mutating=True
        )
        registry.add("help", help_, "the commands and what they do", mutating=False)
        return registry

    @staticmethod
    async def _list_destination(watcher: Watcher, stores: dict[str, ObjectStore]) -> None:
        destination = watcher.watch.destination
        try:
            watcher.remote_sizes = await remote_sizes(
                stores[watcher.watch.name], destination.bucket, destination.prefix
            )
        except CpgError as exc:
            log.warning(
                "destination_not_listed",
                watch=watcher.watch.name,
                error=str(exc),
                consequence="each file found now is looked up on the server before upload",
            )
            watcher.check_all_first_walk = True

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping.is_set():
                    log.info("stopping", signal=name)
                    self._stopping.set()
                else:
                    log.warning("stopping_now", signal=name)
                    self._force.set()


async def run(config: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    await Daemon(config).run()
