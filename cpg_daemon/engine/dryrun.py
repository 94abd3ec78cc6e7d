"""``cpg-daemon upload --dry-run``: what an upload would send, sending nothing.

The source is walked with the upload's own rules (``discovery.plan``: the include and
exclude globs, names S3 cannot take, the gallery's folder rules under the chosen
policy), then each file is compared with the destination as the real run compares it:

- no object under its key: upload (new);
- an object of another size: upload (it replaces that object);
- an object of the same size that this upload's journal recorded as its own (same
  size, mtime and ETag): skip, nothing read;
- any other object of the same size is asked for its checksum (HeadObject): a
  full-object checksum the file reproduces (the file is read) means skip, one it does
  not means upload; an object without one is sent again by the real run, so: upload.

A destination that cannot be listed (no keys, no permission, no network) is said, and
every file is then listed as to upload. Nothing is written anywhere: no object, and no
journal (the upload's own is read, read-only, when it exists).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from cpg_daemon.core import files
from cpg_daemon.core.config import CredentialsConfig, S3Config, WatchConfig
from cpg_daemon.core.errors import CpgError
from cpg_daemon.core.units import format_size
from cpg_daemon.discovery.plan import WatchPlan, plan_watch
from cpg_daemon.discovery.scan import Seen
from cpg_daemon.engine.dataset import open_store
from cpg_daemon.engine.sources import ObjectSource
from cpg_daemon.engine.uploader import same_content, whole_checksum
from cpg_daemon.engine.verify import Uploaded, journal_uploads
from cpg_daemon.s3.credentials import ProfileMissingError
from cpg_daemon.s3.store import RemoteObject, Storage

Action = Literal["upload", "skip"]
CHECKERS = 16
"""Objects of the same size as their file looked at (and files read) at once, at most."""


@dataclass(frozen=True)
class Planned:
    """What the real run would do with one file."""

    path: str
    """Below the source, ``/``-separated."""
    key: str
    size: int
    action: Action
    reason: str


@dataclass
class DryRun:
    plan: WatchPlan
    """The walk: files, bytes, names S3 cannot take, folder-rule findings."""
    entries: list[Planned] = field(default_factory=list)
    not_listed: str | None = None
    """Why the destination could not be compared (every file is then to upload)."""
    seconds: float = 0.0

    def total(self, action: Action) -> tuple[int, int]:
        """(files, bytes) of one action."""
        chosen = [entry.size for entry in self.entries if entry.action == action]
        return len(chosen), sum(chosen)

    @property
    def problems(self) -> int:
        """What would make the real run exit 1: files it would fail or keep out, or a
        destination it cannot list (it lists before it sends anything)."""
        return self.plan.problems + int(self.not_listed is not None)


async def dry_run(
    watch: WatchConfig,
    s3: S3Config,
    credentials: CredentialsConfig,
    journal: Path,
    *,
    state_dir: Path | None = None,
    objects: ObjectSource | None = None,
) -> DryRun:
    """Walk, list and compare (``state_dir``: where handed-over keys are kept;
    ``objects``: an S3 SRC, listed instead of a folder walked, its objects read through
    where a checksum must be computed)."""
    started = time.monotonic()
    found = None if objects is None else [seen async for seen in objects.objects(watch)]
    plan = await anyio.to_thread.run_sync(partial(plan_watch, watch, keep=True, found=found))
    result = DryRun(plan)
    destination = watch.destination
    try:
        async with open_store(s3, credentials, state_dir) as store:
            remote = {
                obj.key: obj
                async for obj in store.list_objects(destination.bucket, destination.prefix)
            }
            recorded = await anyio.to_thread.run_sync(journal_uploads, journal, watch.name)
            comparison = _Comparison(watch, store, remote, recorded or {}, objects)
            result.entries = await comparison.run(plan.admitted)
    except ProfileMissingError:
        raise  # a mistake in the command, as for the real run
    except CpgError as exc:
        result.not_listed = str(exc)
        result.entries = [
            Planned(seen.rel_path, key, seen.size, "upload", "not compared")
            for key, seen in plan.admitted
        ]
    result.seconds = time.monotonic() - started
    return result


class _Comparison:
    """Each file against the listed destination, as ``Uploader.upload`` would decide."""

    def __init__(
        self,
        watch: WatchConfig,
        store: Storage,
        remote: Mapping[str, RemoteObject],
        recorded: Mapping[str, Uploaded],
        objects: ObjectSource | None = None,
    ) -> None:
        self._watch = watch
        self._store = store
        self._remote = remote
        self._recorded = recorded
        self._objects = objects

    async def run(self, admitted: list[tuple[str, Seen]]) -> list[Planned]:
        entries: list[Planned | None] = [None] * len(admitted)
        to_look: list[int] = []
        for index, (key, seen) in enumerate(admitted):
            decided = self._from_listing(key, seen)
            if decided is None:
                to_look.append(index)
            entries[index] = decided
        pending = iter(to_look)

        async def looker() -> None:
            for index in pending:
                entries[index] = await self._look(*admitted[index])

        async with anyio.create_task_group() as tg:
            for _ in range(min(CHECKERS, len(to_look))):
                tg.start_soon(looker)
        return [entry for entry in entries if entry is not None]

    def _from_listing(self, key: str, seen: Seen) -> Planned | None:
        """The decision the listing and the journal make alone, or None (look closer)."""
        listed = self._remote.get(key)
        if listed is None:
            return Planned(seen.rel_path, key, seen.size, "upload", "new")
        if listed.size != seen.size:
            there = f"replaces an object of {format_size(listed.size)}"
            return Planned(seen.rel_path, key, seen.size, "upload", there)
        uploaded = self._recorded.get(seen.rel_path)
        if (
            uploaded is not None
            and uploaded.key == key
            and (uploaded.size, uploaded.mtime_ns) == (seen.size, seen.mtime_ns)
            and uploaded.etag.strip('"') == listed.etag.strip('"')
        ):
            reason = "already there: this command uploaded it, same ETag"
            return Planned(seen.rel_path, key, seen.size, "skip", reason)
        return None

    async def _look(self, key: str, seen: Seen) -> Planned:
        """HeadObject, and the file's checksum when the object has one to compare."""

        def planned(action: Action, reason: str) -> Planned:
            return Planned(seen.rel_path, key, seen.size, action, reason)

        try:
            head = await self._store.head(self._watch.destination.bucket, key)
            if head is None:
                return planned("upload", "new")
            found = whole_checksum(head)
            if found is None:
                return planned("upload", "same size, but no full-object checksum to compare")
            expected = files.FileStat(seen.size, seen.mtime_ns)
            rel = seen.rel_path
            source = self._watch.path / rel if self._objects is None else self._objects.file(rel)
            if await same_content(head, source, expected) is not None:
                return planned("skip", f"already there: same size and {found[0]}")
            return planned("upload", f"same size, different {found[0]}")
        except CpgError as exc:
            return planned("upload", f"not compared: {exc}")
