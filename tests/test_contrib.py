"""contrib/: the alert rules and the dashboard name only metrics the daemon exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cpg_daemon.engine.tally import Tally
from cpg_daemon.ops.metrics import exposition

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "cpg-daemon-alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "cpg-daemon-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def _exposed() -> str:
    """What a daemon with one watch, one upload and one grant exposes."""
    tally = Tally()
    tally.uploaded("plates", 100, 0.4, 1_800_000_000.0)
    status = {
        "watches": [
            {
                "name": "plates",
                "files": {"failed": 0, "queued": 1, "uploading": 0, "uploaded": 1},
                "bytes": {"queued": 5, "uploaded": 100},
                "paused": False,
            }
        ],
        "throughput_bytes_per_s": 0.0,
        "requests_allowed": 24,
        "bandwidth": {"limit_bytes_per_s": 2_000_000, "schedule": "08:00,2MB 19:00,off"},
        "credentials": [
            {"target": "s3://b/p/*", "state": "valid", "expires_at": "2027-01-01T00:00:00+00:00"}
        ],
    }
    return exposition(status, tally).decode()  # type: ignore[arg-type]


def test_the_bandwidth_limit_and_the_requests_allowed_are_gauges() -> None:
    values = {
        s.name: s.value for f in text_string_to_metric_families(_exposed()) for s in f.samples
    }
    assert values["cpg_daemon_bandwidth_limit_bytes_per_second"] == 2_000_000
    assert values["cpg_daemon_requests_allowed"] == 24


def _sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_metric_the_rules_and_the_dashboard_use_is_exposed() -> None:
    exposed = _sample_names(_exposed())
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bcpg_daemon_[a-z_]+", RULES.read_text(encoding="utf-8")))
    used |= {name for e in expressions for name in re.findall(r"\bcpg_daemon_[a-z_]+", e)}
    assert used and used <= exposed, sorted(used - exposed)


@needs_promtool
def test_the_exposition_and_the_rules_pass_promtool() -> None:
    assert PROMTOOL is not None
    metrics = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=_exposed(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert metrics.returncode == 0, metrics.stdout + metrics.stderr
    rules = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rules.returncode == 0 and "SUCCESS: 5 rules found" in rules.stdout, rules.stdout

