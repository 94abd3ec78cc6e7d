"""``cpg-daemon demo``: the quick start's first command works on its own."""

from __future__ import annotations

import subprocess
import sys


def test_demo_uploads_and_verifies_the_sample_then_exits() -> None:
    # stdout is a pipe, not a terminal: the demo must exit by itself.
    result = subprocess.run(
        [sys.executable, "-m", "cpg_daemon", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: 77 files match their objects (size and CRC32C), 0 differ" in result.stdout
    assert "77/77 files" in result.stdout
