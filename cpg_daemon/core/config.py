"""The TOML configuration, read into frozen dataclasses.

Every problem raises ConfigError naming the file, the key and what is wrong;
unknown keys are errors with a suggestion when a known key is close. Nothing
here exits the process: the command line turns ConfigError into exit status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

from cpg_daemon.core.bandwidth import BandwidthLimit, parse_bandwidth
from cpg_daemon.core.checksums import CHECKSUM_NAMES, ChecksumName
from cpg_daemon.core.errors import ConfigError
from cpg_daemon.core.objectkeys import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    S3Location,
    glob_problem,
    manifest_folder,
    object_key,
    parse_grant_target,
    parse_s3_uri,
)
from cpg_daemon.core.units import parse_duration, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/cpg-daemon/config.toml")
DEFAULT_SOCKET = Path("/run/cpg-daemon/control.sock")
DEFAULT_STATE_DIR = Path("/var/lib/cpg-daemon")
DEFAULT_EXCLUDE = (".*", "**/.*", "*.tmp", "**/*.tmp", "**/Thumbs.db")
DEFAULT_REGION = "us-east-1"

CANNED_ACLS = (
    "",
    "private",
    "bucket-owner-full-control",
    "bucket-owner-read",
    "authenticated-read",
    "public-read",
    "aws-exec-read",
)
LogFormat = Literal["json", "console", "auto"]
GALLERY_BUCKET = "staging-cellpainting-gallery"
GALLERY_GRANTS_ACCOUNT = "309624411020"
"""The gallery's S3 Access Grants instance (its guide's get-data-access --account-id)."""
CredentialSource = Literal["access-grants", "assume-role", "profile", "environment", "handed-over"]
StructurePolicy = Literal["warn", "reject", "off"]
DataPlane = Literal["auto", "crt", "botocore"]
DATA_PLANES: tuple[DataPlane, ...] = ("auto", "crt", "botocore")


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    socket: Path = DEFAULT_SOCKET
    log_format: LogFormat = "auto"
    log_level: str = "info"
    socket_group: str = ""
    metrics_listen: str = ""
    rescan_interval: float = 600.0
    """Seconds between full walks of every watch, the safety net for missed events."""
    drain_timeout: float = 20.0
    """Seconds in-flight requests get to finish after SIGTERM before they are cancelled."""
    file_attempts: int = 8
    """Attempts at one file (each with botocore's own retries) before it is marked failed."""


@dataclass(frozen=True)
class S3Config:
    region: str = DEFAULT_REGION
    endpoint_url: str = ""
    acl: str = "bucket-owner-full-control"
    max_concurrency: int = 64
    part_size: int = 8 * 1024**2
    multipart_threshold: int = 64 * 1024**2
    checksum: ChecksumName = "CRC32C"
    max_bandwidth: BandwidthLimit = field(default_factory=BandwidthLimit)
    """Bytes per second for all uploads together, or a timetable of such limits by
    local time of day (``core.bandwidth``); unlimited by default. A reload applies it."""
    max_bytes_in_flight: int = 24 * 1024**2
    """File bytes held in memory for requests in flight, all uploads together, at the
    starting number of requests (it scales with the requests allowed; the default keeps
    the whole process near 120 MiB on a LAN)."""
    request_attempts: int = 5
    """Attempts at one request (retrying throttling, 5xx and network errors) before giving up."""
    data_plane: DataPlane = "auto"
    """Who sends the file bytes: awscrt ("crt"), aiobotocore ("botocore"), or "auto"
    (crt, unless an HTTP proxy is set for the endpoint: awscrt does not read proxy variables)."""


@dataclass(frozen=True)
class CredentialsConfig:
    source: CredentialSource = "environment"
    profile: str = ""
    account_id: str = ""
    target: str = ""
    permission: str = "READWRITE"
    duration: float = 12 * 3600.0
    refresh_before: float = 30 * 60.0
    endpoint_url: str = ""
    role_arn: str = ""
    warn_before: float = 3600.0
    """How long before keys the daemon cannot renew itself expire it warns (log, status,
    systemd's status line, metrics)."""


@dataclass(frozen=True)
class WatchConfig:
    name: str
    path: Path
    destination: S3Location
    settle: float = 30.0
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    ready_marker: str = ""
    structure: StructurePolicy = "warn"
    on_batch_complete: str = ""
    upload_manifest: bool = False
    """Upload each completed batch's manifest (and its ``.sha256``) to
    ``objectkeys.manifest_key``, beside the data, with the watch's own keys."""
    object_name: str = ""
    """``cpg-daemon upload`` of one file or object to a named key (``aws s3 cp``'s
    destination without a trailing ``/``): its name below ``destination``, instead of
    the file's own. Never read from a configuration file."""

    def key_for(self, rel_path: str) -> str:
        """The object key of the file at ``rel_path`` below the watch's root."""
        return object_key(self.destination.prefix, self.object_name or rel_path)


@dataclass(frozen=True)
class Config:
    path: Path | None
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    s3: S3Config = field(default_factory=S3Config)
    credentials: tuple[CredentialsConfig, ...] = (CredentialsConfig(),)
    watches: tuple[WatchConfig, ...] = ()

    def watch(self, name: str) -> WatchConfig:
        for watch in self.watches:
            if watch.name == name:
                return watch
        known = ", ".join(w.name for w in self.watches) or "none"
        raise KeyError(f"no watch named {name!r} (watches: {known})")


def default_config_path() -> Path:
    """``$CPG_DAEMON_CONFIG``, else ``/etc/cpg-daemon/config.toml``."""
    env = os.environ.get("CPG_DAEMON_CONFIG", "")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _check_who_may_write(file: str, info: os.stat_result) -> None:
    """Whoever may change the configuration may send the data elsewhere, or have the
    daemon run their command (``on_batch_complete``) as its user: only root and the user
    reading it may."""
    mode = stat.S_IMODE(info.st_mode)
    risk = "could send the data elsewhere or have the daemon run their command"
    if mode & stat.S_IWOTH:
        raise ConfigError(
            file,
            "",
            f"the configuration file is writable by every user (mode {mode:04o}): anyone "
            f"{risk}. Fix it with: chmod o-w {file}",
        )
    if mode & stat.S_IWGRP and info.st_gid != 0:
        raise ConfigError(
            file,
            "",
            f"the configuration file is writable by the group {_group_name(info.st_gid)} "
            f"(mode {mode:04o}): its members {risk}. Fix it with: chmod g-w {file}",
        )
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            file,
            "",
            f"the configuration file belongs to {_user_name(info.st_uid)}, who {risk}; it "
            f"must belong to root or to the user reading it. Fix it with: chown root {file}",
        )


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        return f"user {uid}"


