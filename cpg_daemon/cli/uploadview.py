"""What ``cpg-daemon upload`` shows: its progress display, summary and dry run.

Three forms, chosen by the command line (``main._upload``): lines for people (names
escaped by ``printable``), one JSON document for scripts (``--json``; names as they
are, JSON escapes them), and on a terminal a live progress display (``rich``, on
standard error, so that standard output stays the summary or the document).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cpg_daemon.core.config import GALLERY_BUCKET
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.core.text import printable
from cpg_daemon.core.units import duration, format_size
from cpg_daemon.discovery.plan import plan_json, structure_lines

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from cpg_daemon.engine.dryrun import DryRun
    from cpg_daemon.engine.oneshot import UploadProgress, UploadSummary

RATE_WINDOW = 5.0
"""Seconds of sending the displayed rate (and so the ETA) is measured over."""
NAME_WIDTH = 40
"""Characters of a large file's name shown beside its bar."""


class Rate:
    """Bytes per second over the last ``RATE_WINDOW`` seconds, from a running total
    sampled with the time it was read (the caller's clock)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()

    def per_second(self) -> float | None:
        """None until a second's worth of samples is in."""
        if len(self._samples) < 2:
            return None
        (first, sent_then), (last, sent_now) = self._samples[0], self._samples[-1]
        if last - first < 1.0:
            return None
        return (sent_now - sent_then) / (last - first)


