"""The systemd unit: it passes ``systemd-analyze verify``, keeps its sandbox score, and
``cpg-daemon install-service`` renders it for this installation.

``systemd-analyze`` runs offline here (no running systemd needed); the tests that use it
skip, saying why, on a machine without it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonproc import write_config

from cpg_daemon.cli import main as cli
from cpg_daemon.core.config import DEFAULT_CONFIG_PATH, DEFAULT_SOCKET
from cpg_daemon.ops import service

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "systemd" / "cpg-daemon.service"
SHIPPED_SOCKET = REPO / "systemd" / "cpg-daemon.socket"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)

MAX_EXPOSURE = 1.8
"""`systemd-analyze security` scored the unit 1.4 ("OK") with systemd 252; the margin
allows for other versions' weights. A unit with only User= scores 9.2."""
EXPOSURE_ON_252 = 1.4
"""On systemd 252, where it was measured, the score may not grow at all."""

EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def _copy_with_real_executable(tmp_path: Path) -> Path:
    unit = SHIPPED.read_text(encoding="utf-8")
    assert "/opt/cpg-daemon/bin/cpg-daemon " in unit
    # verify checks that the executable exists: this installation's cpg-daemon does
    unit = unit.replace("/opt/cpg-daemon/bin/cpg-daemon", service.installed_command()[0])
    copy = tmp_path / "cpg-daemon.service"
    copy.write_text(unit, encoding="utf-8")
    return copy


def _verify(unit: Path, *more: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit), *map(str, more)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _complaints(result: subprocess.CompletedProcess[str], unit: Path) -> list[str]:
    """verify's messages about our unit. Lines about other units of this machine (which
    verify loads as dependencies) are not ours to fix; none appear on systemd 252."""
    output = (result.stdout + result.stderr).splitlines()
    return [line for line in output if unit.name in line or str(unit.parent) in line]


def _assert_verifies(unit: Path, *more: Path) -> None:
    result = _verify(unit, *more)
    everything = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, everything
    assert _complaints(result, unit) == [], everything


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_the_repository_unit_is_the_one_the_package_ships() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == service.template(), (
        "systemd/cpg-daemon.service and cpg_daemon/data/cpg-daemon.service differ: "
        "edit one, copy it over the other"
    )


def test_rendering_with_the_defaults_gives_the_shipped_unit() -> None:
    """The template's paths and values are the ones install-service replaces."""
    default = service.Installation(config=DEFAULT_CONFIG_PATH)
    assert service.render(default) == service.template()


def test_the_unit_is_a_notify_service_with_watchdog_reload_and_sandbox() -> None:
    lines = set(service.template().splitlines())
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/opt/cpg-daemon/bin/cpg-daemon reload -c /etc/cpg-daemon/config.toml",
        "WatchdogSec=60s",
        "Restart=on-failure",
        "TimeoutStopSec=30s",
        "User=cpg-daemon",
        "StateDirectory=cpg-daemon",
        "RuntimeDirectory=cpg-daemon",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitCORE=0",
    ):
        assert expected in lines, expected


@needs_systemd_analyze
def test_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _assert_verifies(_copy_with_real_executable(tmp_path))