def _group_name(gid: int) -> str:
    import grp

    try:
        return repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        return str(gid)


def load_config(path: Path, *, default_region: str = DEFAULT_REGION) -> Config:
    """Read and validate a configuration file.

    ``default_region``: ``s3.region`` when the file names none. The daemon's is
    us-east-1 (where the gallery's grants are), whatever the environment of whoever
    started it; the one-shot commands pass "" and look where the AWS CLI looks.
    """
    file = str(path)
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigError(file, "", "the configuration file does not exist") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the configuration file: {exc.strerror}") from None
    if stat.S_ISREG(info.st_mode) and os.name == "posix":  # Windows has ACLs, not these bits
        _check_who_may_write(file, info)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "", "the file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        pasted = _AWS_PROFILE_SECTION.search(raw.decode("utf-8", "replace"))
        if pasted is not None:
            raise ConfigError(file, "", _aws_profile_pasted(pasted.group(1))) from None
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    return parse_config(data, path, default_region=default_region)


_AWS_PROFILE_SECTION = re.compile(r"^\s*\[profile\s+([^\]\s]+)\s*\]", re.MULTILINE)
"""``[profile NAME]``: a section of ~/.aws/config, which is not TOML."""
_AWS_PROFILE_KEYS = re.compile(
    r"^(aws_|region$|output$|credential_process$|sso_|role_arn$|source_profile$)"
)


def _aws_profile_pasted(name: str) -> str:
    return (
        f"[{name}] / [profile {name}] is an AWS profile, which belongs in the AWS files of "
        "the user running cpg-daemon, not here: its keys in ~/.aws/credentials under "
        f"[{name}] (mode 0600), other settings in ~/.aws/config under [profile {name}]. "
        f'Then, here: [credentials] source = "profile" (or "access-grants") and '
        f'profile = "{name}"'
    )


