"""The supervisor: the engine as a service, in three phases - start-up, serve, drain.

Start-up: the state directory's lock, the engine (journal -> grants -> uploader ->
scheduler -> batch tracker), the control socket (and metrics), then one watcher per
watch; READY goes to systemd once all run. Serve: until SIGTERM, SIGINT or
``request_stop``; SIGHUP and the ``reload`` command reload the configuration. Drain:
stop watching and stop starting files, let the files in flight finish until
``daemon.drain_timeout``, then cancel what is left; the journal already holds every
finished part, so the next start resumes from there. A second signal skips the wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from cpg_daemon import __version__
from cpg_daemon.core.config import Config, load_config
from cpg_daemon.core.errors import ConfigError
from cpg_daemon.core.units import format_size
from cpg_daemon.engine.grants import assign
from cpg_daemon.engine.runtime import Engine
from cpg_daemon.journal import JOURNAL_NAME, lock_state_dir
from cpg_daemon.ops import listeners, logs
from cpg_daemon.ops.commands import Commands
from cpg_daemon.ops.control import (
    MAX_CLIENTS,
    CommandError,
    ControlServer,
    Handler,
    Registry,
    inherited_listener,
    prepare_socket_path,
)
from cpg_daemon.ops.metrics import MAX_SCRAPES, MetricsServer
from cpg_daemon.ops.status import ConfigStatus, StatusReply
from cpg_daemon.ops.systemd import Notifier, listen_fds

log = structlog.get_logger(__name__)

STATUS_INTERVAL = 5.0
"""Seconds between refreshes of the STATUS= line systemd shows."""
START_EXTENSION = 90.0
"""While starting, systemd is told every 30 s to wait this much longer (EXTEND_TIMEOUT_USEC)."""
STOP_MARGIN = 10.0
"""Seconds asked for on stopping beyond daemon.drain_timeout, to close the journal."""
PR_SET_DUMPABLE = 4


def _warn_if_few_descriptors(limit: int, config: Config) -> None:
    """Each upload may hold a file and a connection; each listener caps its clients."""
    needed = 2 * config.s3.max_concurrency + 2 * (MAX_CLIENTS + MAX_SCRAPES) + 256
    if limit < needed:
        log.warning(
            "open_files_limit_low",
            limit=limit,
            needed=needed,
            consequence="uploads may fail with 'Too many open files'",
            fix="raise LimitNOFILE= in the unit, or lower s3.max_concurrency",
        )


class Daemon:
    """One run of the daemon: ``await Daemon(config).run()``."""

    def __init__(
        self,
        config: Config,
        *,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
        control_socket: socket.socket | None = None,
    ) -> None:
        """``control_socket``: a listening socket systemd made (``cpg-daemon.socket``),
        served instead of one of the daemon's own at ``daemon.socket``."""
        self._config = config
        self._handle_signals = handle_signals
        self._notifier = notifier or Notifier()
        self._control_socket = control_socket
        self._stopping = anyio.Event()
        self._force = anyio.Event()
        self._running = anyio.Event()
        self._engine: Engine | None = None
        self.state = "starting"
        self.started_at = datetime.now(timezone.utc)
        self._reload_lock = anyio.Lock()
        self._config_loaded_at = self.started_at
        self._reload_error: str | None = None
        self._restart_needed: tuple[str, ...] = ()

    @property
    def config(self) -> Config:
        """The configuration in force: the engine's while it runs (a reload replaces it
        there), else the one the daemon was started with."""
        return self._engine.config if self._engine is not None else self._config

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the daemon is not running"
        return self._engine

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stopping.set()

    async def wait_running(self) -> None:
        """Return once every watcher runs (its first walk follows within EVENTS_FIRST)."""
        await self._running.wait()

    def config_status(self) -> ConfigStatus:
        """The ``config`` part of the status reply."""
        return {
            "path": str(self.config.path) if self.config.path else None,
            "loaded_at": self._config_loaded_at.isoformat(timespec="seconds"),
            "reload_error": self._reload_error,
            "restart_needed": list(self._restart_needed),
        }

    # -- the phases ------------------------------------------------------------------------

    async def run(self) -> None:
        config = self.config
        # A configuration mistake stops us before anything is touched.
        assignment = await anyio.to_thread.run_sync(assign, config)
        if self._control_socket is None:  # systemd's socket is ours: nothing to look at
            await anyio.to_thread.run_sync(
                prepare_socket_path, config.daemon.socket, config.daemon.socket_group
            )
        lock = await anyio.to_thread.run_sync(lock_state_dir, config.daemon.state_dir)
        open_files = listeners.raise_open_files_limit()
        try:
            journal = config.daemon.state_dir / JOURNAL_NAME
            async with Engine.open(config, journal, assignment=assignment) as engine:
                self._engine = engine
                log.info(
                    "starting",
                    version=__version__,
                    journal=str(engine.journal.path),
                    new_journal=engine.journal.created,
                    resumed_files=engine.resumed.in_flight,
                    retried_failed_files=engine.resumed.failed,
                    watches=list(engine.table),
                    open_files_limit=open_files,
                )
                _warn_if_few_descriptors(open_files, config)
                registry = Commands(self).registry()
                async with anyio.create_task_group() as tg:
                    await self._start_up(tg, engine, registry)
                    await self._stopping.wait()  # serve
                    await self._drain(engine)
                    tg.cancel_scope.cancel()
        finally:
            if self._engine is not None:
                self._config = self._engine.config  # as the last reload left it
            self._engine = None
            self._notifier.close()
            os.close(lock)
        log.info("stopped")

    async def _start_up(self, tg: TaskGroup, engine: Engine, registry: Registry) -> None:
        """Control socket, metrics, the engine; then the watchers, in the background, and
        READY once they all run (listing a large destination first may take minutes)."""
        daemon = self.config.daemon
        status = registry.commands["status"].handler
        interval = self._notifier.watchdog_interval()
        if interval is not None:
            tg.start_soon(self._notifier.keep_alive, interval)
        if self._handle_signals:
            tg.start_soon(self._signals)
        control = ControlServer(
            daemon.socket, registry, daemon.socket_group, inherited=self._control_socket
        )
        await tg.start(control.run)
        if daemon.metrics_listen:
            metrics = MetricsServer(
                daemon.metrics_listen, lambda: status({}), engine.scheduler.tally
            )
            await tg.start(metrics.run)
        await tg.start(engine.run)

        async def watch_all() -> None:
            await engine.start_watches()
            log.info("running")
            self.state = "running"
            self._running.set()
            self._notifier.ready(status_line(await status({})))

        tg.start_soon(watch_all)
        if self._notifier.enabled:
            tg.start_soon(self._extend_start)
            tg.start_soon(self._report_status, status)

    async def _drain(self, engine: Engine) -> None:
        """Stop taking work; files in flight get ``drain_timeout`` (a second signal: none)."""
        self.state = "stopping"
        busy = engine.scheduler.statistics().busy
        drain_timeout = self.config.daemon.drain_timeout
        self._notifier.stopping(
            f"stopping: letting {busy} uploads finish (at most {drain_timeout:g} s)",
            drain_timeout + STOP_MARGIN,
        )
        engine.stop_watching()
        async with anyio.create_task_group() as drain:

            async def until_idle() -> None:
                await engine.drain(drain_timeout)
                drain.cancel_scope.cancel()

            drain.start_soon(until_idle)
            await self._force.wait()
            drain.cancel_scope.cancel()

    async def _extend_start(self) -> None:
        """Listing a large destination before the first walk may outlast TimeoutStartSec."""
        while not self._running.is_set():
            self._notifier.extend_timeout(START_EXTENSION)
            with anyio.move_on_after(START_EXTENSION / 3):
                await self._running.wait()

    async def _report_status(self, status: Handler) -> None:
        """Keep systemd's one-line STATUS= (``systemctl status``) current."""
        while not self._stopping.is_set():
            await anyio.sleep(STATUS_INTERVAL)
            if self.state == "running":
                self._notifier.status(status_line(await status({})))

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Read the configuration file again and apply it (SIGHUP, ``cpg-daemon reload``).

        A configuration that does not load, or that leaves a watch without
        credentials, changes nothing: the old one keeps running and the error shows
        in status. Settings that only take effect at start are reported as needing
        a restart.
        """
        if self.state in ("starting", "stopping"):
            raise CommandError(f"the daemon is {self.state}; reload once it is running")
        async with self._reload_lock:
            self._notifier.reloading()
            try:
                return await self._apply()
            except ConfigError as exc:
                self._reload_error = str(exc)
                log.error(
                    "reload_failed",
                    error=str(exc),
                    consequence="the previous configuration keeps running",
                )
                raise CommandError(
                    f"configuration not reloaded, the previous one keeps running: {exc}"
                ) from None
            finally:
                self._notifier.ready("reloaded")

    async def _apply(self) -> dict[str, Any]:
        old = self.config
        if old.path is None:
            raise ConfigError("<config>", "", "the daemon was started without a configuration file")
        new = await anyio.to_thread.run_sync(load_config, old.path)
        plan = await self.engine.reload(new)
        if plan.logging_changed:
            logs.configure(plan.config.daemon.log_format, plan.config.daemon.log_level)
        self._config_loaded_at = datetime.now(timezone.utc)
        self._reload_error = None
        self._restart_needed = plan.restart_needed
        result = plan.summary()
        log.info("reloaded", **result)
        if plan.restart_needed:
            log.warning(
                "restart_needed",
                settings=list(plan.restart_needed),
                consequence="these settings keep their old values until the daemon restarts",
            )
        return dict(result)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("reloading", signal=name)
                    with contextlib.suppress(CommandError):  # logged; the old config runs on
                        await self.reload()
                elif not self._stopping.is_set():
                    log.info("stopping", signal=name)
                    self._stopping.set()
                else:
                    log.warning("stopping_now", signal=name)
                    self._force.set()


def status_line(status: StatusReply) -> str:
    """The one line ``systemctl status`` shows (sd_notify STATUS=); a credentials
    problem comes first, since it stops the uploads."""
    files = status["files"]
    keys = ""
    for cred in status["credentials"]:
        if cred["state"] in ("refused", "waiting", "expired", "error"):
            keys += f"KEYS {cred['state'].upper()} ({cred['target']}), files wait; "
        elif cred.get("warning") and cred.get("expires_at"):
            keys += f"KEYS EXPIRE {cred['expires_at']} ({cred['target']}); "
    if keys:
        keys = keys.rstrip("; ") + " (see cpg-daemon status) | "
    line = keys + (
        f"{status['state']}: {files['uploaded']:,} uploaded, {files['uploading']:,} uploading, "
        f"{files['queued']:,} queued, {files['failed']:,} failed"
    )
    rate = status["throughput_bytes_per_s"]
    if rate > 0:
        line += f"; {format_size(rate)}/s"
    if status.get("config", {}).get("reload_error"):
        line += "; last reload failed (see cpg-daemon status)"
    if status.get("journal", {}).get("error"):
        line += "; JOURNAL UNWRITABLE (disk full?), no new uploads (see cpg-daemon status)"
    return line


def forbid_core_dumps() -> None:
    """Keep the keys in this process's memory out of core dumps and other users' reach.

    prctl(PR_SET_DUMPABLE, 0): no core dump, no ptrace by processes of the same
    user, and /proc/<pid>/ files (environ, mem) owned by root. Linux only; elsewhere
    (or if it fails) nothing changes.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


async def run(config: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT (SIGHUP reloads the configuration), on the
    control socket systemd passed if it passed one."""
    forbid_core_dumps()
    control = inherited_listener(listen_fds(), config.daemon.socket)
    await Daemon(config, control_socket=control).run()
