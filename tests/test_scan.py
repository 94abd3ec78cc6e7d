"""The filesystem walk: regular files only, links never followed, names as they are."""

from __future__ import annotations

import os
from pathlib import Path

from cpg_daemon.core.objectkeys import PathFilter
from cpg_daemon.discovery.scan import (
    Seen,
    look_at,
    restat,
    scan_folder,
    stat_file,
    undecodable_name,
    walk,
)

EVERYTHING = PathFilter(("**",), ())


def tree(root: Path, *files: str) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())


def test_walk_gives_regular_files_in_name_order_folder_by_folder(tmp_path: Path) -> None:
    tree(tmp_path, "b.txt", "a/z.txt", "a/b/c.txt", "a/a.txt", "c/d.txt")
    seen = list(walk(tmp_path, EVERYTHING))
    assert [s.rel_path for s in seen] == ["b.txt", "a/a.txt", "a/z.txt", "a/b/c.txt", "c/d.txt"]
    info = (tmp_path / "a/z.txt").stat()
    assert seen[2] == Seen("a/z.txt", info.st_size, info.st_mtime_ns)


def test_walk_applies_the_filter_to_files_and_folders(tmp_path: Path) -> None:
    tree(tmp_path, "keep.tiff", "skip.txt", "tmp/keep.tiff", "P1/keep.tiff")
    path_filter = PathFilter(("**/*.tiff",), ("tmp/**",))
    assert [s.rel_path for s in walk(tmp_path, path_filter)] == ["keep.tiff", "P1/keep.tiff"]


def test_links_and_special_files_are_left_out_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    tree(outside, "secret.txt")
    root = tmp_path / "root"
    tree(root, "real.txt")
    (root / "file-link").symlink_to(outside / "secret.txt")
    (root / "folder-link").symlink_to(outside)
    os.mkfifo(root / "fifo")
    assert [s.rel_path for s in walk(root, EVERYTHING)] == ["real.txt"]
    assert stat_file(root / "file-link") is None
    assert stat_file(root / "fifo") is None
    assert look_at(root, ["file-link", "folder-link", "fifo", "real.txt"])[1] == []


def test_a_name_that_is_not_utf8_is_walked_as_the_os_gives_it(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"caf\xe9.tiff")).write_bytes(b"x")
    [seen] = walk(tmp_path, EVERYTHING)
    assert os.fsencode(seen.rel_path) == b"caf\xe9.tiff"


def test_a_folder_that_vanished_or_is_a_file_gives_nothing(tmp_path: Path) -> None:
    tree(tmp_path, "file.txt")
    assert scan_folder(tmp_path, "gone", EVERYTHING) == ([], [])
    assert scan_folder(tmp_path, "file.txt", EVERYTHING) == ([], [])


def test_restat_tells_files_still_there_from_those_gone(tmp_path: Path) -> None:
    tree(tmp_path, "a.txt", "P1/b.txt")
    (tmp_path / "P1/c.txt").mkdir()  # replaced by a folder: no longer a file
    found, gone = restat(tmp_path, ["a.txt", "P1/b.txt", "P1/gone.txt", "P1/c.txt"])
    assert [s.rel_path for s in found] == ["a.txt", "P1/b.txt"]
    assert found[1].size == len(b"P1/b.txt")
    assert gone == ["P1/gone.txt", "P1/c.txt"]


def test_look_at_sorts_changed_paths_into_files_and_folders(tmp_path: Path) -> None:
    tree(tmp_path, "P1/a.txt", "P2/b.txt")
    files, folders = look_at(tmp_path, ["P1/a.txt", "P2", "gone.txt"])
    assert [s.rel_path for s in files] == ["P1/a.txt"]
    assert folders == ["P2"]


class Grouped(Exception):
    """Exceptions grouped as a task group raises them (an ExceptionGroup on Python 3.11)."""

    def __init__(self, *exceptions: Exception) -> None:
        super().__init__("grouped")
        self.exceptions = exceptions


def test_undecodable_name_finds_watchfiles_message_inside_exception_groups() -> None:
    message = "Unable to decode path b'/w/caf\\xe9' as UTF-8"
    assert undecodable_name(RuntimeError(message)) == message
    nested = Grouped(ValueError("x"), Grouped(RuntimeError(message)))
    assert undecodable_name(nested) == message
    assert undecodable_name(RuntimeError("something else")) is None
    assert undecodable_name(OSError("Unable to decode path")) is None
