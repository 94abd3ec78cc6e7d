"""The admission policy: which settled files go to the journal, which wait, which are kept out."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import MAX_KEY_BYTES, parse_s3_uri
from cpg_daemon.discovery.admission import Admission, ReadyMarker, Rejection
from cpg_daemon.discovery.scan import Seen
from cpg_daemon.journal import Discovered

pytestmark = pytest.mark.anyio

GALLERY = parse_s3_uri("s3://bucket/cpg0123-example/broad/images/2024_04_01_B/")
PLAIN = parse_s3_uri("s3://bucket/lab/")


@dataclass(frozen=True)
class Row:
    state: str
    key: str
    size: int
    mtime_ns: int


class Rows:
    """The journal's rows as admission reads them, and how often it asked."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.asked = 0

    async def get(self, watch: str, rel_path: str) -> Row | None:
        self.asked += 1
        return self.rows.get((watch, rel_path))


def watch(**options: object) -> WatchConfig:
    config = WatchConfig("w", Path("/data/outbox"), PLAIN, settle=0.0, structure="off")
    return replace(config, **options)  # type: ignore[arg-type]


def seen(rel: str, size: int = 1, mtime_ns: int = 1) -> Seen:
    return Seen(rel, size, mtime_ns)


# -- the ready marker ------------------------------------------------------------------------


def test_the_ready_marker_rule_names_the_folder_each_file_waits_for() -> None:
    marker = ReadyMarker("READY")
    assert marker.is_marker("READY") and marker.is_marker("P1/READY")
    assert not marker.is_marker("P1/sub/READY") and not marker.is_marker("P1/READY.txt")
    assert marker.folder("P1/sub/a.tiff") == "P1"
    assert marker.folder("loose.tiff") is None  # top-level files never wait
    assert marker.marks("P1/READY") == "P1"
    assert marker.marks("READY") is None and marker.marks("P1/sub/READY") is None
    found = [seen("P1/a"), seen("P1/READY"), seen("P2/x/b"), seen("c")]
    assert marker.folders(found) == {"P1", "P2"}
    none = ReadyMarker("")
    assert not none.is_marker("READY") and none.folder("P1/a") is None
    assert none.marks("P1/READY") is None and none.folders(found) == set()


def test_the_ready_marker_is_looked_for_as_a_file(tmp_path: Path) -> None:
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "READY").write_text("")
    (tmp_path / "P2" / "READY").mkdir(parents=True)  # a folder is no marker
    (tmp_path / "P3").mkdir()
    assert ReadyMarker("READY").present(tmp_path, ["P1", "P2", "P3", "P4"]) == {"P1"}


async def test_files_wait_for_their_folders_marker_and_the_marker_is_not_uploaded() -> None:
    admission = Admission(watch(ready_marker="READY"), Rows())
    assert await admission.admit(seen("P1/a.tiff"), marked=set()) is None
    assert await admission.admit(seen("P1/READY"), marked={"P1"}) is None
    assert await admission.admit(seen("READY"), marked=set()) is None
    admitted = await admission.admit(seen("P1/a.tiff", 7, 8), marked={"P1"})
    assert admitted == Discovered("P1/a.tiff", "bucket", "lab/P1/a.tiff", 7, 8)
    assert isinstance(await admission.admit(seen("loose.tiff"), marked=set()), Discovered)


# -- names S3 cannot take --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown", "why"),
    [
        (os.fsdecode(b"P1/caf\xe9.tiff"), "lab/P1/caf\\udce9.tiff", "not valid UTF-8"),
        ("P1/two\nlines.tiff", "lab/P1/two\nlines.tiff", "control characters"),
        ("P1/" + "x" * MAX_KEY_BYTES, "lab/P1/" + "x" * MAX_KEY_BYTES, "bytes long"),
    ],
)
async def test_a_name_s3_cannot_take_is_rejected_once(name: str, shown: str, why: str) -> None:
    admission = Admission(watch(), Rows())
    with capture_logs() as logs:
        rejection = await admission.admit(seen(name), marked=set())
        assert await admission.admit(seen(name, size=2), marked=set()) is None  # a rescan
    assert isinstance(rejection, Rejection)
    assert (rejection.rel_path, rejection.key) == (name, shown)
    assert why in rejection.reason
    assert [(e["event"], e["path"]) for e in logs] == [("bad_name", shown)]


# -- the gallery's folder rules ----------------------------------------------------------------


BAD = "Plate 1/a.tiff"
"""A file ``reject`` keeps out: a plate outside images/, with a space."""


def rejecting(state: str | None = None) -> tuple[Rows, Admission]:
    """A ``reject`` watch, and a journal that has BAD (size 1, mtime 1) in ``state``."""
    rows = Rows()
    if state is not None:
        rows.rows["w", BAD] = Row(state, GALLERY.prefix + BAD, 1, 1)
    return rows, Admission(watch(destination=GALLERY, structure="reject"), rows)


