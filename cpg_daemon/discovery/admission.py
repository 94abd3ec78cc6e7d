"""Which settled files go to the journal, which wait, and which are kept out and why.

The policy of one watch, applied to each settled file in turn:

1. **Ready marker.** With ``ready_marker`` set, a file in a top-level folder waits
   until that folder holds the marker file; the marker itself is a signal, not data.
2. **Names S3 cannot take.** The file is recorded as failed, once (not at every rescan).
3. **The gallery's folder rules** (``structure``). Each (folder, rule) is logged once;
   under ``reject`` a file with a required finding is recorded as failed with the
   rule's message, once per version of the file. A file uploaded before the policy
   became ``reject`` stays uploaded until it changes.
4. **Already at the destination?** On the first walk of a watch the journal has
   never seen, a file whose key is listed at the destination with its size is
   checked on the server before upload instead of being sent again (every file is,
   when the destination could not be listed).

Nothing here touches the filesystem or writes the journal except ``ReadyMarker.present``
(blocking; run it in a worker thread): the watcher records what ``Admission.admit``
decides, and the one journal read the folder rules need goes through ``Rows``.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import key_problem
from cpg_daemon.core.structure import Finding, blocking, check_key
from cpg_daemon.discovery.scan import Seen
from cpg_daemon.journal import Discovered, Refusal

log = structlog.get_logger(__name__)

STRUCTURE_EXAMPLES = 20
"""Structure findings kept for status (the log has every one, once per folder and rule)."""


class FileVersion(Protocol):
    """What the journal knows of a file, as far as admission asks."""

    @property
    def state(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


class Rows(Protocol):
    """The journal, as admission reads it (``Journal`` is one)."""

    async def get(self, watch: str, rel_path: str) -> FileVersion | None: ...


@dataclass(frozen=True)
class Rejection:
    """A file kept out: record it as failed with ``reason``, and tell the user."""

    rel_path: str
    key: str
    """The key as shown (a name that is not UTF-8 has its bytes escaped)."""
    reason: str
    failure: Refusal
    """Why, as the journal records it: a name S3 cannot take, or the folder rules."""


@dataclass(frozen=True)
class StructureStatistics:
    findings: int
    """Distinct (folder, rule) structure findings seen since the watch started."""
    examples: tuple[Finding, ...]
    """The first ``STRUCTURE_EXAMPLES`` of them."""
    rejected: int
    """Files kept out by ``structure = "reject"``."""


@dataclass(frozen=True)
class ReadyMarker:
    """The ``ready_marker`` rule: files in a top-level folder wait for its marker file."""

    name: str
    """The marker's file name; empty when the watch has none."""

    def is_marker(self, rel_path: str) -> bool:
        """Whether this is a marker file (in the root, or directly in a top-level folder)."""
        if not self.name:
            return False
        top, sep, rest = rel_path.partition("/")
        return rest == self.name if sep else top == self.name

    def folder(self, rel_path: str) -> str | None:
        """The top-level folder whose marker ``rel_path`` waits for, if any."""
        if not self.name:
            return None
        top, sep, _ = rel_path.partition("/")
        return top if sep else None

    def marks(self, rel_path: str) -> str | None:
        """The folder a marker file at ``rel_path`` marks ready (to be walked now)."""
        if self.is_marker(rel_path) and "/" in rel_path:
            return rel_path.split("/", 1)[0]
        return None

    def folders(self, found: Iterable[Seen]) -> set[str]:
        """The top-level folders whose markers decide whether these files go on."""
        return {
            folder
            for seen in found
            if not self.is_marker(seen.rel_path)
            and (folder := self.folder(seen.rel_path)) is not None
        }

    def present(self, root: Path, folders: Collection[str]) -> frozenset[str]:
        """Those of ``folders`` (below ``root``) that hold the marker now. Blocking."""
        return frozenset(folder for folder in folders if (root / folder / self.name).is_file())


