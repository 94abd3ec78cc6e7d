"""Filesystem events on Linux from inotify itself: every real folder, no symbolic link.

watchfiles (the notify crate) follows a symlinked folder when it sets up a recursive
watch, and has no option not to: one link to ``/usr/lib`` inside a watch cost 11,312
inotify watches (of the user's 8,192 to 65,536), and a link to ``/etc`` met folders the
daemon may not read, after which watchfiles left real folders of the watch
unwatched. Uploads never follow links, so events from behind one are of no use.

``FolderEvents`` watches each folder under the root with ``IN_DONT_FOLLOW`` and
``IN_ONLYDIR`` (the root itself may be a link: the configured path is followed),
adds watches for folders created or moved in, moves the watches of a folder renamed
inside the tree, drops those of a folder moved out, and says when the kernel's
queue overflowed (events were lost: the caller walks again). Names are bytes, decoded
as ``os.fsdecode`` does, so a name that is not UTF-8 is one more name (it stops
watchfiles). Excluded folders are not watched.

Everything here blocks (reads of the inotify descriptor, walks, ``inotify_add_watch``)
and runs in worker threads; the caller waits on the event loop for the descriptor
to be readable. One lock serialises the calls, which share the map of watches.
Linux only; elsewhere the watcher uses watchfiles.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from watchfiles import Change

log = structlog.get_logger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

FOLDER_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
"""What a watched folder reports: its entries created, written, changed, moved, deleted."""

_HEADER = struct.Struct("iIII")
"""struct inotify_event: wd, mask, cookie, len; then len bytes of NUL-padded name."""
READ_SIZE = 256 * 1024
"""Bytes read at once: at least 8,000 events of short names."""


class _Libc:
    """The three inotify calls, from the C library the interpreter runs on."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


_libc: _Libc | None = None


def _calls() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _os_error(path: str = "") -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path) if path else OSError(code, os.strerror(code))


@dataclass
class Events:
    """What one read found."""

    changes: set[tuple[Change, str]] = field(default_factory=set)
    """Absolute paths, as watchfiles reports them: deleted (or moved away), or not."""
    overflowed: bool = False
    """The kernel dropped events: anything may have changed unseen."""
    root_gone: bool = False
    """The watched folder itself was deleted or moved: nothing more comes."""


