"""The supervisor: opens the journal, starts every component in one task group, stops cleanly.

Start order: journal (crash leftovers re-queued) -> S3 clients -> scheduler ->
watchers. Stop (SIGTERM or SIGINT): stop taking new files and stop watching,
let in-flight requests finish until ``daemon.drain_timeout``, then cancel
what is left; the journal already holds every finished part, so the next
start resumes from there. A second signal skips the wait.
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack

import anyio
import structlog

from cpg_daemon import __version__
from cpg_daemon.config import Config
from cpg_daemon.credentials import build_providers, provider_for
from cpg_daemon.journal import Journal
from cpg_daemon.scheduler import Scheduler
from cpg_daemon.store import ObjectStore
from cpg_daemon.uploader import Uploader
from cpg_daemon.watcher import Watcher

log = structlog.get_logger("cpg_daemon.daemon")

JOURNAL_NAME = "journal.sqlite3"


async def remote_sizes(store: ObjectStore, bucket: str, prefix: str) -> dict[str, int]:
    """Sizes of the objects already under a destination (to spot files uploaded before)."""
    return {obj.key: obj.size async for obj in store.list_objects(bucket, prefix)}


async def run(config: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    file = str(config.path) if config.path else "<config>"
    providers = build_providers(config)
    watch_providers = {
        watch.name: provider_for(providers, watch.destination, file, f"watch[{i}].destination")
        for i, watch in enumerate(config.watches)
    }
    journal = await Journal.open(config.daemon.state_dir / JOURNAL_NAME)
    try:
        requeued = await journal.reset_in_flight()
        log.info(
            "starting",
            version=__version__,
            journal=str(journal.path),
            new_journal=journal.created,
            resumed_files=requeued,
            watches=[w.name for w in config.watches],
        )
        async with AsyncExitStack() as stack:
            stores_by_provider = {
                id(p): await stack.enter_async_context(ObjectStore.connect(p.session, config.s3))
                for p in providers
            }
            stores = {name: stores_by_provider[id(p)] for name, p in watch_providers.items()}
            limiter = anyio.CapacityLimiter(config.s3.max_concurrency)
            uploader = Uploader(journal, config.s3, limiter)
            scheduler = Scheduler(
                journal,
                uploader,
                {w.name: w for w in config.watches},
                stores,
                workers=config.s3.max_concurrency,
                file_attempts=config.daemon.file_attempts,
            )
            await _supervise(config, journal, scheduler, stores)
    finally:
        await journal.close()
    log.info("stopped")


async def _supervise(
    config: Config, journal: Journal, scheduler: Scheduler, stores: dict[str, ObjectStore]
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            watching = anyio.CancelScope()

            async def watch_all() -> None:
                with watching:
                    async with anyio.create_task_group() as watchers:
                        for watch in config.watches:
                            sizes = None
                            if journal.created:
                                sizes = await remote_sizes(
                                    stores[watch.name],
                                    watch.destination.bucket,
                                    watch.destination.prefix,
                                )
                            watcher = Watcher(
                                watch,
                                journal,
                                scheduler.wake,
                                config.daemon.rescan_interval,
                                sizes,
                            )
                            await watchers.start(watcher.run)
                        log.info("running")

            tg.start_soon(watch_all)
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                break
            watching.cancel()
            scheduler.drain()
            async with anyio.create_task_group() as drain:

                async def second_signal() -> None:
                    async for signum in signals:
                        log.warning("stopping_now", signal=signal.Signals(signum).name)
                        drain.cancel_scope.cancel()

                drain.start_soon(second_signal)
                with anyio.move_on_after(config.daemon.drain_timeout) as deadline:
                    await scheduler.wait_idle()
                if deadline.cancelled_caught:
                    log.warning("drain_timeout", seconds=config.daemon.drain_timeout)
                drain.cancel_scope.cancel()
            tg.cancel_scope.cancel()