@needs_systemd_analyze
def test_verify_would_notice_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is reported against our file."""
    unit = _copy_with_real_executable(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHomes="), encoding="utf-8")
    assert _complaints(_verify(unit), unit) != []


@needs_systemd_analyze
def test_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = _copy_with_real_executable(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = EXPOSURE.search(result.stdout)
    assert match, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    version = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.split()
    allowed = EXPOSURE_ON_252 if version[:2] == ["systemd", "252"] else MAX_EXPOSURE
    assert float(match.group(1)) <= allowed, result.stdout


def test_install_service_prints_the_unit_for_this_installation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        state_dir=Path("/var/lib/cpg-daemon"),
        endpoint_url="",
        watches=[],
        daemon={"socket": "/run/cpg-daemon/control.sock", "drain_timeout": "45s"},
    )
    assert cli.main(["install-service", "-c", str(config), "--user", "uploader"]) == 0
    out, err = capsys.readouterr()
    command = service.installed_command()
    assert command[0].startswith(str(Path(sys.executable).parent))
    lines = out.splitlines()
    assert f"ExecStart={' '.join(command)} run -c {config}" in lines
    assert f"ExecReload={' '.join(command)} reload -c {config}" in lines
    assert "User=uploader" in lines and "Group=uploader" in lines
    assert "TimeoutStopSec=55s" in lines  # drain_timeout + 10 s
    assert "#LoadCredential=aws-credentials:/etc/cpg-daemon/aws-credentials" in lines
    assert "#ReadWritePaths=" in lines  # state and socket in the unit's own folders
    assert "there is no user 'uploader' yet: useradd --system" in err


def test_a_watch_under_tmp_is_named_by_install_service_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unit's PrivateTmp=yes gives the service an empty /tmp of its own: a watch there
    would be watched, walked and found empty, silently."""
    config = write_config(
        tmp_path / "config.toml",
        state_dir=tmp_path / "state",
        endpoint_url="",
        watches=[
            {"name": "scratch", "path": "/var/tmp/outbox", "destination": "s3://bkt/p/"},
            {"name": "data", "path": "/data/outbox", "destination": "s3://bkt/q/"},
        ],
    )
    assert cli.main(["install-service", "-c", str(config)]) == 0
    err = capsys.readouterr().err
    assert "watch scratch: /var/tmp/outbox is under /var/tmp" in err and "PrivateTmp" in err
    assert "watch data" not in err
    # In a process of its own: check sets up logging for the whole process.
    out = subprocess.run(
        [sys.executable, "-m", "cpg_daemon", "check", "--offline", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    assert "  warning: /var/tmp/outbox is under /var/tmp" in out
    assert out.count("PrivateTmp=yes") == 1


@needs_systemd_analyze
def test_rendered_unit_with_awkward_paths_passes_verify(tmp_path: Path) -> None:
    """Spaces, quotes, % and $ in paths come back out of systemd's parser intact: verify
    finds the executable only if its path was escaped right."""
    programs = tmp_path / "bin dir %i $HOME"
    programs.mkdir()
    (programs / "cpg-daemon").symlink_to(service.installed_command()[0])
    etc = tmp_path / 'etc %n $HOME "q"'
    installation = service.Installation(
        config=etc / "config.toml",
        command=(str(programs / "cpg-daemon"),),
        aws_credentials=etc / "aws-credentials",
        writable=(tmp_path / "state 100%",),
    )
    unit = tmp_path / "cpg-daemon.service"
    unit.write_text(service.render(installation), encoding="utf-8")
    text = unit.read_text()
    executable = f'"{tmp_path}/bin dir %%i $HOME/cpg-daemon"'  # $ is not expanded there
    config = f'"{tmp_path}/etc %%n $$HOME \\"q\\"/config.toml"'
    assert f"\nExecStart={executable} run -c {config}\n" in text
    assert f"\nExecReload={executable} reload -c {config}\n" in text
    assert f'\nReadWritePaths="{tmp_path}/state 100%%"\n' in text
    credentials = f'{tmp_path}/etc %%n $HOME "q"/aws-credentials'  # taken as it is, but %
    assert f"\nLoadCredential=aws-credentials:{credentials}\n" in text
    _assert_verifies(unit)

    unit.write_text(text.replace("%%i", "%i"), encoding="utf-8")
    assert _complaints(_verify(unit), unit) != []


def test_a_state_dir_elsewhere_becomes_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        state_dir=Path("/srv/cpg-state"),
        endpoint_url="",
        watches=[],
        daemon={"socket": "/run/cpg-daemon/control.sock"},
    )
    installation, notes = service.installation(config)
    assert installation.writable == (Path("/srv/cpg-state"),)
    socket_inside = write_config(
        tmp_path / "inside.toml", state_dir=Path("/srv/cpg-state"), endpoint_url="", watches=[]
    )  # write_config puts the socket in the state folder: one path is enough
    assert service.installation(socket_inside)[0].writable == (Path("/srv/cpg-state"),)
    assert "ReadWritePaths=/srv/cpg-state\n" in service.render(installation)
    assert any("/srv/cpg-state is outside" in note for note in notes)


@needs_systemd_analyze
def test_install_service_writes_the_unit_atomically_with_mode_0644(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], umask_077: None
) -> None:
    folder = tmp_path / "system"
    folder.mkdir()
    target = folder / "cpg-daemon.service"
    target.write_text("old\n")
    args = ["install-service", "-c", str(tmp_path / "absent.toml"), "--aws-credentials"]
    args += [str(tmp_path / "aws-credentials"), "--output", str(folder)]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert f"wrote {target}" in out and "systemctl daemon-reload" in out
    assert "absent.toml does not exist yet" in err
    assert "aws-credentials does not exist: systemd will not start the service" in err
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["cpg-daemon.service", "cpg-daemon.socket"]
    assert stat.S_IMODE((folder / "cpg-daemon.socket").stat().st_mode) == 0o644
    text = target.read_text()
    assert f"\nLoadCredential=aws-credentials:{tmp_path / 'aws-credentials'}\n" in text
    assert cli.main(["install-service", "-c", str(tmp_path / "absent.toml")]) == 0
    assert capsys.readouterr().out != text  # LoadCredential only when asked for
    _assert_verifies(target, folder / "cpg-daemon.socket")