async def test_warn_admits_files_and_logs_each_folder_and_rule_once() -> None:
    admission = Admission(watch(destination=GALLERY, structure="warn"), Rows())
    with capture_logs() as logs:
        for name in ("Plate 1/a.tiff", "Plate 1/b.tiff", "images/P1/fine.tiff"):
            assert isinstance(await admission.admit(seen(name), marked=set()), Discovered)
    rules = sorted(e["rule"] for e in logs)
    assert rules == ["batch-content", "whitespace"]
    assert {e["event"] for e in logs} == {"structure_warning"}
    assert logs[0]["path"] == "/data/outbox/Plate 1/a.tiff"
    stats = admission.statistics()
    assert (stats.findings, stats.rejected) == (2, 0)
    assert {f.rule for f in stats.examples} == {"batch-content", "whitespace"}


async def test_reject_keeps_a_file_out_once_per_version_and_counts_it_once() -> None:
    rows, admission = rejecting()
    with capture_logs() as logs:
        rejection = await admission.admit(seen(BAD), marked=set())
    assert isinstance(rejection, Rejection)
    assert rejection.key == GALLERY.prefix + BAD
    assert rejection.reason.startswith('kept out by structure = "reject": [batch-content]')
    assert {(e["event"], e["rule"]) for e in logs} == {
        ("structure_rejected", "batch-content"),
        ("structure_rejected", "whitespace"),
    }
    assert await admission.admit(seen(BAD), marked=set()) is None  # a rescan
    assert rows.asked == 1
    changed = await admission.admit(seen(BAD, size=2), marked=set())
    assert isinstance(changed, Rejection)  # recorded again, with the rule
    assert admission.statistics().rejected == 1  # still one file


async def test_reject_admits_a_file_with_advice_only() -> None:
    _, admission = rejecting()
    with capture_logs() as logs:
        admitted = await admission.admit(seen("images/Plate1/odd name.tiff"), marked=set())
    assert isinstance(admitted, Discovered)
    assert [e["event"] for e in logs] == ["structure_warning"]
    assert admission.statistics().rejected == 0


async def test_reject_leaves_a_file_uploaded_before_alone_until_it_changes() -> None:
    rows, admission = rejecting("uploaded")
    assert await admission.admit(seen(BAD), marked=set()) is None
    assert await admission.admit(seen(BAD), marked=set()) is None
    assert rows.asked == 1
    assert admission.statistics().rejected == 0
    assert isinstance(await admission.admit(seen(BAD, 2), marked=set()), Rejection)
    assert admission.statistics().rejected == 1


async def test_reject_decides_a_file_being_uploaded_at_the_next_walk() -> None:
    rows, admission = rejecting("uploading")
    assert await admission.admit(seen(BAD), marked=set()) is None
    rows.rows["w", BAD] = replace(rows.rows["w", BAD], state="failed")  # the upload failed
    assert isinstance(await admission.admit(seen(BAD), marked=set()), Rejection)
    assert admission.statistics().rejected == 1


async def test_structure_off_asks_nothing() -> None:
    rows = Rows()
    admission = Admission(watch(destination=GALLERY, structure="off"), rows)
    with capture_logs() as logs:
        assert isinstance(await admission.admit(seen(BAD), marked=set()), Discovered)
    assert logs == [] and rows.asked == 0
    assert admission.statistics().findings == 0


# -- the first walk against the destination ----------------------------------------------------


async def test_the_first_walk_checks_files_the_destination_already_holds_with_their_size() -> None:
    admission = Admission(watch(), Rows())

    async def check_remote(rel: str, size: int = 1) -> bool:
        admitted = await admission.admit(seen(rel, size), marked=set())
        assert isinstance(admitted, Discovered)
        return admitted.check_remote

    assert not await check_remote("a.tiff")  # a watch the journal knows: nothing to check
    admission.expect_remote({"lab/a.tiff": 1, "lab/b.tiff": 5})
    assert await check_remote("a.tiff")
    assert not await check_remote("b.tiff")  # another size: uploaded again
    assert not await check_remote("c.tiff")
    admission.first_walk_done()
    assert not await check_remote("a.tiff")


async def test_a_destination_that_could_not_be_listed_has_every_file_checked() -> None:
    admission = Admission(watch(), Rows())
    admission.expect_remote(None)
    admitted = await admission.admit(seen("a.tiff"), marked=set())
    assert isinstance(admitted, Discovered) and admitted.check_remote
    admission.first_walk_done()
    admitted = await admission.admit(seen("a.tiff"), marked=set())
    assert isinstance(admitted, Discovered) and not admitted.check_remote
