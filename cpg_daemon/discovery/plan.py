"""The dry-run plan ``cpg-daemon check`` prints: what each watch would upload, and why not.

One walk of the watched folder with the watcher's own rules (``scan.walk``,
the include/exclude globs, the ready marker, names S3 cannot take, and the
gallery's folder rules under the watch's ``structure`` policy), touching no
server and no journal. Settle times are ignored: a file still being written
would be uploaded once it settles.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import PathFilter, key_problem
from cpg_daemon.core.structure import RULES, Finding, check_key
from cpg_daemon.core.text import printable
from cpg_daemon.core.units import format_size
from cpg_daemon.discovery.admission import ReadyMarker
from cpg_daemon.discovery.scan import Seen, walk

FIRST_KEYS = 5
"""Keys of the plan shown by name."""
BAD_NAMES_SHOWN = 5


@dataclass
class FolderFinding:
    """One structure finding, as many files in its folder share it."""

    finding: Finding
    files: int = 0


@dataclass
class WatchPlan:
    """What one walk of a watch found."""

    watch: WatchConfig
    files: int = 0
    """Files that would be uploaded."""
    bytes: int = 0
    first_keys: list[str] = field(default_factory=list)
    findings: dict[tuple[str, str], FolderFinding] = field(default_factory=dict)
    """(folder, rule) -> finding and how many files have it, in the order found."""
    blocked_files: int = 0
    """Files with a finding that ``structure = "reject"`` keeps out (whatever the policy)."""
    blocked_bytes: int = 0
    bad_names: list[tuple[str, str]] = field(default_factory=list)
    """(path below the watch, why S3 cannot take its key)."""
    held_back: int = 0
    """Files in top-level folders that have no ready marker yet."""
    seconds: float = 0.0
    admitted: list[tuple[str, Seen]] = field(default_factory=list)
    """(key, file) of every file that would be uploaded, when asked for (``keep``)."""

    @property
    def problems(self) -> int:
        """What the daemon would fail or keep out: names S3 cannot take, and rejects.

        Structure warnings are not problems: under ``warn`` the files are uploaded
        as they are, which is what the policy asks for.
        """
        rejected = self.watch.structure == "reject" and self.blocked_files > 0
        return len(self.bad_names) + int(rejected)


def plan_watch(
    watch: WatchConfig,
    clock: Clock = SYSTEM_CLOCK,
    *,
    keep: bool = False,
    found: Iterable[Seen] | None = None,
) -> WatchPlan:
    """Walks ``watch.path`` (in sorted order, so the plan reads the same every time);
    ``seconds`` is how long that took on ``clock``; ``keep``: list every file that
    would be uploaded in ``admitted`` (``upload --dry-run``); ``found``: the files
    already listed (an S3 source's objects, which the watch's filter accepted)."""
    started = clock.monotonic()
    plan = WatchPlan(watch)
    path_filter = PathFilter(watch.include, watch.exclude)
    marker = ReadyMarker(watch.ready_marker)
    marked: dict[str, bool] = {}
    rules = watch.structure != "off"
    reject = watch.structure == "reject"
    for seen in walk(watch.path, path_filter) if found is None else found:
        rel = seen.rel_path
        if marker.is_marker(rel):
            continue
        folder = marker.folder(rel)
        if folder is not None:
            if folder not in marked:
                marked[folder] = bool(marker.present(watch.path, (folder,)))
            if not marked[folder]:
                plan.held_back += 1
                continue
        key = watch.key_for(rel)
        problem = key_problem(key)
        if problem is not None:
            plan.bad_names.append((printable(rel), problem))
            continue
        if rules and _note(plan, check_key(key), seen.size) and reject:
            continue
        plan.files += 1
        plan.bytes += seen.size
        if len(plan.first_keys) < FIRST_KEYS:
            plan.first_keys.append(key)
        if keep:
            plan.admitted.append((key, seen))
    plan.seconds = clock.monotonic() - started
    return plan


def _note(plan: WatchPlan, findings: list[Finding], size: int) -> bool:
    """Counts a file's findings; True when one of them would keep it out under reject."""
    blocked = False
    for finding in findings:
        entry = plan.findings.get((finding.folder, finding.rule))
        if entry is None:
            entry = plan.findings[finding.folder, finding.rule] = FolderFinding(finding)
        entry.files += 1
        blocked = blocked or finding.required
    if blocked:
        plan.blocked_files += 1
        plan.blocked_bytes += size
    return blocked


