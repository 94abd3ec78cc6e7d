"""The systemd units for this installation (``cpg-daemon install-service``).

The units ship inside the package (``data/cpg-daemon.service`` and
``data/cpg-daemon.socket``, the same files as ``systemd/`` in the repository), written
for an installation in /opt/cpg-daemon with its config in /etc/cpg-daemon. Rendering
puts in what differs on this machine: where cpg-daemon is installed, the config file,
the user, and what the config implies for systemd (the stop timeout, folders it must be
allowed to write, the control socket's path and group). With the defaults everywhere,
the rendered units are the shipped ones, byte for byte.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cpg_daemon.core.config import DEFAULT_SOCKET, DEFAULT_STATE_DIR, DaemonConfig, load_config

UNIT_NAME = "cpg-daemon.service"
SOCKET_UNIT_NAME = "cpg-daemon.socket"
"""The control socket, made by systemd (in daemon.socket_group) and passed to the service."""
DEFAULT_COMMAND = ("/opt/cpg-daemon/bin/cpg-daemon",)
DEFAULT_USER = "cpg-daemon"
RUNTIME_DIR = Path("/run/cpg-daemon")
"""The unit's RuntimeDirectory=, writable by the daemon."""
STOP_MARGIN = 10
"""Seconds systemd waits beyond daemon.drain_timeout before SIGKILL (TimeoutStopSec=)."""

_PLAIN_WORD = re.compile(r"[\w@+=:,./-]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*|[0-9]+")


def template(name: str = UNIT_NAME) -> str:
    """A unit as shipped (the service, or ``SOCKET_UNIT_NAME``)."""
    return (resources.files("cpg_daemon") / "data" / name).read_text(encoding="utf-8")


def installed_command() -> tuple[str, ...]:
    """How systemd starts the cpg-daemon that runs now.

    The console script beside this Python (in a venv, ``/opt/cpg-daemon/bin/``), or,
    when there is none, this Python with ``-m cpg_daemon``. The path is made absolute
    but not resolved: a venv's ``python`` is a symlink to the system's, and the venv
    is what has cpg-daemon installed.
    """
    python = Path(os.path.abspath(sys.executable))
    script = python.parent / "cpg-daemon"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(python), "-m", "cpg_daemon")


@dataclass(frozen=True)
class Installation:
    """What the unit needs to know about this machine."""

    config: Path
    command: tuple[str, ...] = DEFAULT_COMMAND
    user: str = DEFAULT_USER
    group: str = DEFAULT_USER
    aws_credentials: Path | None = None
    """The file for ``LoadCredential=``; None leaves it off."""
    stop_timeout: int = math.ceil(DaemonConfig().drain_timeout) + STOP_MARGIN
    writable: tuple[Path, ...] = ()
    """Folders outside the state and runtime directories the daemon must write."""
    socket: Path = DEFAULT_SOCKET
    """daemon.socket: where the socket unit listens."""
    socket_group: str = ""
    """daemon.socket_group: the socket's group ('': the daemon's group)."""


PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))
"""What the unit's PrivateTmp=yes replaces with empty folders of the service's own."""


