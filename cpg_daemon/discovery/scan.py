"""The filesystem walk: which regular files lie under a watch, with their size and mtime.

Everything here blocks (``os.scandir``, ``os.stat``) and runs in worker threads
(the watcher's walks and events) or in commands that walk in a thread of their own
(``verify``, ``check``). Nothing here keeps state between calls.

Only regular files are reported. Symlinks are never followed (so nothing outside
the watch root is ever read); FIFOs, sockets and devices are left out.
"""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from cpg_daemon.core.objectkeys import PathFilter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Seen:
    """One regular file as a walk or a stat saw it."""

    rel_path: str
    """Below the watch root, ``/``-separated."""
    size: int
    mtime_ns: int


def scan_folder(root: Path, rel_dir: str, path_filter: PathFilter) -> tuple[list[Seen], list[str]]:
    """Regular files and sub-folders of one folder (relative to ``root``), filtered.

    A folder that vanished gives nothing; one that cannot be read raises ``OSError``.
    """
    files: list[Seen] = []
    folders: list[str] = []
    folder = root / rel_dir if rel_dir else root
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return files, folders
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        mode = info.st_mode
        if stat_module.S_ISDIR(mode):
            if not path_filter.excludes_dir(rel):
                folders.append(rel)
        elif stat_module.S_ISREG(mode):
            if path_filter.accepts(rel):
                files.append(Seen(rel, info.st_size, info.st_mtime_ns))
        elif stat_module.S_ISLNK(mode):
            log.debug("symlink_skipped", path=str(folder / entry.name))
    return files, folders


def walk(root: Path, path_filter: PathFilter) -> Iterator[Seen]:
    """Every file below ``root`` that the filter accepts, folders and files in name order."""
    stack = [""]
    while stack:
        files, folders = scan_folder(root, stack.pop(), path_filter)
        stack.extend(sorted(folders, reverse=True))
        yield from sorted(files, key=lambda seen: seen.rel_path)


def stat_file(path: Path) -> Seen | None:
    """Size and mtime of a regular file (``rel_path`` left empty); None if it is not one."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat_module.S_ISREG(info.st_mode):
        return None
    return Seen("", info.st_size, info.st_mtime_ns)


def restat(root: Path, rel_paths: Iterable[str]) -> tuple[list[Seen], list[str]]:
    """Files looked at again: (those still regular files, those gone or no longer files)."""
    found: list[Seen] = []
    gone: list[str] = []
    for rel in rel_paths:
        seen = stat_file(root / rel)
        if seen is None:
            gone.append(rel)
        else:
            found.append(Seen(rel, seen.size, seen.mtime_ns))
    return found, gone


def look_at(root: Path, rel_paths: Iterable[str]) -> tuple[list[Seen], list[str]]:
    """What changed paths are now: (regular files, folders), unfiltered.

    Anything that cannot be looked at (gone, unreadable), symlinks and special
    files are left out.
    """
    files: list[Seen] = []
    folders: list[str] = []
    for rel in rel_paths:
        try:
            info = os.stat(root / rel, follow_symlinks=False)
        except OSError:
            continue
        if stat_module.S_ISDIR(info.st_mode):
            folders.append(rel)
        elif stat_module.S_ISREG(info.st_mode):
            files.append(Seen(rel, info.st_size, info.st_mtime_ns))
    return files, folders


def undecodable_name(exc: BaseException) -> str | None:
    """watchfiles' message if ``exc`` (or one inside it) says a name is not UTF-8."""
    for inner in getattr(exc, "exceptions", ()):
        found = undecodable_name(inner)
        if found is not None:
            return found
    if isinstance(exc, RuntimeError) and "Unable to decode path" in str(exc):
        return str(exc)
    return None