def _files(count: int) -> str:
    return f"{count:,} file" if count == 1 else f"{count:,} files"


def describe_plan(plan: WatchPlan) -> list[str]:
    """The plan as indented lines under the watch's ``watch NAME: PATH -> DEST`` line."""
    watch = plan.watch
    lines = [
        f"  plan: {_files(plan.files)}, {format_size(plan.bytes)} ({plan.bytes:,} bytes) to upload "
        f"(walked in {plan.seconds:.1f} s)"
    ]
    lines += [f"    {printable(key)}" for key in plan.first_keys]
    if plan.files > len(plan.first_keys):
        lines.append(f"    ... and {plan.files - len(plan.first_keys):,} more")
    if plan.held_back:
        lines.append(
            f"  held back: {_files(plan.held_back)} in folders without {watch.ready_marker} yet"
        )
    if plan.bad_names:
        lines.append(f"  problem: {_files(len(plan.bad_names))} with names S3 cannot take:")
        lines += [f"    {rel}: {printable(why)}" for rel, why in plan.bad_names[:BAD_NAMES_SHOWN]]
        if len(plan.bad_names) > BAD_NAMES_SHOWN:
            lines.append(f"    ... and {len(plan.bad_names) - BAD_NAMES_SHOWN:,} more")
    return lines + structure_lines(plan)


def structure_lines(plan: WatchPlan, flag: bool = False) -> list[str]:
    """The gallery folder-rule findings of a plan, one per folder and rule, and what
    ``structure = "reject"`` would keep out (``flag``: the policy named as the command
    line's ``--structure`` rather than the config's key)."""
    watch = plan.watch
    lines: list[str] = []

    def policy(value: str) -> str:
        return f"--structure {value}" if flag else f'structure = "{value}"'

    if watch.structure == "off":
        lines.append(f"  structure: not checked ({policy('off')})")
        return lines
    if not plan.findings:
        lines.append(f"  structure: follows the gallery's folder rules ({policy(watch.structure)})")
        return lines
    lines.append(
        f"  structure ({policy(watch.structure)}): {len(plan.findings):,} "
        f"warning{'s' if len(plan.findings) != 1 else ''}, "
        "one per folder and rule:"
    )
    by_rule: dict[str, list[FolderFinding]] = {}
    for entry in plan.findings.values():
        by_rule.setdefault(entry.finding.rule, []).append(entry)
    for rule in sorted(by_rule, key=list(RULES).index):
        entries = by_rule[rule]
        lines.append(f"    [{rule}] see {entries[0].finding.pointer}")
        for entry in entries:
            kind = "required" if entry.finding.required else "advice"
            lines.append(
                f"      {printable(entry.finding.folder)} ({_files(entry.files)}, {kind}): "
                f"{printable(entry.finding.message)}"
            )
    blocked = f"{_files(plan.blocked_files)} ({format_size(plan.blocked_bytes)})"
    if watch.structure == "reject" and plan.blocked_files:
        lines.append(
            f"  problem: {blocked} kept out by {policy('reject')} (marked failed, "
            "with the rule, until the names are fixed)"
        )
    elif plan.blocked_files:
        lines.append(
            f"  with {policy('reject')}, {blocked} would be kept out; "
            f"with {policy(watch.structure)} they are uploaded as they are"
        )
    else:
        lines.append(f"  with {policy('reject')} nothing would be kept out (all are advice)")
    return lines


def plan_json(plan: WatchPlan) -> dict[str, Any]:
    """The plan for ``--json`` documents (``check``, ``upload --dry-run``); names as they
    are (JSON escapes what a terminal would act on)."""
    return {
        "files": plan.files,
        "bytes": plan.bytes,
        "first_keys": plan.first_keys,
        "held_back": plan.held_back,
        "bad_names": [{"path": rel, "problem": why} for rel, why in plan.bad_names],
        "structure": {
            "policy": plan.watch.structure,
            "findings": [
                {
                    "rule": entry.finding.rule,
                    "folder": entry.finding.folder,
                    "required": entry.finding.required,
                    "message": entry.finding.message,
                    "pointer": entry.finding.pointer,
                    "files": entry.files,
                }
                for entry in plan.findings.values()
            ],
            "blocked_files": plan.blocked_files,
            "blocked_bytes": plan.blocked_bytes,
        },
        "seconds": round(plan.seconds, 3),
    }