def parse_config(
    data: Mapping[str, Any], path: Path | None, *, default_region: str = DEFAULT_REGION
) -> Config:
    """Validate an already-parsed TOML document (``path`` is only used in messages;
    ``default_region`` as for ``load_config``)."""
    reader = _Reader(str(path) if path else "<config>")
    for name, value in data.items():
        known = name in ("daemon", "s3", "credentials", "watch")
        if not known and isinstance(value, dict) and any(map(_AWS_PROFILE_KEYS.match, value)):
            reader.fail(name, _aws_profile_pasted(name))
    reader.only_keys(data, "", ("daemon", "s3", "credentials", "watch"))
    daemon = _daemon(reader, reader.table(data, "daemon"))
    s3 = _s3(reader, reader.table(data, "s3"), default_region)
    raw_credentials = data.get("credentials", {})
    if isinstance(raw_credentials, list):
        if not raw_credentials:
            reader.fail("credentials", "an empty [[credentials]] list; write at least one table")
        credentials = tuple(
            _credentials(reader, reader.table_at(item, f"credentials[{i}]"), f"credentials[{i}]")
            for i, item in enumerate(raw_credentials)
        )
    else:
        credentials = (_credentials(reader, reader.table(data, "credentials"), "credentials"),)
    raw_watches = data.get("watch", [])
    if not isinstance(raw_watches, list):
        reader.fail("watch", "write each watch as a [[watch]] table (double brackets)")
    watches = tuple(
        _watch(reader, reader.table_at(item, f"watch[{i}]"), f"watch[{i}]")
        for i, item in enumerate(raw_watches)
    )
    names: dict[str, int] = {}
    for i, watch in enumerate(watches):
        if watch.name in names:
            reader.fail(
                f"watch[{i}].name",
                f"the name {watch.name!r} is already used by watch[{names[watch.name]}]; "
                "give each watch its own name",
            )
        names[watch.name] = i
    return Config(path, daemon, s3, credentials, watches)


T = TypeVar("T")
_SECRET_KEY = re.compile(r"secret|access_key|session_token|password", re.IGNORECASE)


