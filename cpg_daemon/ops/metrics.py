"""An OpenMetrics / Prometheus text endpoint for fleets of acquisition servers (optional).

Off unless ``daemon.metrics_listen`` is set (e.g. ``"127.0.0.1:9464"``). The
numbers come from the same snapshot as ``cpg-daemon status``, taken when the
endpoint is scraped; the exposition format is the standard client library's.
The tiny HTTP server runs in the daemon's task group like everything else.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone

import anyio
import anyio.abc
import structlog
from anyio.abc import TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from cpg_daemon import __version__
from cpg_daemon.engine.tally import DURATION_BUCKETS, Tally, WatchTally
from cpg_daemon.ops import listeners
from cpg_daemon.ops.status import StatusReply

log = structlog.get_logger(__name__)

Snapshot = Callable[[], Awaitable[StatusReply]]

MAX_SCRAPES = 16
"""Scrapes served at once (a connection is held at most 10 s); more get 503."""


COUNTERS = (
    ("cpg_daemon_files_uploaded", "Files uploaded since the daemon started", "files_uploaded"),
    ("cpg_daemon_bytes_uploaded", "Bytes uploaded since the daemon started", "bytes_uploaded"),
    ("cpg_daemon_upload_failures", "Files that failed since the start", "files_failed"),
    ("cpg_daemon_upload_retries", "Uploads to be tried again later", "retries"),
    ("cpg_daemon_throttled", "Files put back because S3 asked for fewer requests", "throttled"),
)
"""(name, help, WatchTally attribute) of each counter."""


def metric_families(status: StatusReply, tally: Tally) -> Iterator[Metric]:
    """The status object (what is true now) and the tally (what happened since the
    start, counters that only go up) as metric families."""
    labels = ["watch"]
    counters = [
        (CounterMetricFamily(name, text, labels=labels), attribute)
        for name, text, attribute in COUNTERS
    ]
    durations = HistogramMetricFamily(
        "cpg_daemon_upload_duration_seconds", "Time to upload one file", labels=labels
    )
    last = GaugeMetricFamily(
        "cpg_daemon_last_upload_timestamp_seconds",
        "When the latest file of the watch was uploaded (Unix time)",
        labels=labels,
    )
    for name in [w["name"] for w in status["watches"]]:
        counts = tally.watches.get(name) or WatchTally()
        for family, attribute in counters:
            family.add_metric([name], getattr(counts, attribute))
        cumulative, buckets = 0, []
        for bound, count in zip(DURATION_BUCKETS, counts.duration_counts, strict=True):
            cumulative += count
            buckets.append((f"{bound:g}", cumulative))
        buckets.append(("+Inf", cumulative + counts.duration_over))
        durations.add_metric([name], buckets, sum_value=counts.duration_sum)
        if counts.last_upload_at is not None:
            last.add_metric([name], counts.last_upload_at)
    yield from (family for family, _ in counters)
    yield from (durations, last)
    yield from _journal_families(status)
    yield from _credential_families(status)
    build = InfoMetricFamily("cpg_daemon_build", "The cpg-daemon that runs")
    build.add_metric([], {"version": __version__, "python": platform.python_version()})
    yield build


def _journal_families(status: StatusReply) -> Iterator[Metric]:
    """The journal's state now: these go down as well as up."""
    failed = GaugeMetricFamily(
        "cpg_daemon_files_failed", "Files in the failed state", labels=["watch"]
    )
    queued = GaugeMetricFamily(
        "cpg_daemon_files_queued", "Files waiting or uploading", labels=["watch"]
    )
    queued_bytes = GaugeMetricFamily(
        "cpg_daemon_bytes_queued", "Bytes waiting or uploading", labels=["watch"]
    )
    paused = GaugeMetricFamily(
        "cpg_daemon_watch_paused", "1 when the watch is paused", labels=["watch"]
    )
    for watch in status["watches"]:
        name = [watch["name"]]
        failed.add_metric(name, watch["files"]["failed"])
        queued.add_metric(name, watch["files"]["queued"] + watch["files"]["uploading"])
        queued_bytes.add_metric(name, watch["bytes"]["queued"])
        paused.add_metric(name, 1 if watch["paused"] else 0)
    yield from (failed, queued, queued_bytes, paused)
    yield GaugeMetricFamily(
        "cpg_daemon_throughput_bytes_per_second",
        "Upload throughput over the last 20 s (rate(cpg_daemon_bytes_uploaded_total) is "
        "the counter's way)",
        value=status["throughput_bytes_per_s"],
    )
    yield GaugeMetricFamily(
        "cpg_daemon_requests_allowed",
        "Requests allowed in flight now: adapted to the link (more on a long round trip), "
        "up to s3.max_concurrency",
        value=status["requests_allowed"],
    )
    yield GaugeMetricFamily(
        "cpg_daemon_bandwidth_limit_bytes_per_second",
        "The s3.max_bandwidth limit in force now (it follows a timetable); 0 = unlimited",
        value=status["bandwidth"]["limit_bytes_per_s"],
    )


