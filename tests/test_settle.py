"""The settle rule: when a file counts as finished, with time given as plain numbers."""

from __future__ import annotations

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.discovery.scan import Seen
from cpg_daemon.discovery.settle import Instant, SettleTracker

SETTLE = 30.0
WALL = 1_800_000_000.0
"""The wall clock when the tests begin (their monotonic clock begins at 0)."""
NS = 1_000_000_000


def at(monotonic: float, *, wall_offset: float = 0.0) -> Instant:
    """Both clocks ``monotonic`` seconds into the test (the wall clock moved by ``wall_offset``)."""
    return Instant(monotonic, WALL + monotonic + wall_offset)


def written(rel: str, size: int, seconds_ago: float = 0.0, now: float = 0.0) -> Seen:
    """A file last written ``seconds_ago`` before monotonic second ``now`` (by the wall clock)."""
    return Seen(rel, size, int((WALL + now - seconds_ago) * NS))


def test_a_file_still_being_written_settles_only_once_unchanged_for_the_settle_time() -> None:
    tracker = SettleTracker(SETTLE)
    assert not tracker.observe(written("P1/a.tiff", 10), at(0))
    assert tracker.due(20) == []
    # grows at 20 s: the settle time starts again
    assert not tracker.observe(written("P1/a.tiff", 20, now=20), at(20))
    assert tracker.due(SETTLE) == []
    assert tracker.due(20 + SETTLE - 0.001) == []
    assert tracker.due(20 + SETTLE) == ["P1/a.tiff"]
    # looked at again: still growing, so not yet
    assert not tracker.observe(written("P1/a.tiff", 30, now=50), at(50))
    assert tracker.due(50 + SETTLE) == ["P1/a.tiff"]
    assert tracker.observe(written("P1/a.tiff", 30, now=50), at(50 + SETTLE))
    assert len(tracker) == 0 and tracker.due(1000) == []


def test_a_file_seen_again_unchanged_keeps_its_first_sighting() -> None:
    tracker = SettleTracker(SETTLE)
    seen = written("a.tiff", 5)
    assert not tracker.observe(seen, at(0))
    assert not tracker.observe(seen, at(29))  # a rescan: not a new version
    assert tracker.observe(seen, at(SETTLE))


def test_a_file_whose_mtime_is_already_old_enough_settles_at_once() -> None:
    tracker = SettleTracker(SETTLE)
    assert tracker.observe(written("old.tiff", 1, seconds_ago=SETTLE), at(0))
    assert not tracker.observe(written("young.tiff", 1, seconds_ago=SETTLE - 1), at(0))
    assert "old.tiff" not in tracker and "young.tiff" in tracker
    # once its mtime is old enough by the wall clock, the next look settles it
    assert tracker.observe(written("young.tiff", 1, seconds_ago=SETTLE - 1), at(1))


def test_with_no_settle_time_every_file_settles_when_seen_even_with_a_future_mtime() -> None:
    tracker = SettleTracker(0.0)
    assert tracker.observe(written("future.tiff", 1, seconds_ago=-3600), at(0))
    assert len(tracker) == 0


def test_a_file_deleted_while_settling_is_forgotten() -> None:
    tracker = SettleTracker(SETTLE)
    tracker.observe(written("P1/a.tiff", 1), at(0))
    tracker.observe(written("P1/b.tiff", 1), at(0))
    tracker.forget("P1/a.tiff")
    tracker.forget("P1/never-seen.tiff")
    assert tracker.due(SETTLE) == ["P1/b.tiff"]
    tracker.forget("P1/b.tiff", seen_before=SETTLE)  # a stat found it gone
    assert len(tracker) == 0 and not tracker.pending_under("P1")


def test_a_file_seen_changed_after_a_stat_found_it_gone_is_not_forgotten() -> None:
    """The stat runs in a thread; an event meanwhile may show the file written anew."""
    tracker = SettleTracker(SETTLE)
    tracker.observe(written("a.tiff", 1), at(0))
    assert tracker.due(SETTLE) == ["a.tiff"]  # looked at in a worker thread: gone
    tracker.observe(written("a.tiff", 2, now=SETTLE), at(SETTLE))  # recreated meanwhile
    tracker.forget("a.tiff", seen_before=SETTLE)
    assert "a.tiff" in tracker
    assert tracker.observe(written("a.tiff", 2, now=SETTLE), at(2 * SETTLE))


def test_a_wall_clock_set_back_does_not_hold_a_file_back() -> None:
    """The file's mtime now lies in the future; it settles on the monotonic clock."""
    tracker = SettleTracker(SETTLE)
    seen = written("a.tiff", 1)
    assert not tracker.observe(seen, at(0))
    assert not tracker.observe(seen, at(10, wall_offset=-3600))
    assert tracker.due(SETTLE) == ["a.tiff"]
    assert tracker.observe(seen, at(SETTLE, wall_offset=-3600))


def test_a_wall_clock_set_forward_settles_files_written_before_the_jump() -> None:
    """As the daemon always did: their mtimes now look old, as if written long ago."""
    tracker = SettleTracker(SETTLE)
    seen = written("a.tiff", 1)
    assert not tracker.observe(seen, at(0))
    assert tracker.observe(seen, at(1, wall_offset=3600))


def test_pending_under_names_the_top_level_folders_with_files_settling() -> None:
    tracker = SettleTracker(SETTLE)
    tracker.observe(written("Plate1/a.tiff", 1), at(0))
    tracker.observe(written("loose.tiff", 1), at(0))
    assert tracker.pending_under("Plate1")
    assert not tracker.pending_under("Plate")  # a prefix of the name is not the folder
    assert not tracker.pending_under("Plate2")
    assert not tracker.pending_under("loose.tiff")


def test_observe_many_returns_the_settled_files_in_order() -> None:
    tracker = SettleTracker(SETTLE)
    found = [
        written("c.tiff", 1, seconds_ago=60),
        written("a.tiff", 1),
        written("b.tiff", 1, seconds_ago=60),
    ]
    assert [s.rel_path for s in tracker.observe_many(found, at(0))] == ["c.tiff", "b.tiff"]
    assert tracker.due(SETTLE) == ["a.tiff"]


def test_an_instant_reads_both_clocks_of_a_clock() -> None:
    clock = ManualClock(start=WALL)
    clock.advance(5)
    clock.jump(-100)
    assert Instant.of(clock) == Instant(5.0, WALL + 5 - 100)
