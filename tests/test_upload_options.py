"""``cpg-daemon upload``'s options for people and scripts: --dry-run, --include/--exclude,
--structure, --json and --quiet, and its progress display.

The options are tried as a user runs them: ``cpg-daemon upload`` in a subprocess (through
the fork server, ``daemonproc.run_cli``) against the session's moto server, its output
parsed and the bucket and the server's access log read afterwards. The progress display
is rendered in-process to a terminal-like console.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import random
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums
from daemonproc import run_cli
from rich.console import Console
from s3server import S3Server

from cpg_daemon.cli.uploadview import ProgressDisplay, Rate
from cpg_daemon.engine.oneshot import UploadProgress
from cpg_daemon.engine.uploader import PartsDone

PREFIX = "dest/"
PLATE = "cpg0001-test/broad/images/2024_01_01_Batch1/images/Plate1"
MiB = 1024 * 1024


def write_tree(root: Path, tree: dict[str, int], seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    contents = {}
    for rel, size in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[rel] = rng.randbytes(size)
        path.write_bytes(contents[rel])
    return contents


def crc32c(data: bytes) -> str:
    return base64.b64encode(checksums.crc32c(data).to_bytes(4, "big")).decode("ascii")


def upload(
    s3_server: S3Server, src: Path, dest: str, state: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "upload",
        str(src),
        dest,
        "--endpoint-url",
        s3_server.endpoint_url,
        "--state-dir",
        str(state),
        *flags,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def objects(s3_client: Any, bucket: str) -> dict[str, bytes]:
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        o["Key"]: s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed
    }


def writes(s3_server: S3Server, bucket: str, since: int) -> list[Any]:
    return [
        r
        for r in s3_server.requests(since=since)
        if r.bucket == bucket and r.method in ("PUT", "POST", "DELETE")
    ]


# -- --dry-run ---------------------------------------------------------------------------


def test_dry_run_writes_nothing_and_lists_what_the_real_run_then_sends(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """At the bucket's top, where a gallery project's folder is."""
    src, state = tmp_path / "src", tmp_path / "state"
    contents = write_tree(
        src,
        {
            f"{PLATE}/new.tiff": 1000,
            f"{PLATE}/same.tiff": 2000,
            f"{PLATE}/changed.tiff": 3000,
            f"{PLATE}/unproven.tiff": 4000,
            f"{PLATE}/bigger.tiff": 5000,
            "notes/readme.txt": 10,  # outside the gallery's layout: a finding
        },
    )
    seeded = {
        "same.tiff": (contents[f"{PLATE}/same.tiff"], True),
        "changed.tiff": (bytes(3000), True),  # the same size, other bytes
        "unproven.tiff": (contents[f"{PLATE}/unproven.tiff"], False),  # no checksum
        "bigger.tiff": (bytes(10), True),
    }
    for name, (body, with_crc) in seeded.items():
        extra = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc32c(body)}
        s3_client.put_object(
            Bucket=bucket, Key=f"{PLATE}/{name}", Body=body, **(extra if with_crc else {})
        )
    before = objects(s3_client, bucket)
    mark = s3_server.mark()

    result = upload(s3_server, src, f"s3://{bucket}/", state, "--dry-run", "--json")

    assert result.returncode == 0, describe(result)
    assert writes(s3_server, bucket, mark) == []
    assert objects(s3_client, bucket) == before
    assert not state.exists()  # no journal: a later real run starts as if none had run
    report = json.loads(result.stdout)
    actions = {entry["path"]: (entry["action"], entry["size"]) for entry in report["entries"]}
    assert actions == {
        f"{PLATE}/new.tiff": ("upload", 1000),
        f"{PLATE}/same.tiff": ("skip", 2000),
        f"{PLATE}/changed.tiff": ("upload", 3000),
        f"{PLATE}/unproven.tiff": ("upload", 4000),
        f"{PLATE}/bigger.tiff": ("upload", 5000),
        "notes/readme.txt": ("upload", 10),
    }
    assert report["to_upload"] == {"files": 5, "bytes": 13010}
    assert report["already_present"] == {"files": 1, "bytes": 2000}
    assert (report["dry_run"], report["listed"], report["files"]) == (True, True, 6)
    assert {(f["rule"], f["folder"]) for f in report["plan"]["structure"]["findings"]} >= {
        ("layout", "notes/")
    }

    people = upload(s3_server, src, f"s3://{bucket}/", state, "--dry-run")
    assert people.returncode == 0, describe(people)
    lines = [" ".join(line.split()) for line in people.stdout.splitlines()]
    assert (
        f"skip: 2.0 KiB s3://{bucket}/{PLATE}/same.tiff (already there: same size and CRC32C)"
        in lines
    )
    assert f"upload: 1000 B s3://{bucket}/{PLATE}/new.tiff (new)" in lines
    assert "[layout]" in people.stdout
    assert "dry run: 6 files" in people.stdout and "5 to upload" in people.stdout
    assert writes(s3_server, bucket, mark) == []

    real = upload(s3_server, src, f"s3://{bucket}/", state, "--json")
    assert real.returncode == 0, describe(real)
    summary = json.loads(real.stdout)
    assert (summary["uploaded"], summary["already_present"], summary["failed"]) == (5, 1, 0)
    sent = {r.key for r in writes(s3_server, bucket, mark)}
    assert sent == {path for path, (action, _) in actions.items() if action == "upload"}
    assert objects(s3_client, bucket) == {rel: data for rel, data in contents.items()}


def test_dry_run_of_a_destination_it_cannot_list_says_so_and_lists_every_file(
    s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.csv": 10, "b/c.csv": 20})
    result = upload(
        s3_server, src, "s3://no-such-bucket-here/x/", tmp_path / "state", "--dry-run", "--json"
    )
    assert result.returncode == 1, describe(result)  # the real run would stop there
    report = json.loads(result.stdout)
    assert report["listed"] is False
    assert "no-such-bucket-here" in report["not_listed"]
    assert [(e["path"], e["action"]) for e in report["entries"]] == [
        ("a.csv", "upload"),
        ("b/c.csv", "upload"),
    ]


# -- --include, --exclude, --structure -----------------------------------------------------


def test_include_and_exclude_choose_the_files_and_structure_off_says_nothing_of_the_rules(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    contents = write_tree(
        src,
        {
            "a/x.tiff": 10,
            "a/y.csv": 10,
            "a/thumbs/t.tiff": 10,
            "b/z.tiff": 10,
            "b/.hidden.tiff": 10,  # the default exclusions still hold
            "top.tiff": 10,
        },
    )
    dest = f"s3://{bucket}/{PREFIX}"
    flags = ("--include", "**/*.tiff", "--exclude", "**/thumbs", "--exclude", "top.*")

    warned = upload(s3_server, src, dest, tmp_path / "state", *flags, "--dry-run", "--json")
    assert warned.returncode == 0, describe(warned)
    assert json.loads(warned.stdout)["plan"]["structure"]["findings"] != []

    result = upload(s3_server, src, dest, tmp_path / "state", *flags, "--structure", "off")

    assert result.returncode == 0, describe(result)
    assert objects(s3_client, bucket) == {
        PREFIX + "a/x.tiff": contents["a/x.tiff"],
        PREFIX + "b/z.tiff": contents["b/z.tiff"],
    }
    assert "structure_warning" not in result.stderr, describe(result)
    assert "2 files: 2 uploaded" in result.stdout, describe(result)
    # Off a terminal no progress display: standard error holds log lines only.
    assert [json.loads(line)["event"] for line in result.stderr.splitlines()] != []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--include", "a/{x,y}"), "braces"),
        (("--exclude", ""), "empty pattern"),
        (("--include", "[[:digit:]]*"), "POSIX classes"),
    ],
)
def test_a_glob_that_would_not_mean_what_it_seems_is_refused(
    s3_server: S3Server, bucket: str, tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a/x.csv": 10})
    mark = s3_server.mark()
    result = upload(s3_server, src, f"s3://{bucket}/{PREFIX}", tmp_path / "state", *flags)
    assert result.returncode == 2, describe(result)
    assert message in result.stderr, describe(result)
    assert writes(s3_server, bucket, mark) == []


def test_include_with_a_single_file_is_refused(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.csv": 10})
    result = upload(
        s3_server, src / "a.csv", f"s3://{bucket}/{PREFIX}", tmp_path / "s", "--include", "*.csv"
    )
    assert result.returncode == 2, describe(result)
    assert "is a file" in result.stderr, describe(result)


# -- --quiet and --json --------------------------------------------------------------------


def test_quiet_prints_nothing_on_success_and_only_the_failures_otherwise(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {f"{PLATE}/a.tiff": 100, "misplaced/b.csv": 200, "misplaced/c.csv": 300})

    quiet = upload(s3_server, src, f"s3://{bucket}/", tmp_path / "s1", "--quiet")

    assert quiet.returncode == 0, describe(quiet)
    assert (quiet.stdout, quiet.stderr) == ("", "")  # folder-rule warnings included
    assert len(objects(s3_client, bucket)) == 3

    # --structure reject keeps misplaced/ out: its files fail, and only they are said.
    strict = f"{bucket}-strict"
    s3_client.create_bucket(Bucket=strict)
    failed = upload(
        s3_server,
        src,
        f"s3://{strict}/",
        tmp_path / "s2",
        "--quiet",
        "--structure",
        "reject",
    )

    assert failed.returncode == 1, describe(failed)
    assert failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "misplaced/b.csv",
        "misplaced/c.csv",
    ], describe(failed)
    assert all(line.startswith("failed: ") and "reject" in line for line in lines)

    # --json --quiet: the document still, and the same errors.
    document = upload(
        s3_server,
        src,
        f"s3://{strict}/",
        tmp_path / "s2",
        "--quiet",
        "--json",
        "--structure",
        "reject",
    )
    assert document.returncode == 1, describe(document)
    summary = json.loads(document.stdout)
    assert summary["command"] == "upload" and summary["dry_run"] is False
    assert (summary["files"], summary["uploaded"], summary["failed"]) == (3, 0, 2)
    assert summary["already_present"] == 1  # uploaded by the run before
    assert sorted(f["path"] for f in summary["failures"]) == ["misplaced/b.csv", "misplaced/c.csv"]
    assert document.stderr.splitlines() == lines


# -- the progress display ------------------------------------------------------------------


def test_on_a_terminal_the_progress_goes_to_standard_error_and_the_summary_to_stdout(
    s3_server: S3Server, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """A real terminal (a pseudo-terminal) on standard error: the display is drawn there,
    down to its last state, with the folder-rule warnings; standard output, a pipe, gets
    the summary line alone. (A fresh interpreter: the fork server passes no terminal.)"""
    src = tmp_path / "src"
    contents = write_tree(src, {"misplaced/big.tiff": 6 * MiB, "misplaced/small.csv": 100})
    leader, follower = pty.openpty()
    termios.tcsetwinsize(follower, (40, 160))
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "cpg_daemon", "upload", str(src), f"s3://{bucket}/"),
                *("--endpoint-url", s3_server.endpoint_url, "--state-dir", str(tmp_path / "s")),
                *("--part-size", "5MiB"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    terminal = shown.decode("utf-8", "replace")
    assert result.returncode == 0, terminal
    assert result.stdout.startswith("2 files: 2 uploaded, 0 already present, 0 failed;")
    assert "2/2 files" in terminal and "100%" in terminal, terminal
    assert "6.0 MiB/6.0 MiB" in terminal, terminal
    assert "structure_warning" in terminal, terminal
    assert objects(s3_client, bucket) == contents


def snapshot(**changes: Any) -> UploadProgress:
    values: dict[str, Any] = {
        "files": 3,
        "files_done": 0,
        "files_failed": 0,
        "bytes": 300 * MiB,
        "bytes_done": 0,
        "bytes_sent": 0,
        "multipart": (),
    }
    values.update(changes)
    return UploadProgress(**values)


def test_the_display_shows_files_bytes_percent_rate_time_left_and_each_large_file() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    display = ProgressDisplay(console)
    big = f"{PLATE}/huge.tiff"
    with display.shown():
        display.update(snapshot(), now=0.0)
        # Two of 25 parts of a 200 MiB file are in: it shows before it is done.
        parts = (PartsDone(big, 200 * MiB, 16 * MiB),)
        display.update(snapshot(bytes_done=16 * MiB, bytes_sent=16 * MiB, multipart=parts), 2.0)
        first = out.getvalue()
        parts = (PartsDone(big, 200 * MiB, 100 * MiB),)
        display.update(
            snapshot(files_done=1, bytes_done=150 * MiB, bytes_sent=150 * MiB, multipart=parts),
            now=4.0,
        )
    shown = out.getvalue()[len(first) :]
    assert "huge.tiff" in first and "16.0 MiB/200.0 MiB" in first and "  8%" in first
    assert "1/3 files" in shown and " 50%" in shown and "150.0 MiB/300.0 MiB" in shown
    assert "37.5 MiB/s" in shown  # 150 MiB in the 4 s measured
    assert "ETA 4s" in shown  # 150 MiB left at 37.5 MiB/s
    assert "huge.tiff" in shown and " 50%" in shown


def test_the_rate_is_over_the_last_seconds_only() -> None:
    rate = Rate(window=5.0)
    rate.add(0.0, 0)
    assert rate.per_second() is None  # not a second's worth yet
    rate.add(0.5, 500)
    assert rate.per_second() is None
    for second in range(1, 11):
        rate.add(float(second), second * 1000)  # 1,000 B/s for 10 s
    rate.add(11.0, 10_000)
    rate.add(12.0, 10_000)  # then nothing for 2 s
    assert rate.per_second() == pytest.approx(3000 / 5)