def private_tmp_problem(path: Path) -> str | None:
    """Why the service would see ``path`` as an empty folder (PrivateTmp=yes), or None
    (always, where there is no systemd service: not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for tmp in PRIVATE_TMP:
        if Path(os.path.abspath(path)).is_relative_to(tmp):
            return (
                f"{path} is under {tmp}, which the service sees as an empty folder of its "
                "own (PrivateTmp=yes): move the folder, or set PrivateTmp=no in a drop-in "
                "(systemctl edit cpg-daemon)"
            )
    return None


def installation(
    config: Path,
    *,
    user: str = DEFAULT_USER,
    group: str | None = None,
    aws_credentials: Path | None = None,
) -> tuple[Installation, list[str]]:
    """This machine's installation, and notes for the person installing it.

    Reads the config when it exists (a bad one raises ConfigError, as for every
    command), for its drain_timeout, state_dir and socket.
    """
    config = Path(os.path.abspath(config))
    group = user if group is None else group
    for kind, name in (("user", user), ("group", group)):
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid {kind} name")
    if aws_credentials is not None:
        aws_credentials = Path(os.path.abspath(aws_credentials))
    notes = []
    if config.exists():
        loaded = load_config(config)
        daemon = loaded.daemon
        for watch in loaded.watches:
            problem = private_tmp_problem(watch.path)
            if problem is not None:
                notes.append(f"watch {watch.name}: {problem}")
    else:
        daemon = DaemonConfig()
        notes.append(
            f"{config} does not exist yet; the unit assumes the defaults "
            f"(state in {daemon.state_dir}, socket {daemon.socket}, drain_timeout "
            f"{daemon.drain_timeout:g} s)"
        )
    writable: list[Path] = []
    for path in (daemon.state_dir, daemon.socket.parent):
        if not any(path.is_relative_to(p) for p in [DEFAULT_STATE_DIR, RUNTIME_DIR, *writable]):
            writable.append(path)
    for path in writable:
        notes.append(
            f"{path} is outside {DEFAULT_STATE_DIR} and {RUNTIME_DIR}: the unit allows "
            f"writing there (ReadWritePaths=); it must exist and be writable by {user}"
        )
    if daemon.socket_group and not _NAME.fullmatch(daemon.socket_group):
        raise ValueError(f"{daemon.socket_group!r} is not a valid group name (socket_group)")
    # POSIX only, imported where used: `check` imports this module on any system.
    import grp
    import pwd

    if daemon.socket_group and not _exists(grp.getgrnam, daemon.socket_group):
        notes.append(
            f"there is no group {daemon.socket_group!r} (daemon.socket_group) yet: systemd "
            f"will not make the control socket until there is (groupadd {daemon.socket_group})"
        )
    if not _exists(pwd.getpwnam, user):
        notes.append(
            f"there is no user {user!r} yet: useradd --system --home-dir {DEFAULT_STATE_DIR} "
            f"--shell /usr/sbin/nologin {user}"
        )
    elif group != user and not _exists(grp.getgrnam, group):
        notes.append(f"there is no group {group!r}")
    if aws_credentials is not None and not aws_credentials.is_file():
        notes.append(
            f"{aws_credentials} does not exist: systemd will not start the service until it does"
        )
    return (
        Installation(
            config=config,
            command=installed_command(),
            user=user,
            group=group,
            aws_credentials=aws_credentials,
            stop_timeout=math.ceil(daemon.drain_timeout) + STOP_MARGIN,
            writable=tuple(writable),
            socket=Path(os.path.abspath(daemon.socket)),
            socket_group=daemon.socket_group,
        ),
        notes,
    )


def render(installation: Installation, unit: str | None = None) -> str:
    """The unit (by default the shipped one) with this installation's values put in."""
    executable, *arguments = installation.command
    if any(c in executable for c in "\"'\\"):
        raise ValueError(f"systemd cannot start a program whose path has quotes: {executable}")
    command = " ".join([_quote(executable, dollars=False)] + [_quote(word) for word in arguments])
    config = _quote(str(installation.config))
    lines = {
        "ExecStart=": f"ExecStart={command} run -c {config}",
        "ExecReload=": f"ExecReload={command} reload -c {config}",
        "User=": f"User={installation.user}",
        "Group=": f"Group={installation.group}",
        "TimeoutStopSec=": f"TimeoutStopSec={installation.stop_timeout}s",
    }
    if installation.aws_credentials is not None:
        source = _quote(str(installation.aws_credentials), dollars=False, quote=False)
        lines["#LoadCredential="] = f"LoadCredential=aws-credentials:{source}"
    if installation.writable:
        paths = " ".join(_quote(str(path), dollars=False) for path in installation.writable)
        lines["#ReadWritePaths="] = f"ReadWritePaths={paths}"
    return _fill(template() if unit is None else unit, lines)


def render_socket(installation: Installation, unit: str | None = None) -> str:
    """The socket unit (by default the shipped one) for this installation: its path is
    daemon.socket, its owner the daemon's user, its group daemon.socket_group (or the
    daemon's group)."""
    path = _quote(str(installation.socket), dollars=False, quote=False)
    lines = {
        "ListenStream=": f"ListenStream={path}",
        "SocketUser=": f"SocketUser={installation.user}",
        "SocketGroup=": f"SocketGroup={installation.socket_group or installation.group}",
    }
    return _fill(template(SOCKET_UNIT_NAME) if unit is None else unit, lines)


def _fill(unit: str, lines: dict[str, str]) -> str:
    """``unit`` with the first line starting with each key replaced by its value."""
    out = []
    replaced = set()
    for line in unit.splitlines(keepends=True):
        prefix = next((p for p in lines if line.startswith(p)), None)
        if prefix is not None and prefix not in replaced:
            replaced.add(prefix)
            line = lines[prefix] + "\n"
        out.append(line)
    missing = sorted(set(lines) - replaced)
    if missing:  # the shipped template and this module disagree: a packaging bug
        raise RuntimeError(f"the unit template has no line starting {', '.join(missing)}")
    return "".join(out)


def write_unit(text: str, path: Path, name: str = UNIT_NAME) -> Path:
    """Write a unit to ``path`` (or ``path/NAME`` for a folder).

    Atomically, mode 0644 whatever the umask: systemd never sees half a file, and a
    failed write leaves the old unit in place.
    """
    if path.is_dir():
        path = path / name
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def _quote(word: str, *, dollars: bool = True, quote: bool = True) -> str:
    """One value as systemd reads it back: ``%`` specifiers escaped, and ``$`` variables
    where systemd expands them (``dollars``: the arguments of Exec lines, not the
    program's path); quoted when it has spaces or quotes."""
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise ValueError(f"{word!r} has control characters; systemd cannot take it")
    escaped = word.replace("%", "%%")
    if dollars:
        escaped = escaped.replace("$", "$$")
    if not quote or _PLAIN_WORD.fullmatch(word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
