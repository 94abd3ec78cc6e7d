"""Bad input at the edges: malformed configuration files, malformed control-socket
requests, and a second daemon on the same state directory.

tests/test_control.py already fuzzes single requests (random bytes, JSON values, bad
commands), over-long lines, idle clients and deep nesting; this file adds what it does
not: generated TOML documents, wrong argument types for every command, clients that
vanish mid-line or mid-reply, 200 connections at once, and a second daemon that shares
only the state directory (its own socket).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, exchange, journal_rows, run_cli, wait_until, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3server import S3Server

from cpg_daemon.core.config import (
    Config,
    CredentialsConfig,
    DaemonConfig,
    S3Config,
    WatchConfig,
    load_config,
)
from cpg_daemon.core.errors import ConfigError

# -- (a) configuration files -------------------------------------------------------------

KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    section: tuple(field.name for field in dataclasses.fields(table))
    for section, table in (
        ("daemon", DaemonConfig),
        ("s3", S3Config),
        ("credentials", CredentialsConfig),
        ("watch", WatchConfig),
    )
}
"""Every key a section takes: the config dataclasses' fields are the keys."""


def toml_value(value: Any) -> str:
    """A TOML literal for a value the strategies below produce."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{" + inner + "}"
    raise AssertionError(f"no TOML for {value!r}")


scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.datetimes(),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
number_words = st.sampled_from(
    ["-1", "0", "1e400", "9" * 40, "1.5", "-5", "NaN", "inf", "0x10", "1_000", " ", ""]
)
units = st.sampled_from(["", "s", "m", "h", "d", "ms", "x", "MiB", "MB", "GiB", "TiB", "kb", "🦀"])
plausible = st.one_of(
    st.builds(lambda n, u: n + u, number_words, units),
    st.sampled_from(
        [
            "~",
            "~nosuch-user-cpg/state",
            "~/x",
            "relative/path",
            "/",
            "/tmp/\x00nul",
            "s3://",
            "s3://Bad_Bucket/x/",
            "s3://bucket-ok//x/",
            "s3://[::1/x/",
            "s3://bucket-ok/p?q#f",
            "http://bucket/x/",
            "host:99999",
            ":9464",
            "127.0.0.1:",
            "json",
            "CRC32C",
            "arn:",
            "READWRITE",
            "access-grants",
            "assume-role",
            "profile",
            "environment",
            "*",
            "s3://bucket-ok/prefix/*",
            "a/b",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
key_values = st.one_of(plausible, values)


@st.composite
def tables(draw: st.DrawFn, section: str) -> dict[str, Any]:
    known = KNOWN_KEYS[section]
    keys = draw(
        st.lists(st.sampled_from(known) | st.text(min_size=1, max_size=10), max_size=6, unique=True)
    )
    return {k: draw(key_values) for k in keys}


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A TOML document shaped like a config, with wrong, odd or missing values."""
    lines: list[str] = []
    for key, value in draw(
        st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=2)
    ).items():
        lines.append(f"{json.dumps(key, ensure_ascii=False)} = {toml_value(value)}")
    for section in ("daemon", "s3"):
        if draw(st.booleans()):
            lines.append(f"[{section}]")
            lines += [
                f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}"
                for k, v in draw(tables(section)).items()
            ]
    for section in ("credentials", "watch"):
        shape = draw(st.sampled_from(["none", "table", "array"]))
        items = (
            [draw(tables(section))]
            if shape == "table"
            else draw(st.lists(tables(section), max_size=3))
        )
        if shape == "none":
            continue
        if section == "watch" and draw(st.booleans()):  # mostly with the required keys
            for item in items:
                item.setdefault("path", "/data/outbox")
                item.setdefault("destination", "s3://staging-bucket/cpg0001-x/")
        for item in items:
            lines.append(f"[{section}]" if shape == "table" else f"[[{section}]]")
            lines += [
                f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in item.items()
            ]
    return "\n".join(lines) + "\n"


def loads_or_names_the_file(path: Path) -> Config | None:
    """The contract: a Config, or a ConfigError whose message names the file."""
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc), exc
        assert exc.file == str(path)
        assert "\n" not in exc.problem or "not valid TOML" in exc.problem, exc
        return None


@pytest.fixture
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="cpg-config-") as folder:
        yield Path(folder) / "config.toml"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents())
