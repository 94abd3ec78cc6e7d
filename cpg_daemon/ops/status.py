"""The status reply: component snapshots gathered into one typed object, and its human form.

Each component offers ``statistics()`` (a frozen snapshot); ``gather`` puts them
together as a ``StatusReply`` - typed dictionaries in the JSON shape INTERFACE.md
promises, so the wire format is the object itself - and ``render``, the metrics
endpoint and systemd's ``STATUS=`` line (``ops.daemon.status_line``) all read that
one type. ``cpg-daemon status`` gets the same object back from the socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict, cast

from cpg_daemon import __version__
from cpg_daemon.core.bandwidth import describe_rate
from cpg_daemon.core.text import printable, printable_tree
from cpg_daemon.core.units import duration, format_size, timestamp

if TYPE_CHECKING:  # the snapshots' types only: `cpg-daemon status` imports no S3 client,
    # nor the journal (the daemon's side, gather(), imports it when it runs)
    from cpg_daemon.core.config import WatchConfig
    from cpg_daemon.discovery.watcher import WatcherStatistics
    from cpg_daemon.engine.batches import BatchStatistics
    from cpg_daemon.engine.pacing import BandwidthStatistics
    from cpg_daemon.engine.scheduler import RecentError, SchedulerStatistics
    from cpg_daemon.engine.uploader import UploaderStatistics
    from cpg_daemon.journal import FileState, JournalStatistics
    from cpg_daemon.s3.credentials import CredentialStatistics


class FileCounts(TypedDict):
    queued: int
    uploading: int
    uploaded: int
    failed: int
    settling: int


class ByteCounts(TypedDict):
    queued: int
    uploaded: int


class StructureExample(TypedDict):
    folder: str
    rule: str
    message: str
    pointer: str
    rejected: bool


class StructureStatus(TypedDict):
    policy: str
    warnings: int
    rejected: int
    examples: list[StructureExample]


class WatchStatus(TypedDict):
    name: str
    path: str
    destination: str
    paused: bool
    files: FileCounts
    bytes: ByteCounts
    error: str | None
    structure: StructureStatus


class CredentialStatus(TypedDict):
    target: str
    source: str
    state: str
    expires_at: str | None
    last_error: str | None
    renewals: int
    warning: str | None
    """Keys about to expire with nothing to renew them: what to do (``warn_before``)."""


class RecentErrorStatus(TypedDict):
    path: str
    key: str
    error: str
    at: str


class BatchStatus(TypedDict):
    watch: str
    batch: str
    destination: str
    files: int
    bytes: int
    first_uploaded_at: str
    last_uploaded_at: str
    completed_at: str
    hook: str
    hook_detail: str | None
    manifest: str | None
    """The completion's manifest file (None: not written since the daemon started)."""
    manifest_sha256: str | None
    manifest_uploaded_to: str | None
    """``s3://bucket/key`` of the manifest's copy beside the data (``upload_manifest``)."""


class BatchesStatus(TypedDict):
    completed: list[BatchStatus]
    following: int
    hooks_queued: int
    hooks_running: int


class ThrottleStatus(TypedDict):
    active: bool
    concurrency: int
    of: int
    pause_left_s: float
    files_put_back: int
    last_error: str | None


class BandwidthStatus(TypedDict):
    limit_bytes_per_s: int
    """The ``s3.max_bandwidth`` limit in force now; 0 = unlimited."""
    schedule: str
    """``s3.max_bandwidth`` as configured: a limit, a timetable, or "" for none."""


class JournalStatus(TypedDict):
    path: str
    writable: bool
    error: str | None
    since: str | None


class ConfigStatus(TypedDict):
    path: str | None
    loaded_at: str
    reload_error: str | None
    restart_needed: list[str]


class StatusReply(TypedDict):
    """The ``status`` command's reply, as it goes over the socket."""

    version: str
    state: str
    started_at: str
    uptime_s: int
    files: FileCounts
    bytes: ByteCounts
    throughput_bytes_per_s: float
    bandwidth: BandwidthStatus
    eta_s: int | None
    requests_in_flight: int
    requests_allowed: int
    credentials: list[CredentialStatus]
    watches: list[WatchStatus]
    recent_errors: list[RecentErrorStatus]
    batches: BatchesStatus
    throttle: ThrottleStatus
    journal: JournalStatus
    config: ConfigStatus