def test_install_service_refuses_a_bad_user_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install-service", "--user", "up loader"]) == 2
    assert "'up loader' is not a valid user name" in capsys.readouterr().err


def test_install_service_reports_a_folder_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-folder" / "cpg-daemon.service"
    assert cli.main(["install-service", "--output", str(missing)]) == 1
    assert f"cannot write {missing}" in capsys.readouterr().err


# -- the socket unit ------------------------------------------------------------------------


def test_the_repository_socket_unit_is_the_one_the_package_ships() -> None:
    assert SHIPPED_SOCKET.read_text(encoding="utf-8") == service.template(
        service.SOCKET_UNIT_NAME
    ), "systemd/cpg-daemon.socket and cpg_daemon/data/cpg-daemon.socket differ"


def test_rendering_the_socket_with_the_defaults_gives_the_shipped_unit() -> None:
    default = service.Installation(config=DEFAULT_CONFIG_PATH)
    assert service.render_socket(default) == service.template(service.SOCKET_UNIT_NAME)


def test_the_socket_unit_is_the_daemons_socket_made_by_systemd() -> None:
    """Made by systemd (as root, so SocketGroup= works whatever the daemon's groups),
    handed over as "control", and stopped with the service (no activation by a client
    after an administrator stopped the daemon); the service keeps its folder."""
    socket_lines = set(service.template(service.SOCKET_UNIT_NAME).splitlines())
    for expected in (
        "ListenStream=/run/cpg-daemon/control.sock",
        "FileDescriptorName=control",
        "SocketMode=0660",
        "SocketUser=cpg-daemon",
        "SocketGroup=cpg-daemon",
        "PartOf=cpg-daemon.service",
        "WantedBy=sockets.target",
    ):
        assert expected in socket_lines, expected
    assert str(DEFAULT_SOCKET) == "/run/cpg-daemon/control.sock"
    service_lines = set(service.template().splitlines())
    for expected in (
        "Wants=cpg-daemon.socket",
        "After=cpg-daemon.socket",
        "RuntimeDirectoryPreserve=yes",
    ):
        assert expected in service_lines, expected


@needs_systemd_analyze
def test_shipped_units_pass_systemd_analyze_verify_together(tmp_path: Path) -> None:
    unit = _copy_with_real_executable(tmp_path)
    socket_unit = tmp_path / "cpg-daemon.socket"
    socket_unit.write_text(SHIPPED_SOCKET.read_text(encoding="utf-8"), encoding="utf-8")
    _assert_verifies(socket_unit, unit)
    socket_unit.write_text(
        socket_unit.read_text().replace("SocketMode=", "SocketMod="), encoding="utf-8"
    )
    assert _complaints(_verify(socket_unit, unit), socket_unit) != []


@needs_systemd_analyze
def test_install_service_writes_a_socket_unit_for_the_configs_socket_and_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """daemon.socket and daemon.socket_group go into the socket unit; the daemon's user
    owns it (ExecReload= runs `cpg-daemon reload` as that user)."""
    config = write_config(
        tmp_path / "config.toml",
        state_dir=Path("/var/lib/cpg-daemon"),
        endpoint_url="",
        watches=[],
        daemon={"socket": "/run/cpg-uploads/ctl %i.sock", "socket_group": "imaging-admins"},
    )
    folder = tmp_path / "system"
    folder.mkdir()
    args = ["install-service", "-c", str(config), "--user", "uploader"]
    assert cli.main([*args, "--output", str(folder / "cpg-daemon.service")]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {folder / 'cpg-daemon.service'} and {folder / 'cpg-daemon.socket'}" in out
    assert "systemctl enable --now cpg-daemon.socket cpg-daemon.service" in out
    assert "there is no group 'imaging-admins' (daemon.socket_group) yet" in err
    lines = (folder / "cpg-daemon.socket").read_text().splitlines()
    assert "ListenStream=/run/cpg-uploads/ctl %%i.sock" in lines  # % is systemd's
    assert "SocketUser=uploader" in lines and "SocketGroup=imaging-admins" in lines
    assert cli.main([*args, "--socket-unit"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    _assert_verifies(folder / "cpg-daemon.service", folder / "cpg-daemon.socket")


def test_without_socket_group_the_socket_is_the_daemons_group() -> None:
    installation = service.Installation(
        config=DEFAULT_CONFIG_PATH, user="uploader", group="imaging"
    )
    lines = service.render_socket(installation).splitlines()
    assert "SocketUser=uploader" in lines and "SocketGroup=imaging" in lines