def test_generated_config_documents_load_or_raise_config_error(
    scratch: Path, document: str
) -> None:
    scratch.write_text(document, encoding="utf-8")
    loads_or_names_the_file(scratch)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.binary(max_size=300)
    | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_random_bytes_as_a_config_raise_config_error(scratch: Path, raw: bytes) -> None:
    scratch.write_bytes(raw)
    loads_or_names_the_file(scratch)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(section=st.sampled_from(sorted(KNOWN_KEYS)), key=st.data(), value=key_values)
def test_every_known_key_with_a_wrong_value_raises_config_error(
    scratch: Path, section: str, key: st.DataObject, value: Any
) -> None:
    name = key.draw(st.sampled_from(KNOWN_KEYS[section]))
    header = f"[[{section}]]" if section == "watch" else f"[{section}]"
    body = {name: value}
    if section == "watch":
        body = {"path": "/data/outbox", "destination": "s3://staging-bucket/cpg0001-x/", **body}
    text = header + "\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in body.items()) + "\n"
    scratch.write_text(text, encoding="utf-8")
    loads_or_names_the_file(scratch)


BAD_CONFIGS = {
    "not-toml": "[daemon\nstate_dir = 1\n",
    "unknown-key": "[s3]\nmax_concurency = 4\n",
    "negative-size": '[s3]\npart_size = "-5MiB"\n',
    "huge-size": "[s3]\npart_size = 99999999999999999999999999999999\n",
    "bad-duration": (
        '[[watch]]\npath = "/data/x"\ndestination = "s3://bucket-ok/p/"\nsettle = "5 fortnights"\n'
    ),
    "wrong-type": '[daemon]\nfile_attempts = "eight"\n',
    "unknown-home": '[daemon]\nstate_dir = "~nosuch-user-cpg/state"\n',
    "secret-in-file": '[credentials]\naws_secret_access_key = "do-not-echo-me"\n',
    "unicode": '[[watch]]\npath = "/dätä/🦀"\ndestination = "s3://BÜCKET/p/"\n',
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_check_offline_on_a_bad_config_exits_2_with_one_line(tmp_path: Path, name: str) -> None:
    config = tmp_path / f"{name}.toml"
    config.write_text(BAD_CONFIGS[name], encoding="utf-8")
    result = run_cli("check", "--offline", "-c", str(config))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or name == "not-toml", result.stderr
    assert str(config) in lines[0]
    assert "do-not-echo-me" not in result.stdout + result.stderr


def test_upload_to_a_bucket_that_does_not_exist_says_so_in_one_line(
    tmp_path: Path, s3_server: S3Server
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_bytes(b"1\n")
    missing = f"t-{uuid.uuid4().hex[:12]}"
    result = run_cli(
        "upload",
        str(tmp_path / "src"),
        f"s3://{missing}/x/",
        "--endpoint-url",
        s3_server.endpoint_url,
        "--state-dir",
        str(tmp_path / "oneshot"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "does not exist" in result.stderr


# -- (b) the control socket --------------------------------------------------------------


def request(command: Any, args: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "command": command, **extra}
    if args is not None:
        body["args"] = args
    return json.dumps(body).encode() + b"\n"


def status_of(path: Path) -> dict[str, Any]:
    [reply] = exchange(path, request("status"))
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


@pytest.fixture
def running(tmp_path: Path, s3_server: S3Server, bucket: str) -> Any:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "run.toml",
        state_dir=state,
        endpoint_url=s3_server.endpoint_url,
        watches=[
            {"name": "w", "path": str(outbox), "destination": f"s3://{bucket}/p/", "settle": "0.5s"}
        ],
    )
    daemon = Daemon(config, tmp_path / "run.log")
    try:
        daemon.wait_for_event("running")
        yield daemon, state / "control.sock", config
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]


WRONG_ARGS: list[Any] = [
    {"watch": 7},
    {"watch": ["w"]},
    {"watch": {"name": "w"}},
    {"watch": True},
    {"watch": ""},
    {"watch": "w" * 10_000},
    {"watch": "nope\x00"},
    {"watch": 1e308},
]


def test_every_command_with_wrong_argument_types_answers_an_error(running: Any) -> None:
    daemon, sock, _ = running
    commands = sorted(status_of(sock) and exchange(sock, request("help"))[0]["result"])
    assert {"status", "pause", "resume", "retry", "rescan", "verify", "reload"} <= set(commands)
    for command in ("pause", "resume", "retry", "rescan", "verify"):
        for args in WRONG_ARGS:
            [reply] = exchange(sock, request(command, args))
            assert reply["ok"] is False and "no watch named" in reply["error"], (
                command,
                args,
                reply,
            )
        for args in ("w", 7, None, [], True):
            [reply] = exchange(
                sock, json.dumps({"v": 1, "command": command, "args": args}).encode() + b"\n"
            )
            assert reply["ok"] is False and "args" in reply["error"], (command, args, reply)
    # Missing or mistyped top-level fields.
    for raw in (
        b"{}\n",
        b'{"v": 1}\n',
        b'{"v": 1, "command": null}\n',
        b'{"v": 1, "command": 7}\n',
        b'{"v": 1, "command": ["status"]}\n',
        b'{"v": null, "command": "status"}\n',
        b'{"v": "1", "command": "status"}\n',
        b'{"v": 1.0000001, "command": "status"}\n',
    ):
        [reply] = exchange(sock, raw)
        assert reply["ok"] is False and reply["error"], (raw, reply)
    # verify with odd flags still answers (flags are read as truthy or not).
    [reply] = exchange(sock, request("verify", {"quick": "yes", "rows": [1]}))
    assert "ok" in reply
    assert status_of(sock)["state"] == "running", "a refused pause paused anyway"
    assert daemon.process.poll() is None


def test_clients_that_vanish_mid_line_or_mid_reply_hurt_no_one(running: Any) -> None:
    daemon, sock, _ = running
    for payload in (
        b'{"v": 1, "comm',
        b"\xff" * 1000,
        b"x" * 200_000,
        request("status"),
        request("verify") * 20,
    ):
        for _ in range(10):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(sock))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                client.sendall(payload)
            # Close with unread replies: a reset when the daemon writes, not a clean EOF.
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            client.close()
    wait_until(lambda: status_of(sock)["state"] == "running", 20, "status after vanishing clients")
    assert daemon.process.poll() is None
    events = daemon.events()
    assert not [e for e in events if e.get("level") in ("error", "critical")], [
        e for e in events if e.get("level") in ("error", "critical")
    ][:3]


def test_200_connections_at_once_each_get_their_answer(running: Any) -> None:
    daemon, sock, config = running
    barrier = threading.Barrier(200, timeout=30)

    def one(i: int) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(60)
            barrier.wait()
            client.connect(str(sock))
            payload = request("status") if i % 2 else b"garbage " + str(i).encode() + b"\n"
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            reply: dict[str, Any] = json.loads(data)
            return reply

    with ThreadPoolExecutor(max_workers=200) as pool:
        replies = list(pool.map(one, range(200)))
    assert [r["ok"] for r in replies] == [bool(i % 2) for i in range(200)]
    assert all(r["result"]["state"] == "running" for r in replies if r["ok"])
    after = run_cli("status", "--json", "-c", str(config))
    assert after.returncode == 0, after.stderr
    assert daemon.process.poll() is None


# -- (c) a second daemon on the same state directory ------------------------------------


def test_second_daemon_on_the_same_state_dir_with_its_own_socket_is_refused(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """test_control.py covers a second daemon with the same config (same socket); one
    with its own socket but the same state directory would share the journal."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    state = tmp_path / "state"
    watches = [
        {"name": "w", "path": str(outbox), "destination": f"s3://{bucket}/p/", "settle": "0.5s"}
    ]
    first_config = write_config(
        tmp_path / "first.toml",
        state_dir=state,
        endpoint_url=s3_server.endpoint_url,
        watches=watches,
    )
    second_config = write_config(
        tmp_path / "second.toml",
        state_dir=state,
        endpoint_url=s3_server.endpoint_url,
        watches=watches,
        daemon={"socket": str(tmp_path / "other.sock")},
    )
    first = Daemon(first_config, tmp_path / "first.log")
    try:
        first.wait_for_event("running")
        (outbox / "one.csv").write_bytes(b"1\n")
        wait_until(
            lambda: [r["state"] for r in journal_rows(state)] == ["uploaded"], 30, "one upload"
        )
        rows = journal_rows(state)
        second = run_cli("run", "-c", str(second_config), timeout=30)
        output = second.stdout + second.stderr
        assert second.returncode != 0, output[-3000:]
        assert str(state) in output, output[-3000:]
        assert "already" in output, output[-3000:]
        assert "Traceback" not in output
        assert journal_rows(state) == rows
        assert first.process.poll() is None
        assert status_of(state / "control.sock")["files"]["uploaded"] == 1
    finally:
        assert first.terminate() == 0, first.log_text()[-3000:]