class ProgressDisplay:
    """The live display on a terminal: files and bytes done, percent, the rate over the
    last seconds and the time left, and a bar per large file being sent in parts."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._progress: Progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[amount]}", markup=False),
            TextColumn("{task.fields[speed]}", markup=False),
            console=console,
            auto_refresh=False,
            transient=False,
        )
        self._overall = self._progress.add_task(
            "listing and walking", total=None, amount="", speed=""
        )
        self._files: dict[str, TaskID] = {}
        self._rate = Rate()

    @contextmanager
    def shown(self) -> Iterator[None]:
        """Shown until the block ends; meanwhile, what is written to standard error (log
        lines) appears above it."""
        with self._progress:
            yield

    def update(self, snapshot: UploadProgress, now: float | None = None) -> None:
        """Show a snapshot taken at ``now`` (default: the monotonic clock's now)."""
        self._rate.add(time.monotonic() if now is None else now, snapshot.bytes_sent)
        rate = self._rate.per_second()
        # A file the journal has just counted may still be counted by its parts too.
        done = min(snapshot.bytes_done, snapshot.bytes)
        left = snapshot.bytes - done
        speed = "" if rate is None else f"{format_size(rate)}/s"
        if rate:
            speed += f"  ETA {duration(left / rate)}" if left > 0 else ""
        if snapshot.files_failed:
            speed += f"  {snapshot.files_failed:,} failed"
        self._progress.update(
            self._overall,
            description=f"{snapshot.files_done:,}/{snapshot.files:,} files",
            # Empty files only: their count is the measure.
            completed=done if snapshot.bytes else snapshot.files_done,
            total=snapshot.bytes or max(snapshot.files, 1),
            amount=_amount(done, snapshot.bytes),
            speed=speed,
        )
        current = {parts.key: parts for parts in snapshot.multipart}
        for key in set(self._files) - set(current):
            self._progress.remove_task(self._files.pop(key))
        for key, parts in current.items():
            if key not in self._files:
                name = printable(key.rsplit("/", 1)[-1])
                if len(name) > NAME_WIDTH:
                    name = "..." + name[-(NAME_WIDTH - 3) :]
                self._files[key] = self._progress.add_task(
                    f"  {name}", total=parts.size, amount="", speed=""
                )
            self._progress.update(
                self._files[key], completed=parts.done, amount=_amount(parts.done, parts.size)
            )
        self._progress.refresh()


def _files(count: int) -> str:
    return f"{count:,} file" if count == 1 else f"{count:,} files"


def _amount(done: int, total: int) -> str:
    return f"{format_size(done)}/{format_size(total)}"


# -- the summary ------------------------------------------------------------------------


def summary_line(summary: UploadSummary) -> str:
    rate = summary.bytes / summary.seconds if summary.seconds > 0 else 0.0
    return (
        f"{summary.files} files: {summary.uploaded} uploaded, "
        f"{summary.already_present} already present, {summary.failed} failed; "
        f"{format_size(summary.bytes)} sent in {summary.seconds:.1f} s "
        f"({format_size(rate)}/s, {summary.uploaded / max(summary.seconds, 1e-9):.1f} files/s)"
        + (
            f"; {format_size(summary.bytes_copied)} copied within S3"
            if summary.bytes_copied
            else ""
        )
    )


def _copied(summary: UploadSummary) -> str:
    copied = summary.bytes_copied
    return f"; {format_size(copied)} copied within S3" if copied else ""


def summary_json(summary: UploadSummary, source: str, destination: S3Location) -> dict[str, Any]:
    """``upload --json``: the fields README's "Machine-readable output" documents."""
    return {
        "command": "upload",
        "dry_run": False,
        "source": source,
        "destination": str(destination),
        "files": summary.files,
        "uploaded": summary.uploaded,
        "already_present": summary.already_present,
        "failed": summary.failed,
        "bytes_sent": summary.bytes,
        "bytes_copied_within_s3": summary.bytes_copied,
        "seconds": round(summary.seconds, 3),
        "failures": [{"path": path, "error": error} for path, error in summary.failures],
    }


# -- the dry run ------------------------------------------------------------------------


def dry_run_lines(result: DryRun, destination: S3Location) -> list[str]:
    """What would be sent, file by file, the folder-rule findings, and the totals; names
    escaped already (print them as they are)."""
    plan = result.plan
    lines = ["dry run: nothing is sent and no object is written"]
    if result.not_listed is not None:
        lines.append(
            f"the destination {printable(str(destination))} could not be listed, so nothing "
            f"is compared and every file is listed: {printable(result.not_listed)}"
        )
    for entry in result.entries:
        lines.append(
            f"{entry.action + ':':<7} {format_size(entry.size):>10}  "
            f"{printable(f's3://{destination.bucket}/{entry.key}')}  ({printable(entry.reason)})"
        )
    if plan.held_back:
        lines.append(f"held back: {_files(plan.held_back)} (no ready marker)")
    for rel, why in plan.bad_names:
        lines.append(f"problem: {rel}: {printable(why)} (the real run marks it failed)")
    lines += [line[2:] for line in structure_lines(plan, flag=True)]
    if plan.findings and destination.bucket != GALLERY_BUCKET:
        lines.append(
            f"(the folder rules are the Cell Painting Gallery's; {printable(destination.bucket)} "
            "is not "
            "its bucket: --structure off turns them off)"
        )
    upload_files, upload_bytes = result.total("upload")
    skip_files, skip_bytes = result.total("skip")
    lines.append(
        f"dry run: {_files(len(result.entries))} ({format_size(plan.bytes)}): "
        f"{upload_files:,} to upload ({format_size(upload_bytes)}), "
        f"{skip_files:,} already there ({format_size(skip_bytes)}); "
        f"{plan.blocked_files if plan.watch.structure == 'reject' else 0:,} kept out, "
        f"{len(plan.bad_names):,} with names S3 cannot take; {result.seconds:.1f} s"
    )
    return lines


def dry_run_errors(result: DryRun, destination: S3Location) -> list[str]:
    """``--dry-run --quiet``: only what would make the real run fail (exit status 1)."""
    plan = result.plan
    lines = []
    if result.not_listed is not None:
        lines.append(f"cannot list {printable(str(destination))}: {printable(result.not_listed)}")
    lines += [f"problem: {rel}: {printable(why)}" for rel, why in plan.bad_names]
    if plan.watch.structure == "reject":
        lines += [
            f"kept out by --structure reject: {printable(entry.finding.folder)} "
            f"({_files(entry.files)}): [{entry.finding.rule}] {printable(entry.finding.message)}"
            for entry in plan.findings.values()
            if entry.finding.required
        ]
    return lines


def dry_run_json(result: DryRun, source: str, destination: S3Location) -> dict[str, Any]:
    """``upload --dry-run --json``: the fields README's "Machine-readable output" documents."""
    upload_files, upload_bytes = result.total("upload")
    skip_files, skip_bytes = result.total("skip")
    return {
        "command": "upload",
        "dry_run": True,
        "source": source,
        "destination": str(destination),
        "listed": result.not_listed is None,
        "not_listed": result.not_listed,
        "files": len(result.entries),
        "bytes": result.plan.bytes,
        "to_upload": {"files": upload_files, "bytes": upload_bytes},
        "already_present": {"files": skip_files, "bytes": skip_bytes},
        "entries": [
            {
                "path": e.path,
                "key": e.key,
                "size": e.size,
                "action": e.action,
                "reason": e.reason,
            }
            for e in result.entries
        ],
        "plan": plan_json(result.plan),
        "seconds": round(result.seconds, 3),
    }