class FolderEvents:
    """The inotify watches of one tree, and the events they report."""

    def __init__(self, root: Path, skip_folder: Callable[[str], bool]) -> None:
        self._root = str(root)
        self._skip = skip_folder
        """Whether a folder (relative to the root, ``/``-separated) is excluded."""
        self._fd = -1
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._folders: dict[int, str] = {}
        """Watch descriptor -> folder, relative to the root ("" for the root)."""
        self._watches: dict[str, int] = {}
        """Folder -> watch descriptor."""
        self._root_gone = False

    def fileno(self) -> int:
        return self._fd

    @property
    def watched(self) -> int:
        """Folders watched now."""
        return len(self._watches)

    def open(self) -> None:
        """Watch the root and every real folder under it.

        Raises ``OSError``: EMFILE or ENFILE (no descriptor for the inotify
        instance), ENOSPC (the user's inotify watch limit), EACCES (the root
        cannot be read), ENOENT or ENOTDIR (no root).
        """
        calls = _calls()
        with self._lock:
            fd = calls.init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise _os_error()
            self._fd = fd
            try:
                # The root as configured, a link included; below it, links are not followed.
                self._add("", IN_ONLYDIR | FOLDER_MASK, must=True)
                self._watch_tree("")
            except BaseException:
                self._close()
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._folders.clear()
        self._watches.clear()

    def watch_folders(self, folders: Iterable[str]) -> int:
        """Watch these folders if they are not yet (found by a walk); returns how many were added.

        A folder the daemon could not read when it was created is watched once a walk
        has read it.
        """
        added = 0
        with self._lock:
            if self._fd < 0:
                return 0
            for folder in folders:
                if folder not in self._watches and self._add(folder, FOLDER_MASK | IN_DONT_FOLLOW):
                    added += 1
        return added

    def read(self) -> Events:
        """Everything the kernel has queued (without waiting), as changed paths."""
        events = Events()
        with self._lock:
            if self._fd < 0:
                events.root_gone = True
                return events
            moved_away: dict[int, str] = {}
            """Cookie -> folder moved away, until its IN_MOVED_TO says where it went."""
            arrived: list[str] = []
            while True:
                try:
                    data = os.read(self._fd, READ_SIZE)
                except BlockingIOError:
                    break
                self._parse(data, events, moved_away, arrived)
            for folder in moved_away.values():  # moved out of the tree
                self._unwatch_under(folder)
            for folder in arrived:
                if folder not in self._watches and self._add(folder, FOLDER_MASK | IN_DONT_FOLLOW):
                    self._watch_tree(folder)
            events.root_gone = self._root_gone
        return events

    def _parse(
        self, data: bytes, events: Events, moved_away: dict[int, str], arrived: list[str]
    ) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & IN_Q_OVERFLOW:
                events.overflowed = True
                continue
            if mask & IN_IGNORED:
                gone = self._folders.pop(wd, None)
                if gone is not None and self._watches.get(gone) == wd:
                    del self._watches[gone]
                if gone == "":
                    self._root_gone = True
                continue
            folder = self._folders.get(wd)
            if folder is None:
                continue  # a watch dropped a moment ago
            if not name:
                if folder == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    self._root_gone = True
                continue  # a sub-folder's own removal or move: its parent reports it
            rel = f"{folder}/{os.fsdecode(name)}" if folder else os.fsdecode(name)
            path = os.path.join(self._root, rel.replace("/", os.sep))
            is_folder = bool(mask & IN_ISDIR)
            if mask & (IN_DELETE | IN_MOVED_FROM):
                events.changes.add((Change.deleted, path))
                if is_folder and mask & IN_MOVED_FROM:
                    moved_away[cookie] = rel
                continue
            arrival = bool(mask & (IN_CREATE | IN_MOVED_TO))
            events.changes.add((Change.added if arrival else Change.modified, path))
            if not is_folder or self._skip(rel):
                continue
            if mask & IN_MOVED_TO and cookie in moved_away:
                self._rename(moved_away.pop(cookie), rel)
            elif rel not in self._watches:
                # Created, moved in from outside, or made readable (IN_ATTRIB).
                arrived.append(rel)

    def _add(self, folder: str, mask: int, *, must: bool = False) -> bool:
        """Watch one folder; False if it is gone, not a folder (a link) or unreadable.

        Raises ``OSError`` when the watch limit is reached (ENOSPC), or, with ``must``,
        for any failure.
        """
        path = os.path.join(self._root, folder.replace("/", os.sep)) if folder else self._root
        wd = _calls().add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            if must or code in (errno.ENOSPC, errno.ENOMEM, errno.EBADF):
                raise OSError(code, os.strerror(code), path)
            return False
        old = self._folders.get(wd)
        if old is not None and old != folder and self._watches.get(old) == wd:
            del self._watches[old]  # the same folder, known by an old name
        self._folders[wd] = folder
        self._watches[folder] = wd
        return True

    def _watch_tree(self, top: str) -> None:
        """Watch every real folder below ``top`` (itself already watched)."""
        stack = [top]
        while stack:
            folder = stack.pop()
            path = os.path.join(self._root, folder.replace("/", os.sep)) if folder else self._root
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue  # gone, or unreadable: a walk reports it, and watch_folders retries
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                name = os.fsdecode(entry.name)
                rel = f"{folder}/{name}" if folder else name
                if self._skip(rel) or rel in self._watches:
                    continue
                if self._add(rel, FOLDER_MASK | IN_DONT_FOLLOW):
                    stack.append(rel)

    def _rename(self, old: str, new: str) -> None:
        """A folder moved inside the tree: its watches (and its sub-folders') follow it."""
        moved = {
            wd: new + folder[len(old) :]
            for wd, folder in self._folders.items()
            if folder == old or folder.startswith(old + "/")
        }
        for wd in moved:
            was = self._folders[wd]
            if self._watches.get(was) == wd:
                del self._watches[was]
        for wd, folder in moved.items():
            self._folders[wd] = folder
            self._watches[folder] = wd

    def _unwatch_under(self, top: str) -> None:
        """A folder moved out of the tree: stop watching it and everything below it."""
        calls = _calls()
        for wd, folder in list(self._folders.items()):
            if folder == top or folder.startswith(top + "/"):
                calls.rm_watch(self._fd, wd)
                del self._folders[wd]
                if self._watches.get(folder) == wd:
                    del self._watches[folder]