def _credential_families(status: StatusReply) -> Iterator[Metric]:
    expiry = GaugeMetricFamily(
        "cpg_daemon_credentials_expiry_timestamp_seconds",
        "When the current short-lived keys expire (Unix time)",
        labels=["target"],
    )
    left = GaugeMetricFamily(
        "cpg_daemon_credentials_seconds_to_expiry",
        "Seconds until the current short-lived keys expire",
        labels=["target"],
    )
    valid = GaugeMetricFamily(
        "cpg_daemon_credentials_valid", "1 when the keys are valid", labels=["target"]
    )
    expiring = GaugeMetricFamily(
        "cpg_daemon_credentials_expiring",
        "1 when the keys expire within warn_before and nothing will renew them",
        labels=["target"],
    )
    now = datetime.now(timezone.utc)
    for cred in status["credentials"]:
        if cred["expires_at"]:
            expires = datetime.fromisoformat(cred["expires_at"])
            expiry.add_metric([cred["target"]], expires.timestamp())
            left.add_metric([cred["target"]], (expires - now).total_seconds())
        valid.add_metric([cred["target"]], 1 if cred["state"] == "valid" else 0)
        expiring.add_metric([cred["target"]], 1 if cred.get("warning") else 0)
    yield from (expiry, left, valid, expiring)


class _Snapshot:
    """A collector over one status object (the registry API is synchronous)."""

    def __init__(self, status: StatusReply, tally: Tally) -> None:
        self._status = status
        self._tally = tally

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._status, self._tally)


def exposition(status: StatusReply, tally: Tally) -> bytes:
    """The text format, with the standard process_* and python_* metrics too."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status, tally))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return generate_latest(registry)


async def _busy(stream: anyio.abc.SocketStream) -> None:
    await stream.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")


class MetricsServer:
    """Answers every HTTP GET with the current metrics."""

    def __init__(self, listen: str, snapshot: Snapshot, tally: Tally) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self._snapshot = snapshot
        self._tally = tally

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        log.info("metrics_listening", address=f"{self.host}:{self.port}")
        task_status.started()
        async with listener:
            sockets = [x for x in listener.listeners if isinstance(x, anyio.abc.SocketListener)]
            await listeners.serve(
                sockets,
                self._answer,
                name="metrics",
                limit=MAX_SCRAPES,
                turn_away=_busy,
            )

    async def _answer(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buffered = BufferedByteReceiveStream(stream)
            try:
                with anyio.fail_after(10):
                    head = await buffered.receive_until(b"\r\n\r\n", 16 * 1024)
            except (anyio.EndOfStream, anyio.DelimiterNotFound, anyio.IncompleteRead, TimeoutError):
                return
            if not head.startswith(b"GET "):
                await stream.send(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            body = exposition(await self._snapshot(), self._tally)
            header = (
                "HTTP/1.1 200 OK\r\n"
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            try:
                await stream.send(header.encode() + body)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