def from_wire(reply: dict[str, Any]) -> StatusReply:
    """A status reply read back from the socket (the daemon of this version wrote it)."""
    return cast(StatusReply, reply)


def gather(
    *,
    state: str,
    started_at: datetime,
    watches: Sequence[WatchConfig],
    journal: JournalStatistics,
    scheduler: SchedulerStatistics,
    uploader: UploaderStatistics,
    bandwidth: BandwidthStatistics,
    watchers: Sequence[WatcherStatistics],
    credentials: Sequence[CredentialStatistics],
    batches: BatchStatistics | None,
    config: ConfigStatus,
) -> StatusReply:
    """The status object (required fields per INTERFACE.md, and a few more)."""
    from cpg_daemon.journal import FILE_STATES

    settling = {w.name: w for w in watchers}
    per_watch: list[WatchStatus] = []
    for watch in watches:
        states = journal.by_watch.get(watch.name, {})
        counts = {s: states[s].files if s in states else 0 for s in FILE_STATES}
        watcher = settling.get(watch.name)
        files = _file_counts(counts, watcher.settling if watcher else 0)
        to_do = sum(states[s].bytes for s in ("queued", "uploading") if s in states)
        per_watch.append(
            {
                "name": watch.name,
                "path": str(watch.path),
                "destination": str(watch.destination),
                "paused": scheduler.paused_all or watch.name in scheduler.paused,
                "files": files,
                "bytes": {
                    "queued": to_do,
                    "uploaded": states["uploaded"].bytes if "uploaded" in states else 0,
                },
                "error": watcher.error if watcher else None,
                "structure": _structure(watch, watcher),
            }
        )
    total_files = _file_counts(
        {s: journal.total(s).files for s in FILE_STATES},
        sum(w["files"]["settling"] for w in per_watch),
    )
    queued_bytes = journal.total("queued").bytes + journal.total("uploading").bytes
    throughput = uploader.throughput_bytes_per_s
    now = datetime.now(timezone.utc)
    since = journal.write_error_since
    return {
        "version": __version__,
        "state": state,
        "started_at": started_at.isoformat(timespec="seconds"),
        "uptime_s": round((now - started_at).total_seconds()),
        "files": total_files,
        "bytes": {"queued": queued_bytes, "uploaded": journal.total("uploaded").bytes},
        "throughput_bytes_per_s": throughput,
        "bandwidth": {
            "limit_bytes_per_s": bandwidth.limit_bytes_per_s,
            "schedule": bandwidth.schedule,
        },
        "eta_s": round(queued_bytes / throughput) if throughput > 0 and queued_bytes else None,
        "requests_in_flight": uploader.requests_in_flight,
        "requests_allowed": uploader.requests_allowed,
        "credentials": [
            {
                "target": c.target,
                "source": c.source,
                "state": c.state,
                "expires_at": c.expires_at,
                "last_error": c.last_error,
                "renewals": c.renewals,
                "warning": c.warning,
            }
            for c in credentials
        ],
        "watches": per_watch,
        "recent_errors": [_recent(e) for e in reversed(scheduler.recent_errors)],
        "batches": _batches(batches),
        "throttle": {
            "active": scheduler.throttled,
            "concurrency": scheduler.concurrency,
            "of": scheduler.workers,
            "pause_left_s": scheduler.pause_left,
            "files_put_back": scheduler.put_back,
            "last_error": scheduler.throttle_error,
        },
        "journal": {
            "path": journal.path,
            "writable": journal.write_error is None,
            "error": journal.write_error,
            "since": None if since is None else timestamp(since),
        },
        "config": config,
    }


def _recent(error: RecentError) -> RecentErrorStatus:
    return {"path": error.path, "key": error.key, "error": error.error, "at": error.at}


def _file_counts(states: Mapping[FileState, int], settling: int) -> FileCounts:
    return {
        "queued": states["queued"],
        "uploading": states["uploading"],
        "uploaded": states["uploaded"],
        "failed": states["failed"],
        "settling": settling,
    }


