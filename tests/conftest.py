"""Shared fixtures: a real local S3 server (moto_server) and an isolated AWS environment."""

from __future__ import annotations

import asyncio
import compileall
import functools
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
import structlog
from botocore.config import Config
from daemonproc import ConfigMaker
from loopguard import STEP_WALL_SECONDS, HarnessClient, LoopGuard, harness
from s3server import S3Server

TEST_REGION = "us-east-1"
TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing-secret"


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package once, before any test process starts.

    An editable install leaves ``cpg_daemon`` uncompiled (pip compiles only what it
    copies into site-packages), and where ``PYTHONDONTWRITEBYTECODE`` is set, as on these
    machines, every daemon and command subprocess would compile its 12,000 lines again:
    0.15-0.2 s of CPU each, a few hundred times a run. Python reads the cached bytecode
    whatever that variable says.
    """
    if hasattr(config, "workerinput"):
        return  # a pytest-xdist worker: the controller has done it
    import cpg_daemon

    compileall.compile_dir(Path(cpg_daemon.__file__).parent, quiet=1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto_server subprocess for the whole session (its log is in a tmp dir).

    Started and stopped on a thread of its own: when an async test is the first to ask
    for it, pytest sets it up while that test's event loop runs, and the loop guard
    would rightly call the launcher's file and process work blocking.
    """
    with ThreadPoolExecutor(1) as thread:
        server = thread.submit(S3Server.start, tmp_path_factory.mktemp("moto_server")).result()
        try:
            yield server
        finally:
            thread.submit(server.stop).result()


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the whole session: no test secret in any daemon log or command output.

    The long-term test key and every key and token the fake control plane minted
    are looked for in everything the daemons and commands of every test wrote. With
    pytest-xdist each worker scans what its own tests wrote, and hands its figures to
    the controller for the summary.
    """
    yield
    from daemonproc import CLI_OUTPUT, DAEMON_LOGS
    from fakes import MINTED_SECRETS

    secrets = [TEST_SECRET_ACCESS_KEY, *MINTED_SECRETS]
    outputs = [(f"cpg-daemon {args}", text) for args, text in CLI_OUTPUT]
    outputs += [
        (str(log), log.read_text(encoding="utf-8", errors="replace"))
        for log in DAEMON_LOGS
        if log.exists()
    ]
    leaks = [(where, s[:6] + "...") for where, text in outputs for s in secrets if s in text]
    assert leaks == [], f"secrets in output: {leaks[:10]}"
    figures = [len(MINTED_SECRETS), len(DAEMON_LOGS), len(CLI_OUTPUT)]
    workeroutput = getattr(request.config, "workeroutput", None)
    if workeroutput is None:
        _SCANS.append(figures)
    else:
        workeroutput["secret_scan"] = figures


_SCANS: list[list[int]] = []
"""[minted secrets, daemon logs, command outputs] scanned, one entry per process."""


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A pytest-xdist worker finished: keep its secret scan's figures."""
    figures = getattr(node, "workeroutput", {}).get("secret_scan")
    if figures is not None:
        _SCANS.append(list(figures))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The secret scan's figures, after the session (its fixture has finished by then)."""
    if not _SCANS:
        return
    minted, logs, outputs = (sum(column) for column in zip(*_SCANS, strict=True))
    processes = f" (in {len(_SCANS)} test processes)" if len(_SCANS) > 1 else ""
    terminalreporter.write_line(
        f"secret scan: {1 + minted} secrets looked for in {logs} daemon logs "
        f"and {outputs} command outputs{processes}: none found"
    )


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials and no config files, so no test can reach real AWS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "nonexistent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "nonexistent-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):  # loopback only
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def s3_client(s3_server: S3Server) -> Any:
    """A synchronous boto3 S3 client pointed at the local server (harness work)."""
    return HarnessClient(_sync_client(s3_server.endpoint_url))


@functools.cache
@harness
def _sync_client(endpoint_url: str) -> Any:
    """One boto3 client per server: building one parses the S3 model (~0.1 s of CPU)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, uniquely named bucket."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """Folders for a daemon test: the watched one, the state dir, a staging area, hooks."""
    paths = {
        "watch": tmp_path / "outbox",
        "state": tmp_path / "state",
        "staging": tmp_path / "staging",
        "hooks": tmp_path / "hooks",
    }
    for path in paths.values():
        path.mkdir()
    return paths


@pytest.fixture
def make_config(tmp_path: Path, layout: dict[str, Path], s3_server: S3Server) -> ConfigMaker:
    """``make_config(destination, name="run", settle="1s", s3=None, daemon=None, **watch)``
    writes tmp_path/NAME.toml for a daemon of this test's layout (see ConfigMaker)."""
    return ConfigMaker(tmp_path, layout, s3_server.endpoint_url)


def _debug_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = STEP_WALL_SECONDS
    return loop


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio in debug mode, so blocking calls on the event loop are reported."""
    return "asyncio", {"loop_factory": _debug_loop}


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail an async test in which the daemon's code blocked the event loop.

    Blocking I/O from cpg_daemon code, a step computing for more than STEP_CPU_SECONDS
    and a step longer than STEP_WALL_SECONDS are reported (see loopguard.py).
    SQLite, hashing and directory walks must run in worker threads instead.
    """
    if "anyio_backend" not in request.fixturenames:
        yield
        return
    guard = LoopGuard()
    caplog.set_level(logging.WARNING, logger="asyncio")
    with guard.watching():
        yield
    slow = guard.found + [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.name == "asyncio" and " took " in record.getMessage()
    ]
    assert not slow, f"blocking calls on the event loop: {slow}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests given a longer timeout start first (the longest first), so that with
    pytest-xdist none of them starts last and holds up the end of the run alone."""

    def allowed(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        return -float(marker.args[0]) if marker and marker.args else 0.0

    items.sort(key=allowed)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def structlog_as_it_was() -> Iterator[None]:
    """A command run in-process (``cli.main([...])``) configures logging for the whole
    process, at level error for ``check``: later tests' ``capture_logs`` would then see
    nothing below it. Each test starts from structlog's defaults."""
    yield
    structlog.reset_defaults()
