"""The daemon's log lines as journald reads them: a priority prefix, no overlong line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpg_daemon.ops.logs import PRIORITY, VALUE_LIMIT

LINE_MAX = 48 * 1024
"""journald's default LineMax: a longer line is split into several entries."""

_SCRIPT = """
import logging, structlog
from cpg_daemon.ops import logs
logs.configure("json", "debug")
log = structlog.get_logger("t")
log.debug("walked", files=3)
log.info("uploaded", key="a/b.csv")
log.warning("structure_warning", folder="x")
log.error("upload_failed", error="boom")
log.info("control_command", command="pause", args={"watch": "w" * 70_000})
logging.getLogger("botocore").warning("a library's warning")
"""


def _run(tmp_path: Path, journal: bool) -> list[str]:
    """The lines a process logs to a file that is (or is not) the journal's stream."""
    out = tmp_path / f"stderr-{journal}"
    with open(out, "wb") as stream:
        info = os.fstat(stream.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        subprocess.run(
            [sys.executable, "-c", _SCRIPT], stderr=stream, env=env, check=True, timeout=60
        )
    return out.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("journal", [True, False])
def test_lines_to_the_journal_carry_their_priority_and_none_is_too_long(
    tmp_path: Path, journal: bool
) -> None:
    lines = _run(tmp_path, journal)
    assert len(lines) == 6, lines
    for line in lines:
        assert len(line.encode()) < LINE_MAX
        if journal:  # what journald does with SyslogLevelPrefix=yes, its default
            assert line.startswith("<") and line[2] == ">", line
            priority, line = int(line[1]), line[3:]
        event = json.loads(line)
        if journal:
            assert priority == PRIORITY[event["level"]], event
    events = [json.loads(line[3:] if journal else line) for line in lines]
    levels = [e["level"] for e in events]
    assert levels == ["debug", "info", "warning", "error", "info", "warning"]
    args = events[4]["args"]
    assert args.startswith('{"watch": "www') and args.endswith("(70,013 characters, cut)")
    assert len(args) < VALUE_LIMIT + 50