def _structure(watch: WatchConfig, watcher: WatcherStatistics | None) -> StructureStatus:
    """The gallery folder rules' findings for one watch (``structure`` in the config)."""
    reject = watch.structure == "reject"
    return {
        "policy": watch.structure,
        "warnings": watcher.structure_findings if watcher else 0,
        "rejected": watcher.structure_rejected if watcher else 0,
        "examples": [
            {
                "folder": f.folder,
                "rule": f.rule,
                "message": f.message,
                "pointer": f.pointer,
                "rejected": reject and f.required,
            }
            for f in (watcher.structure_examples if watcher else ())
        ],
    }


def _batches(stats: BatchStatistics | None) -> BatchesStatus:
    """Completed batches, latest first, and where their on_batch_complete hooks stand."""
    completed: list[BatchStatus] = []
    for b in stats.completed if stats else ():
        manifest = stats.manifests.get((b.watch, b.name, b.completed_at)) if stats else None
        shown: BatchStatus = {
            "watch": b.watch,
            "batch": b.name,
            "destination": b.destination,
            "files": b.files,
            "bytes": b.bytes,
            "first_uploaded_at": timestamp(b.first_uploaded_at),
            "last_uploaded_at": timestamp(b.last_uploaded_at),
            "completed_at": timestamp(b.completed_at),
            "hook": b.hook_state,
            "hook_detail": b.hook_detail,
            "manifest": manifest.path if manifest else None,
            "manifest_sha256": manifest.sha256 if manifest else None,
            "manifest_uploaded_to": manifest.uploaded_to if manifest else None,
        }
        completed.append(shown)
    return {
        "completed": completed,
        "following": stats.following if stats else 0,
        "hooks_queued": stats.hooks_queued if stats else 0,
        "hooks_running": stats.hooks_running if stats else 0,
    }


def _batch_lines(batches: BatchesStatus, shown: int = 5) -> list[str]:
    """The latest completed batches, with their hooks' outcome."""
    completed = batches.get("completed") or []
    if not completed:
        return []
    lines = ["batches complete (latest first):"]
    for b in completed[:shown]:
        text = (
            f"  {b['completed_at']} {b['watch']}/{b['batch']}: {b['files']:,} files, "
            f"{format_size(b['bytes'])} -> {b['destination']}"
        )
        if b["hook"] != "none":
            text += f"; hook {b['hook']}"
            if b.get("hook_detail") and b["hook"] != "ok":
                text += f" ({b['hook_detail']})"
        lines.append(text)
        if b.get("manifest"):
            lines.append(f"    manifest {b['manifest']} (sha256 {b['manifest_sha256']})")
        if b.get("manifest_uploaded_to"):
            lines.append(f"    manifest uploaded to {b['manifest_uploaded_to']}")
    return lines


def _counts(files: FileCounts) -> str:
    text = (
        f"{files['uploaded']:,} uploaded, {files['uploading']:,} uploading, "
        f"{files['queued']:,} queued, {files['failed']:,} failed"
    )
    if files.get("settling"):
        text += f", {files['settling']:,} settling"
    return text


def _structure_lines(structure: StructureStatus, shown: int = 3) -> list[str]:
    """A watch's structure findings, a few of them spelled out."""
    count, rejected = structure.get("warnings", 0), structure.get("rejected", 0)
    if not count and not rejected:
        return []
    plural = "" if count == 1 else "s"
    line = f"    structure ({structure['policy']}): {count:,} warning{plural} (per folder and rule)"
    if rejected:
        line += f", {rejected:,} files kept out"
    lines = [line]
    for example in structure["examples"][:shown]:
        action = "kept out" if example["rejected"] else "warning"
        lines.append(
            f"      {action} [{example['rule']}] {example['folder']}: {example['message']}"
        )
    if count > shown:
        lines.append(f"      ... {count - shown:,} more: `status --json`, or the log")
    return lines


_CREDENTIAL_STATES = {
    "refused": "REFUSED by S3, files wait for new keys",
    "waiting": "WAITING for keys, files wait",
    "expired": "EXPIRED, files wait for new keys",
    "error": "ERROR, files wait",
}


