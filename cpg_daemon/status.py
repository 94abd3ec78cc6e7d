"""The status reply: component snapshots gathered into one JSON object, and its human form.

Each component offers ``statistics()`` (a frozen snapshot); ``gather`` puts
them together in the shape INTERFACE.md promises, and ``render`` turns that
object into the summary ``cpg-daemon status`` prints for a person.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from cpg_daemon import __version__
from cpg_daemon.config import WatchConfig
from cpg_daemon.credentials import CredentialStatistics
from cpg_daemon.journal import FILE_STATES, JournalStatistics
from cpg_daemon.scheduler import SchedulerStatistics
from cpg_daemon.units import format_size
from cpg_daemon.uploader import UploaderStatistics
from cpg_daemon.watcher import WatcherStatistics


def gather(
    *,
    state: str,
    started_at: datetime,
    watches: Sequence[WatchConfig],
    journal: JournalStatistics,
    scheduler: SchedulerStatistics,
    uploader: UploaderStatistics,
    watchers: Sequence[WatcherStatistics],
    credentials: Sequence[CredentialStatistics],
) -> dict[str, Any]:
    """The status object (required fields per INTERFACE.md, and a few more)."""
    settling = {w.name: w for w in watchers}
    per_watch: list[dict[str, Any]] = []
    for watch in watches:
        states = journal.by_watch.get(watch.name, {})
        files: dict[str, int] = {s: states[s].files if s in states else 0 for s in FILE_STATES}
        files["settling"] = settling[watch.name].settling if watch.name in settling else 0
        to_do = sum(states[s].bytes for s in ("queued", "uploading") if s in states)
        watcher = settling.get(watch.name)
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
            }
        )
    total_files: dict[str, int] = {s: journal.total(s).files for s in FILE_STATES}
    total_files["settling"] = sum(w["files"]["settling"] for w in per_watch)
    queued_bytes = journal.total("queued").bytes + journal.total("uploading").bytes
    throughput = uploader.throughput_bytes_per_s
    now = datetime.now(timezone.utc)
    return {
        "version": __version__,
        "state": state,
        "started_at": started_at.isoformat(timespec="seconds"),
        "uptime_s": round((now - started_at).total_seconds()),
        "files": total_files,
        "bytes": {"queued": queued_bytes, "uploaded": journal.total("uploaded").bytes},
        "throughput_bytes_per_s": throughput,
        "eta_s": round(queued_bytes / throughput) if throughput > 0 and queued_bytes else None,
        "requests_in_flight": uploader.requests_in_flight,
        "credentials": [
            {
                "target": c.target,
                "source": c.source,
                "state": c.state,
                "expires_at": c.expires_at,
                "last_error": c.last_error,
                "renewals": c.renewals,
            }
            for c in credentials
        ],
        "watches": per_watch,
        "recent_errors": [dataclasses.asdict(e) for e in reversed(scheduler.recent_errors)],
    }


def duration(seconds: float) -> str:
    """``3d 4h``, ``2h 13m``, ``5m 7s``, ``12s``."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _counts(files: dict[str, int]) -> str:
    text = (
        f"{files['uploaded']:,} uploaded, {files['uploading']:,} uploading, "
        f"{files['queued']:,} queued, {files['failed']:,} failed"
    )
    if files.get("settling"):
        text += f", {files['settling']:,} settling"
    return text


def render(status: dict[str, Any], errors: int = 5) -> str:
    """The status object as a person reads it."""
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
    if status.get("eta_s") is not None:
        line += f", about {duration(status['eta_s'])} left"
    lines.append(line)
    for watch in status["watches"]:
        flag = "  [paused]" if watch["paused"] else ""
        lines.append(f"watch {watch['name']}: {watch['path']} -> {watch['destination']}{flag}")
        lines.append(f"    {_counts(watch['files'])}")
        if watch.get("error"):
            lines.append(f"    problem: {watch['error']}")
    now = datetime.now(timezone.utc)
    for cred in status["credentials"]:
        text = f"credentials {cred['target']}: {cred['state']}"
        if cred.get("expires_at"):
            left = (datetime.fromisoformat(cred["expires_at"]) - now).total_seconds()
            text += f", expires in {duration(left)}" if left > 0 else ", expired"
        if cred.get("last_error"):
            text += f" (last error: {cred['last_error']})"
        lines.append(text)
    config = status.get("config") or {}
    if config.get("reload_error"):
        lines.append(
            f"config: the last reload failed, the previous configuration is running: "
            f"{config['reload_error']}"
        )
    if config.get("restart_needed"):
        lines.append(f"config: restart the daemon to apply {', '.join(config['restart_needed'])}")
    recent = status["recent_errors"][:errors]
    if recent:
        lines.append("recent errors:")
        lines += [f"  {e['at']} {e['path']}: {e['error']}" for e in recent]
    return "\n".join(lines)


def live_view(status: dict[str, Any]) -> Any:
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
        name = watch["name"] + (" [paused]" if watch["paused"] else "")
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