class Admission:
    """The admission policy of one watch, with what it remembers between walks."""

    def __init__(self, watch: WatchConfig, rows: Rows) -> None:
        self._watch = watch
        self._rows = rows
        self.marker = ReadyMarker(watch.ready_marker)
        self._bad_names: set[str] = set()
        """Files already recorded as failed for their name (once, not at every rescan)."""
        self._structure_seen: set[tuple[str, str]] = set()
        self._structure_examples: list[Finding] = []
        self._structure_rejected = 0
        self._kept_out: dict[str, tuple[int, int, bool]] = {}
        """rel_path -> (size, mtime_ns, recorded as failed) of files ``reject`` kept out."""
        self._remote_sizes: Mapping[str, int] | None = None
        self._check_all = False

    def expect_remote(self, sizes: Mapping[str, int] | None) -> None:
        """What the destination already holds, before a first walk.

        ``sizes`` maps keys to object sizes: a file of the listed size is checked
        on the server before upload. None means the destination could not be
        listed: every file is checked. Until ``first_walk_done``.
        """
        self._remote_sizes = sizes
        self._check_all = sizes is None

    def first_walk_done(self) -> None:
        """Files found from now on are new: upload them without looking first."""
        self._remote_sizes = None
        self._check_all = False

    @property
    def remote_sizes(self) -> Mapping[str, int] | None:
        return self._remote_sizes

    @property
    def check_all(self) -> bool:
        return self._check_all

    def statistics(self) -> StructureStatistics:
        return StructureStatistics(
            len(self._structure_seen),
            tuple(self._structure_examples),
            self._structure_rejected,
        )

    async def admit(self, seen: Seen, marked: Container[str]) -> Discovered | Rejection | None:
        """Decides one settled file; None means not now (waiting, or decided before).

        ``marked``: the top-level folders that hold their ready marker
        (``marker.present``).
        """
        if self.marker.is_marker(seen.rel_path):
            return None
        folder = self.marker.folder(seen.rel_path)
        if folder is not None and folder not in marked:
            return None
        key = self._watch.key_for(seen.rel_path)
        problem = key_problem(key)
        if problem is not None:
            if seen.rel_path in self._bad_names:
                return None
            self._bad_names.add(seen.rel_path)
            shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
            log.warning("bad_name", path=shown, error=problem)
            return Rejection(seen.rel_path, shown, problem, "bad-name")
        if self._watch.structure != "off":
            kept_out = await self._keep_out(seen, key)
            if isinstance(kept_out, Rejection):
                return kept_out
            if kept_out:
                return None
        check = self._check_all or (
            self._remote_sizes is not None and self._remote_sizes.get(key) == seen.size
        )
        destination = self._watch.destination
        return Discovered(
            seen.rel_path, destination.bucket, key, seen.size, seen.mtime_ns, check_remote=check
        )

    async def _keep_out(self, seen: Seen, key: str) -> Rejection | bool:
        """Applies the folder rules; a Rejection to record, True if kept out already, or False."""
        findings = check_key(key)
        if not findings:
            return False
        reject = blocking(findings) if self._watch.structure == "reject" else None
        self._note(findings, seen, rejecting=reject is not None)
        if reject is None:
            return False
        version = (seen.size, seen.mtime_ns)
        before = self._kept_out.get(seen.rel_path)
        if before is not None and before[:2] == version:
            return True  # handled at an earlier walk
        # Claimed before the journal is asked: a walk running meanwhile (a rescan
        # beside the first walk) returns above instead of counting the file twice.
        self._kept_out[seen.rel_path] = (*version, before is not None and before[2])
        row = await self._rows.get(self._watch.name, seen.rel_path)
        if row is not None and (row.state, row.key, row.size, row.mtime_ns) == (
            "uploaded",
            key,
            *version,
        ):
            self._kept_out[seen.rel_path] = (*version, False)
            return True
        if row is not None and row.state == "uploading":
            # Queued before the policy said reject; decided at the next walk.
            if before is None:
                del self._kept_out[seen.rel_path]
            else:
                self._kept_out[seen.rel_path] = before
            return True
        if before is None or not before[2]:
            self._structure_rejected += 1
        self._kept_out[seen.rel_path] = (*version, True)
        reason = f'kept out by structure = "reject": {reject}'
        return Rejection(seen.rel_path, key, reason, "rejected")

    def _note(self, findings: list[Finding], seen: Seen, *, rejecting: bool) -> None:
        """Logs each (folder, rule) the first time it is found; keeps the first as examples."""
        for finding in findings:
            if (finding.folder, finding.rule) in self._structure_seen:
                continue
            self._structure_seen.add((finding.folder, finding.rule))
            if len(self._structure_examples) < STRUCTURE_EXAMPLES:
                self._structure_examples.append(finding)
            log.warning(
                "structure_rejected" if rejecting and finding.required else "structure_warning",
                watch=self._watch.name,
                rule=finding.rule,
                folder=finding.folder,
                message=finding.message,
                pointer=finding.pointer,
                path=str(self._watch.path / seen.rel_path),
            )