def render(status: StatusReply, errors: int = 5) -> str:
    """The status object as a person reads it (names, paths and errors escaped)."""
    status = printable_tree(status)
    lines = [
        f"cpg-daemon {status['version']}: {status['state']} for "
        f"{duration(status['uptime_s'])} (since {status['started_at']})",
        f"files: {_counts(status['files'])}",
    ]
    data = status["bytes"]
    rate = status["throughput_bytes_per_s"]
    line = f"data:  {format_size(data['uploaded'])} uploaded, {format_size(data['queued'])} to go"
    if rate > 0:
        line += f", {format_size(rate)}/s"
    eta = status.get("eta_s")
    if eta is not None:
        line += f", about {duration(eta)} left"
    lines.append(line)
    bandwidth = status.get("bandwidth") or {}
    if bandwidth.get("schedule"):
        limit = bandwidth["limit_bytes_per_s"]
        lines.append(
            f"bandwidth: {describe_rate(limit)} now (s3.max_bandwidth = {bandwidth['schedule']!r})"
        )
    journal = status.get("journal") or {}
    if journal.get("error"):
        lines.append(
            f"journal: UNWRITABLE since {journal['since']}, no new uploads start: "
            f"{journal['error']}"
        )
    throttle = status.get("throttle") or {}
    if throttle.get("active"):
        lines.append(
            f"throttled: S3 asked for fewer requests; {throttle['concurrency']} of "
            f"{throttle['of']} files at a time"
            + (f", paused {throttle['pause_left_s']} s more" if throttle["pause_left_s"] else "")
            + f" ({throttle['files_put_back']:,} files put back so far, none failed for it)"
        )
    for watch in status["watches"]:
        flag = "  [paused]" if watch["paused"] else ""
        lines.append(f"watch {watch['name']}: {watch['path']} -> {watch['destination']}{flag}")
        lines.append(f"    {_counts(watch['files'])}")
        if watch.get("error"):
            lines.append(f"    problem: {watch['error']}")
        lines += _structure_lines(watch.get("structure") or {})
    now = datetime.now(timezone.utc)
    for cred in status["credentials"]:
        state = cred["state"]
        shown = _CREDENTIAL_STATES.get(state, state)
        text = f"credentials {cred['target']} ({cred['source']}): {shown}"
        expires_at = cred.get("expires_at")
        if expires_at:
            left = (datetime.fromisoformat(expires_at) - now).total_seconds()
            text += f", expires in {duration(left)}" if left > 0 else ", expired"
        elif state == "valid":
            text += ", expiry not known"
        if cred.get("last_error"):
            label = "why" if state in ("refused", "waiting") else "last error"
            text += f" ({label}: {cred['last_error']})"
        lines.append(text)
        if cred.get("warning"):
            lines.append(f"    WARNING: {cred['warning']}")
    config = status.get("config") or {}
    if config.get("reload_error"):
        lines.append(
            f"config: the last reload failed, the previous configuration is running: "
            f"{config['reload_error']}"
        )
    if config.get("restart_needed"):
        lines.append(f"config: restart the daemon to apply {', '.join(config['restart_needed'])}")
    lines += _batch_lines(status.get("batches") or {})
    recent = status["recent_errors"][:errors]
    if recent:
        lines.append("recent errors:")
        lines += [f"  {e['at']} {e['path']}: {e['error']}" for e in recent]
    return "\n".join(lines)


def live_view(status: StatusReply) -> Any:
    """The status as a rich renderable with a progress bar per watch (``status --watch``)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    head, *rest = render(status, errors=5).split("\n")
    table = Table(box=None, pad_edge=False, expand=False)
    for column in ("watch", "progress", "uploaded", "uploading", "queued", "failed", "to go"):
        table.add_column(column, justify="left" if column in ("watch", "progress") else "right")
    for watch in status["watches"]:
        files, data = watch["files"], watch["bytes"]
        total = data["uploaded"] + data["queued"]
        name = printable(watch["name"]) + (" [paused]" if watch["paused"] else "")
        table.add_row(
            name,
            ProgressBar(total=max(total, 1), completed=data["uploaded"] if total else 1, width=30),
            f"{files['uploaded']:,}",
            f"{files['uploading']:,}",
            f"{files['queued']:,}",
            Text(f"{files['failed']:,}", style="red" if files["failed"] else ""),
            format_size(data["queued"]),
        )
    footer = [line for line in rest if not line.startswith(("watch ", "    "))]
    return Group(Text(head, style="bold"), table, Text("\n".join(footer)))
