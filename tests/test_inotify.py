"""The inotify watches of one tree (Linux): real folders only, moves followed, names as bytes.

The kernel queues an event during the system call that causes it, so each test reads
right after changing the tree; nothing waits. The number of watches is read from the
kernel (``/proc/self/fdinfo``), not from the object's own count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cpg_daemon.core.objectkeys import PathFilter

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")

if sys.platform == "linux":
    from cpg_daemon.discovery.inotify import FolderEvents


def kernel_watches(events: FolderEvents) -> int:
    """Watches the kernel holds for this inotify instance."""
    info = Path(f"/proc/self/fdinfo/{events.fileno()}").read_text()
    return sum(line.startswith("inotify wd:") for line in info.splitlines())


def opened(root: Path, exclude: tuple[str, ...] = ()) -> FolderEvents:
    events = FolderEvents(root, PathFilter((), exclude).excludes_dir)
    events.open()
    return events


def changed(events: FolderEvents, root: Path) -> set[tuple[str, str]]:
    """What one read reports: (change, path below the root)."""
    found = events.read()
    return {(change.name, os.path.relpath(path, root)) for change, path in found.changes}


def test_a_symlinked_folder_is_neither_watched_nor_reported_from(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    for i in range(40):
        (outside / f"d{i}" / "sub").mkdir(parents=True)
    root = tmp_path / "watch"
    (root / "Plate1" / "Images").mkdir(parents=True)
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "Plate1" / "link").symlink_to(outside / "d0", target_is_directory=True)
    events = opened(root)
    try:
        assert kernel_watches(events) == events.watched == 3  # root, Plate1, Plate1/Images
        (outside / "d3" / "sub" / "f.tif").write_bytes(b"x")  # reached only through a link
        (root / "Plate1" / "Images" / "a.tif").write_bytes(b"x")
        assert ("added", "Plate1/Images/a.tif") in changed(events, root)
        (outside / "d0" / "g.tif").write_bytes(b"x")
        assert changed(events, root) == set()
        # A link to a folder made later is one entry, not a new watch.
        (root / "later").symlink_to(outside, target_is_directory=True)
        assert changed(events, root) == {("added", "later")}
        assert kernel_watches(events) == 3
    finally:
        events.close()


def test_the_root_may_be_a_link_to_the_watched_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "a").mkdir(parents=True)
    (tmp_path / "data").symlink_to(real, target_is_directory=True)
    events = opened(tmp_path / "data")
    try:
        assert kernel_watches(events) == 2
        (real / "a" / "f.tif").write_bytes(b"x")
        assert ("added", "a/f.tif") in changed(events, tmp_path / "data")
    finally:
        events.close()


def test_folders_made_or_moved_in_are_watched_and_their_files_reported(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere" / "Batch"
    (elsewhere / "Plate" / "Images").mkdir(parents=True)
    events = opened(root)
    try:
        (root / "new" / "deep").mkdir(parents=True)
        assert ("added", "new") in changed(events, root)
        (root / "new" / "deep" / "f.tif").write_bytes(b"x")
        assert ("added", "new/deep/f.tif") in changed(events, root)
        os.rename(elsewhere, root / "Batch")
        assert changed(events, root) == {("added", "Batch")}
        assert kernel_watches(events) == 6
        (root / "Batch" / "Plate" / "Images" / "g.tif").write_bytes(b"x")
        assert ("added", "Batch/Plate/Images/g.tif") in changed(events, root)
    finally:
        events.close()


def test_a_folder_renamed_inside_the_tree_reports_its_new_paths(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    (root / "a" / "b").mkdir(parents=True)
    events = opened(root)
    try:
        os.rename(root / "a", root / "z")
        assert changed(events, root) == {("deleted", "a"), ("added", "z")}
        (root / "z" / "b" / "f.tif").write_bytes(b"x")
        assert ("added", "z/b/f.tif") in changed(events, root)
        assert kernel_watches(events) == 3
    finally:
        events.close()


def test_a_folder_moved_out_is_no_longer_watched(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    (root / "a" / "b").mkdir(parents=True)
    events = opened(root)
    try:
        os.rename(root / "a", tmp_path / "gone")
        assert changed(events, root) == {("deleted", "a")}
        (tmp_path / "gone" / "b" / "f.tif").write_bytes(b"x")
        assert changed(events, root) == set()
        assert kernel_watches(events) == 1
    finally:
        events.close()


def test_a_name_that_is_not_utf8_is_reported_like_any_other(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    root.mkdir()
    events = opened(root)
    try:
        name = b"plate\xff.tif"
        with open(os.fsencode(root) + b"/" + name, "wb") as handle:
            handle.write(b"x")
        assert ("added", os.fsdecode(name)) in changed(events, root)
    finally:
        events.close()


def test_an_excluded_folder_is_not_watched(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    (root / "keep").mkdir(parents=True)
    (root / "scratch" / "deep").mkdir(parents=True)
    events = opened(root, exclude=("scratch",))
    try:
        assert kernel_watches(events) == 2
        (root / "scratch" / "deep" / "f.tif").write_bytes(b"x")
        assert changed(events, root) == set()
    finally:
        events.close()


def test_a_folder_a_walk_found_first_is_watched_once(tmp_path: Path) -> None:
    """The watcher hands over the folders its walks read (one unreadable when it was
    made, say); those already watched are not watched twice."""
    root = tmp_path / "watch"
    root.mkdir()
    events = opened(root)
    try:
        (root / "late" / "deeper").mkdir(parents=True)
        assert events.watch_folders(["late", "late/deeper", "nosuch"]) == 2
        assert changed(events, root) == {("added", "late")}
        assert events.watch_folders(["late", "late/deeper"]) == 0
        assert kernel_watches(events) == 3
        (root / "late" / "deeper" / "f.tif").write_bytes(b"x")
        assert ("added", "late/deeper/f.tif") in changed(events, root)
    finally:
        events.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_folder_unreadable_when_made_is_watched_once_it_is_readable(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    root.mkdir()
    events = opened(root)
    try:
        (root / "locked").mkdir(mode=0)
        assert changed(events, root) == {("added", "locked")}
        assert kernel_watches(events) == 1
        (root / "locked").chmod(0o755)  # IN_ATTRIB on the folder
        assert ("modified", "locked") in changed(events, root)
        assert kernel_watches(events) == 2
    finally:
        events.close()


def test_deleting_the_root_ends_the_events(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    root.mkdir()
    events = opened(root)
    try:
        root.rmdir()
        assert events.read().root_gone
    finally:
        events.close()