class _Reader:
    """Typed access to TOML values that fails with the file and the dotted key."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(self.file, key, problem)

    def only_keys(self, table: Mapping[str, Any], where: str, known: tuple[str, ...]) -> None:
        for key in table:
            name = f"{where}.{key}" if where else key
            if _SECRET_KEY.search(key):
                self.fail(
                    name,
                    "keys do not belong in the configuration file, which is not a secret: "
                    "put them in the AWS credentials file of the profile (mode 0600), or "
                    "give them to the service with systemd's LoadCredential=aws-credentials:...",
                )
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                allowed = ", ".join(known)
                self.fail(name, f"unknown key{hint} (known keys here: {allowed})")

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        return self.table_at(value, key)

    def table_at(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table ([{key}]), got {_kind(value)}")
        return cast("Mapping[str, Any]", value)

    def get(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        convert: Callable[[object], T],
        default: T,
    ) -> T:
        if key not in table:
            return default
        try:
            return convert(table[key])
        except (ValueError, TypeError) as exc:
            raise ConfigError(self.file, f"{where}.{key}", str(exc)) from None


def _kind(value: object) -> str:
    return {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return value


def _choice(*choices: str) -> Callable[[object], Any]:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in choices:
            close = difflib.get_close_matches(text, [c for c in choices if c], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{text!r} is not one of {listed}{hint}")
        return text

    return convert


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _int_range(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {_kind(value)}")
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range: use {low} to {high}")
        return value

    return convert


def _size_range(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        size = parse_size(value)
        if not low <= size <= high:
            raise ValueError(f"{value!r} is out of range: use {low} to {high} bytes")
        return size

    return convert


def _duration_range(low: float, high: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if not low <= seconds <= high:
            raise ValueError(f"{value!r} is out of range: use {low:g}s to {high:g}s")
        return seconds

    return convert


def _path(value: object) -> Path:
    text = _string(value)
    if not text:
        raise ValueError("a path cannot be empty")
    if text.startswith("s3://"):
        raise ValueError(
            f"{text!r}: a watch follows a local folder; to copy from another bucket, run "
            "cpg-daemon upload s3://BUCKET/PREFIX/ s3://DESTINATION/ (README: from an S3 bucket)"
        )
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" for a user this machine does not know
        raise ValueError(
            f"{text!r}: '~' names no home directory here; write the full path"
        ) from None
    if not path.is_absolute():
        start = "/" if os.name == "posix" else "its drive (C:\\)"
        raise ValueError(f"{text!r} is not an absolute path; write the full path from {start}")
    return path


def _patterns(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError('expected a list of glob patterns, such as ["**/*.tif"]')
    patterns = tuple(cast("list[str]", value))
    for pattern in patterns:
        problem = glob_problem(pattern)
        if problem is not None:
            raise ValueError(f"{pattern!r}: {problem}")
    return patterns


def _include_patterns(value: object) -> tuple[str, ...]:
    patterns = _patterns(value)
    if not patterns:
        raise ValueError('an empty include list selects nothing; use ["**"] for everything')
    return patterns


def _listen_address(value: object) -> str:
    text = _string(value)
    if text:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f'{text!r} is not HOST:PORT, such as "127.0.0.1:9464"')
    return text


def _target(value: object) -> str:
    text = _string(value)
    if text:
        parse_grant_target(text)  # ValueError with the fix
    return text


def _endpoint(value: object) -> str:
    text = _string(value)
    if text and not text.startswith(("http://", "https://")):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


_PERMISSION = _choice("READ", "WRITE", "READWRITE")


def _daemon(reader: _Reader, table: Mapping[str, Any]) -> DaemonConfig:
    w = "daemon"
    d = DaemonConfig()
    reader.only_keys(
        table,
        w,
        (
            "state_dir",
            "socket",
            "log_format",
            "log_level",
            "socket_group",
            "metrics_listen",
            "rescan_interval",
            "drain_timeout",
            "file_attempts",
        ),
    )
    log_format = reader.get(table, w, "log_format", _choice("json", "console", "auto"), "auto")
    log_level = reader.get(
        table, w, "log_level", _choice("debug", "info", "warning", "error"), d.log_level
    )
    return DaemonConfig(
        state_dir=reader.get(table, w, "state_dir", _path, d.state_dir),
        socket=reader.get(table, w, "socket", _path, d.socket),
        log_format=cast("LogFormat", log_format),
        log_level=log_level,
        socket_group=reader.get(table, w, "socket_group", _string, d.socket_group),
        metrics_listen=reader.get(table, w, "metrics_listen", _listen_address, ""),
        rescan_interval=reader.get(
            table, w, "rescan_interval", _duration_range(5, 7 * 86400), d.rescan_interval
        ),
        drain_timeout=reader.get(
            table, w, "drain_timeout", _duration_range(0, 3600), d.drain_timeout
        ),
        file_attempts=reader.get(table, w, "file_attempts", _int_range(1, 1000), d.file_attempts),
    )


def _s3(reader: _Reader, table: Mapping[str, Any], default_region: str) -> S3Config:
    w = "s3"
    d = S3Config()
    reader.only_keys(
        table,
        w,
        (
            "region",
            "endpoint_url",
            "acl",
            "max_concurrency",
            "part_size",
            "multipart_threshold",
            "checksum",
            "max_bandwidth",
            "max_bytes_in_flight",
            "request_attempts",
            "data_plane",
        ),
    )
    checksum = reader.get(table, w, "checksum", _choice(*CHECKSUM_NAMES), d.checksum)
    return S3Config(
        region=reader.get(table, w, "region", _string, "") or default_region,
        endpoint_url=reader.get(table, w, "endpoint_url", _endpoint, ""),
        acl=reader.get(table, w, "acl", _choice(*CANNED_ACLS), d.acl),
        max_concurrency=reader.get(
            table, w, "max_concurrency", _int_range(1, 1024), d.max_concurrency
        ),
        part_size=reader.get(
            table, w, "part_size", _size_range(MIN_PART_SIZE, MAX_PART_SIZE), d.part_size
        ),
        multipart_threshold=reader.get(
            table,
            w,
            "multipart_threshold",
            _size_range(MIN_PART_SIZE, MAX_PART_SIZE),
            d.multipart_threshold,
        ),
        checksum=checksum,
        max_bandwidth=reader.get(table, w, "max_bandwidth", parse_bandwidth, d.max_bandwidth),
        max_bytes_in_flight=reader.get(
            table,
            w,
            "max_bytes_in_flight",
            _size_range(MIN_PART_SIZE, MAX_PART_SIZE * 4),
            d.max_bytes_in_flight,
        ),
        request_attempts=reader.get(
            table, w, "request_attempts", _int_range(1, 50), d.request_attempts
        ),
        data_plane=reader.get(table, w, "data_plane", _choice(*DATA_PLANES), d.data_plane),
    )


def _credentials(reader: _Reader, table: Mapping[str, Any], w: str) -> CredentialsConfig:
    d = CredentialsConfig()
    reader.only_keys(
        table,
        w,
        (
            "source",
            "profile",
            "account_id",
            "target",
            "permission",
            "duration",
            "refresh_before",
            "endpoint_url",
            "role_arn",
            "warn_before",
        ),
    )
    source: CredentialSource = reader.get(
        table,
        w,
        "source",
        _choice("access-grants", "assume-role", "profile", "environment", "handed-over"),
        d.source,
    )
    credentials = CredentialsConfig(
        source=source,
        profile=reader.get(table, w, "profile", _string, ""),
        account_id=reader.get(table, w, "account_id", _string, ""),
        target=reader.get(table, w, "target", _target, ""),
        permission=reader.get(table, w, "permission", _PERMISSION, "READWRITE"),
        duration=reader.get(table, w, "duration", _duration_range(900, 43200), d.duration),
        refresh_before=reader.get(
            table, w, "refresh_before", _duration_range(0, 43200), d.refresh_before
        ),
        endpoint_url=reader.get(table, w, "endpoint_url", _endpoint, ""),
        role_arn=reader.get(table, w, "role_arn", _string, ""),
        warn_before=reader.get(
            table, w, "warn_before", _duration_range(0, 43200), d.warn_before
        ),
    )
    if source == "profile" and not credentials.profile:
        reader.fail(f"{w}.profile", 'source = "profile" needs the name of an AWS profile')
    if source == "handed-over" and not credentials.target:
        reader.fail(
            f"{w}.target",
            'handed-over keys need the target they were obtained for, such as '
            '"s3://staging-cellpainting-gallery/cpg0123-example/*"',
        )
    if source == "access-grants":
        if not credentials.account_id.isdigit() or len(credentials.account_id) != 12:
            reader.fail(f"{w}.account_id", "Access Grants needs the 12-digit AWS account id")
        if not credentials.target:
            reader.fail(
                f"{w}.target", 'Access Grants needs a target such as "s3://bucket/prefix/*"'
            )
    if source == "assume-role" and not credentials.role_arn.startswith("arn:"):
        reader.fail(f"{w}.role_arn", 'source = "assume-role" needs role_arn = "arn:aws:iam:..."')
    if credentials.refresh_before >= credentials.duration:
        reader.fail(f"{w}.refresh_before", "must be shorter than duration")
    return credentials


def _watch(reader: _Reader, table: Mapping[str, Any], w: str) -> WatchConfig:
    reader.only_keys(
        table,
        w,
        (
            "name",
            "path",
            "destination",
            "settle",
            "include",
            "exclude",
            "ready_marker",
            "structure",
            "on_batch_complete",
            "upload_manifest",
        ),
    )
    if "path" not in table:
        reader.fail(f"{w}.path", 'missing: the folder to watch, such as "/data/outbox/Batch8"')
    if "destination" not in table:
        reader.fail(
            f"{w}.destination",
            'missing: where files go, such as "s3://staging-cellpainting-gallery/cpg0123-x/..."',
        )
    path = reader.get(table, w, "path", _path, Path("/"))
    destination = reader.get(table, w, "destination", lambda v: parse_s3_uri(_string(v)), None)
    assert destination is not None
    name = reader.get(table, w, "name", _string, "") or path.name or str(path)
    structure = reader.get(table, w, "structure", _choice("warn", "reject", "off"), "warn")
    marker = reader.get(table, w, "ready_marker", _string, "")
    if "/" in marker:
        reader.fail(f"{w}.ready_marker", "a file name (looked for in each top-level folder)")
    upload_manifest = reader.get(table, w, "upload_manifest", _bool, False)
    if upload_manifest:
        try:
            manifest_folder(destination)
        except ValueError as exc:
            reader.fail(
                f"{w}.upload_manifest",
                f"{exc}: point the destination at or below a source folder "
                "(s3://BUCKET/cpgNNNN-name/SOURCE/...), or set upload_manifest = false",
            )
    return WatchConfig(
        name=name,
        path=path,
        destination=destination,
        settle=reader.get(table, w, "settle", _duration_range(0, 86400), 30.0),
        include=reader.get(table, w, "include", _include_patterns, ("**",)),
        exclude=reader.get(table, w, "exclude", _patterns, DEFAULT_EXCLUDE),
        ready_marker=marker,
        structure=cast("StructurePolicy", structure),
        on_batch_complete=reader.get(table, w, "on_batch_complete", _string, ""),
        upload_manifest=upload_manifest,
    )
