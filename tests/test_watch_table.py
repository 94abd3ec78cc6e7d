"""The watch table and reload planning: pure, no daemon."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cpg_daemon.core.bandwidth import parse_bandwidth
from cpg_daemon.core.config import Config, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.watches import plan_reload, restart_only_changes


def _watch(name: str, **changes: object) -> WatchConfig:
    watch = WatchConfig(name, Path(f"/data/{name}"), S3Location("bkt", f"p/{name}/"))
    return dataclasses.replace(watch, **changes)  # type: ignore[arg-type]


def _config(*watches: WatchConfig, **daemon: object) -> Config:
    return Config(
        path=Path("/etc/cpg-daemon/config.toml"),
        daemon=dataclasses.replace(DaemonConfig(), **daemon),  # type: ignore[arg-type]
        watches=watches,
    )


def test_an_unchanged_configuration_changes_nothing() -> None:
    config = _config(_watch("a"), _watch("b"))
    plan = plan_reload(config, config)
    assert (plan.added, plan.removed, plan.changed, plan.restart_needed) == ((), (), (), ())
    assert not plan.logging_changed
    assert plan.config == config


def test_watches_added_removed_and_changed_are_named_sorted() -> None:
    old = _config(_watch("keep"), _watch("gone"), _watch("edit"))
    new = _config(_watch("new2"), _watch("edit", settle=5.0), _watch("keep"), _watch("new1"))
    plan = plan_reload(old, new)
    assert plan.added == ("new1", "new2")
    assert plan.removed == ("gone",)
    assert plan.changed == ("edit",)
    assert plan.summary() == {
        "added": ["new1", "new2"],
        "removed": ["gone"],
        "changed": ["edit"],
        "restart_needed": [],
    }


def test_a_new_rescan_interval_restarts_every_watcher() -> None:
    old = _config(_watch("a"), _watch("b"))
    new = _config(_watch("a"), _watch("b"), rescan_interval=60.0)
    plan = plan_reload(old, new)
    assert plan.changed == ("a", "b")
    assert plan.config.daemon.rescan_interval == 60.0


@pytest.mark.parametrize(
    ("daemon", "s3", "needed"),
    [
        ({"state_dir": Path("/elsewhere")}, {}, ("daemon.state_dir",)),
        ({"socket": Path("/run/x.sock")}, {}, ("daemon.socket",)),
        ({"socket_group": "lab"}, {}, ("daemon.socket_group",)),
        ({"metrics_listen": "127.0.0.1:9100"}, {}, ("daemon.metrics_listen",)),
        ({}, {"max_concurrency": 4}, ("s3.max_concurrency",)),
        ({}, {"part_size": 32 * 1024**2, "acl": "private"}, ("s3.acl", "s3.part_size")),
    ],
)
def test_settings_read_at_start_keep_their_running_values(
    daemon: dict[str, object], s3: dict[str, object], needed: tuple[str, ...]
) -> None:
    old = _config(_watch("a"))
    new = dataclasses.replace(
        old,
        daemon=dataclasses.replace(old.daemon, **daemon),  # type: ignore[arg-type]
        s3=dataclasses.replace(S3Config(), **s3),  # type: ignore[arg-type]
    )
    plan = plan_reload(old, new)
    assert sorted(plan.restart_needed) == sorted(needed)
    assert restart_only_changes(old, new) == plan.restart_needed
    # Until the restart, the running values stay in force...
    assert plan.config.s3 == old.s3
    assert plan.config.daemon.state_dir == old.daemon.state_dir
    assert plan.config.daemon.socket == old.daemon.socket
    assert plan.config.daemon.metrics_listen == old.daemon.metrics_listen
    # ... and nothing about the watches changed.
    assert (plan.added, plan.removed, plan.changed) == ((), (), ())


def test_a_reload_applies_a_new_max_bandwidth_and_keeps_the_rest_of_s3() -> None:
    old = _config(_watch("a"))
    timetable = parse_bandwidth("08:00,10MB 19:00,off")
    s3 = dataclasses.replace(old.s3, max_bandwidth=timetable, part_size=32 * 1024**2)
    plan = plan_reload(old, dataclasses.replace(old, s3=s3))
    assert plan.restart_needed == ("s3.part_size",)
    assert plan.config.s3.max_bandwidth == timetable
    assert plan.config.s3.part_size == old.s3.part_size


def test_settings_a_reload_applies_are_taken() -> None:
    old = _config(_watch("a"))
    new = _config(_watch("a"), file_attempts=2, log_level="debug", drain_timeout=5.0)
    plan = plan_reload(old, new)
    assert plan.restart_needed == ()
    assert plan.logging_changed
    assert plan.config.daemon.file_attempts == 2
    assert plan.config.daemon.drain_timeout == 5.0
