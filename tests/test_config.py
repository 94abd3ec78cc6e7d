"""The configuration file: documented defaults, and errors a person can act on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpg_daemon.core.bandwidth import BandwidthLimit
from cpg_daemon.core.config import (
    DEFAULT_EXCLUDE,
    Config,
    CredentialsConfig,
    DaemonConfig,
    S3Config,
    WatchConfig,
    load_config,
    parse_config,
)
from cpg_daemon.core.errors import ConfigError
from cpg_daemon.core.objectkeys import S3Location

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
MiB = 1024**2

WATCH = """
[[watch]]
path = "/data/outbox/Batch8_images"
destination = "s3://staging-cellpainting-gallery/cpg0123-example/images/"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    """Load ``text``, expect a ConfigError, and check its message names the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    error = excinfo.value
    assert str(path) in str(error)
    assert error.file == str(path)
    return path, error


# -- the example file and the defaults ---------------------------------------------------


def test_example_config_loads_with_documented_values() -> None:
    config = load_config(EXAMPLE)
    assert config.path == EXAMPLE

    daemon = config.daemon
    assert daemon.state_dir == Path("/var/lib/cpg-daemon")
    assert daemon.socket == Path("/run/cpg-daemon/control.sock")
    assert daemon.log_format == "auto"
    assert daemon.log_level == "info"
    assert daemon.socket_group == ""
    assert daemon.metrics_listen == ""

    s3 = config.s3
    assert s3.region == "us-east-1"
    assert s3.endpoint_url == ""
    assert s3.acl == "bucket-owner-full-control"
    assert s3.max_concurrency == 64
    assert s3.part_size == 8 * MiB
    assert s3.multipart_threshold == 64 * MiB
    assert s3.checksum == "CRC32C"
    assert s3.max_bandwidth == BandwidthLimit()
    assert not s3.max_bandwidth.limited

    (credentials,) = config.credentials
    assert credentials.profile == "cpg_staging"
    assert credentials.account_id == "309624411020"
    assert credentials.target == "s3://staging-cellpainting-gallery/cpg0123-example/*"
    assert credentials.permission == "READWRITE"
    assert credentials.duration == 12 * 3600
    assert credentials.refresh_before == 30 * 60

    (watch,) = config.watches
    assert watch.name == "batch8-images"
    assert watch.path == Path("/data/outbox/Batch8_images")
    assert watch.destination == S3Location(
        "staging-cellpainting-gallery",
        "cpg0123-example/broad/images/2024_04_01_Batch8/images/",
    )
    assert watch.settle == 30
    assert watch.include == ("**",)
    assert watch.exclude == (".*", "**/.*", "*.tmp", "**/*.tmp", "**/Thumbs.db")
    assert watch.ready_marker == ""
    assert watch.structure == "warn"
    assert watch.on_batch_complete == ""
    assert watch.upload_manifest is False


def test_example_values_are_what_leaving_keys_out_gives(tmp_path: Path) -> None:
    # The example documents the defaults: deleting a line must not change behaviour.
    example = load_config(EXAMPLE)
    minimal = load_config(write(tmp_path, WATCH))
    assert minimal.daemon == example.daemon == DaemonConfig()
    assert minimal.s3 == example.s3 == S3Config()
    (watch,) = minimal.watches
    (documented,) = example.watches
    for field in dataclasses.fields(WatchConfig):
        if field.name not in ("name", "path", "destination"):  # those the example sets
            assert getattr(watch, field.name) == getattr(documented, field.name), field.name
    assert minimal.credentials == (CredentialsConfig(),)
    assert example.credentials[0].duration == CredentialsConfig().duration
    assert example.credentials[0].refresh_before == CredentialsConfig().refresh_before


def test_empty_file_is_a_valid_config_with_no_watches(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.watches == ()
    assert config.s3 == S3Config()


def test_values_are_parsed(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[daemon]
state_dir = "/srv/state"
rescan_interval = "1h30m"
metrics_listen = "127.0.0.1:9464"

[s3]
part_size = "8MiB"
multipart_threshold = 100000000
max_bandwidth = "100MB"
checksum = "SHA256"
acl = ""
endpoint_url = "http://127.0.0.1:9000"

[[watch]]
name = "illum"
path = "/data/illum"
destination = "s3://bucket/cpg0123/illum"
settle = 90
include = ["**/*.npy"]
exclude = []
ready_marker = "DONE"

[[watch]]
path = "/data/outbox/Batch9"
destination = "s3://bucket/cpg0123/Batch9/"
""",
        )
    )
    assert config.daemon.state_dir == Path("/srv/state")
    assert config.daemon.rescan_interval == 5400
    assert config.daemon.metrics_listen == "127.0.0.1:9464"
    assert config.s3.part_size == 8 * MiB
    assert config.s3.multipart_threshold == 10**8
    assert config.s3.max_bandwidth == BandwidthLimit.constant(10**8)
    assert config.s3.checksum == "SHA256"
    assert config.s3.acl == ""
    assert config.s3.endpoint_url == "http://127.0.0.1:9000"
    illum, batch9 = config.watches
    assert illum.name == "illum"
    assert illum.destination == S3Location("bucket", "cpg0123/illum/")
    assert illum.settle == 90
    assert illum.include == ("**/*.npy",)
    assert illum.exclude == ()
    assert illum.ready_marker == "DONE"
    assert batch9.name == "Batch9"  # defaults to the folder's name
    assert batch9.exclude == DEFAULT_EXCLUDE
    assert config.watch("Batch9") is batch9
    with pytest.raises(KeyError, match="illum"):
        config.watch("nope")


def test_credentials_array_of_tables(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[[credentials]]
source = "access-grants"
account_id = "309624411020"
target = "s3://staging-cellpainting-gallery/cpg0123-a/*"

[[credentials]]
source = "profile"
profile = "other"
duration = "1h"
refresh_before = "10m"
"""
            + WATCH,
        )
    )
    first, second = config.credentials
    assert first.source == "access-grants"
    assert first.target == "s3://staging-cellpainting-gallery/cpg0123-a/*"
    assert second.source == "profile"
    assert second.profile == "other"
    assert second.duration == 3600
    assert second.refresh_before == 600


def test_parse_config_without_a_file_names_a_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"<config>: s3\.part_size"):
        parse_config({"s3": {"part_size": "1MiB"}}, None)
    assert isinstance(parse_config({}, None), Config)


# -- errors: file, dotted key, problem ---------------------------------------------------

CASES = [
    # unknown keys, with a suggestion
    ("[s3]\nmax_concurency = 4\n", "s3.max_concurency", "did you mean 'max_concurrency'"),
    (
        '[[watch]]\npath = "/data/x"\ndestinaton = "s3://bucket/x/"\n',
        "watch[0].destinaton",
        "did you mean 'destination'",
    ),
    ('[daemon]\nlog_levl = "info"\n', "daemon.log_levl", "did you mean 'log_level'"),
    ('[credentials]\nrefresh_befor = "1h"\n', "credentials.refresh_befor", "refresh_before"),
    ('[wach]\npath = "/x"\n', "wach", "did you mean 'watch'"),
    ("[s3]\nzzz = 1\n", "s3.zzz", "unknown key"),
    # wrong types
    ('[s3]\nmax_concurrency = "16"\n', "s3.max_concurrency", "whole number, got a string"),
    ("[s3]\nmax_concurrency = true\n", "s3.max_concurrency", "whole number, got true/false"),
    ("[s3]\nmax_concurrency = 1.5\n", "s3.max_concurrency", "whole number"),
    ("[daemon]\nstate_dir = 5\n", "daemon.state_dir", "expected a string, got a number"),
    ("[s3]\npart_size = true\n", "s3.part_size", "size"),
    ('[s3]\npart_size = "lots"\n', "s3.part_size", "cannot read size 'lots'"),
    ("s3 = 5\n", "s3", "expected a table"),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/"\ninclude = "**"\n',
        "watch[0].include",
        "list of glob patterns",
    ),
    ('[[watch]]\npath = 5\ndestination = "s3://bkt/"\n', "watch[0].path", "expected a string"),
    # out of range
    ('[s3]\npart_size = "4MiB"\n', "s3.part_size", "out of range"),
    ('[s3]\npart_size = "6GiB"\n', "s3.part_size", "out of range"),
    ("[s3]\npart_size = 5242879\n", "s3.part_size", "out of range"),
    ('[s3]\nmultipart_threshold = "1MiB"\n', "s3.multipart_threshold", "out of range"),
    ("[s3]\nmax_concurrency = 0\n", "s3.max_concurrency", "out of range"),
    ("[s3]\nmax_bandwidth = -1\n", "s3.max_bandwidth", ">= 0"),
    ('[s3]\nmax_bandwidth = "08:00,10MB 25:00,off"\n', "s3.max_bandwidth", "time of day"),
    ('[s3]\nmax_bandwidth = "08:00,10MB 19:00"\n', "s3.max_bandwidth", '"08:00,10MB"'),
    ('[s3]\nmax_bandwidth = "08:00,fast"\n', "s3.max_bandwidth", "cannot read size 'fast'"),
    ('[s3]\nmax_bandwidth = "Mon-08:00,1MB 08:00,2MB"\n', "s3.max_bandwidth", "Mon 08:00"),
    ('[credentials]\nduration = "13h"\n', "credentials.duration", "out of range"),
    ('[daemon]\nrescan_interval = "1s"\n', "daemon.rescan_interval", "out of range"),
    # bad choices
    ('[s3]\nchecksum = "MD5"\n', "s3.checksum", "not one of"),
    ('[s3]\nacl = "public"\n', "s3.acl", "not one of"),
    ('[daemon]\nlog_format = "jsn"\n', "daemon.log_format", "did you mean 'json'"),
    (
        '[credentials]\nsource = "acess-grants"\n',
        "credentials.source",
        "did you mean 'access-grants'",
    ),
    ('[s3]\nendpoint_url = "localhost:9000"\n', "s3.endpoint_url", "http://"),
    ('[daemon]\nmetrics_listen = "9464"\n', "daemon.metrics_listen", "HOST:PORT"),
    # credentials consistency
    ('[credentials]\nsource = "profile"\n', "credentials.profile", "profile"),
    (
        '[credentials]\nsource = "access-grants"\ntarget = "s3://bkt/p/*"\n',
        "credentials.account_id",
        "12-digit",
    ),
    (
        '[credentials]\nsource = "access-grants"\naccount_id = "309624411020"\n',
        "credentials.target",
        "s3://",
    ),
    (  # the gallery guide's own example: without /*, refused with the fix
        '[credentials]\ntarget = "s3://staging-cellpainting-gallery/cpg0016-jump"\n',
        "credentials.target",
        "write 's3://staging-cellpainting-gallery/cpg0016-jump/*'",
    ),
    (
        '[credentials]\ntarget = "s3://bkt/cpg0123-example*"\n',
        "credentials.target",
        "every folder whose name begins the same): write 's3://bkt/cpg0123-example/*'",
    ),
    ('[credentials]\ntarget = "https://b/p/*"\n', "credentials.target", "s3://"),
    ('[credentials]\nsource = "assume-role"\n', "credentials.role_arn", "arn:"),
    (
        '[credentials]\nduration = "1h"\nrefresh_before = "1h"\n',
        "credentials.refresh_before",
        "shorter than duration",
    ),
    ("credentials = []\n", "credentials", "at least one"),
    (
        '[[credentials]]\nsource = "environment"\n[[credentials]]\nsource = "profil"\n',
        "credentials[1].source",
        "did you mean 'profile'",
    ),
    # watches
    ('[watch]\npath = "/x"\ndestination = "s3://bkt/"\n', "watch", "[[watch]]"),
    ('[[watch]]\ndestination = "s3://bkt/x/"\n', "watch[0].path", "missing"),
    ('[[watch]]\npath = "/data/x"\n', "watch[0].destination", "missing"),
    (
        '[[watch]]\npath = "data/outbox"\ndestination = "s3://bkt/x/"\n',
        "watch[0].path",
        "not an absolute path",
    ),
    ('[[watch]]\npath = ""\ndestination = "s3://bkt/x/"\n', "watch[0].path", "empty"),
    (
        '[[watch]]\npath = "s3://lab-bucket/Batch8/"\ndestination = "s3://bkt/x/"\n',
        "watch[0].path",
        "run cpg-daemon upload s3://BUCKET/PREFIX/",
    ),
    (
        '[[watch]]\npath = "/x"\ndestination = "https://bkt/x/"\n',
        "watch[0].destination",
        "s3://",
    ),
    ('[[watch]]\npath = "/x"\ndestination = "s3://bkt/a//b/"\n', "watch[0].destination", "//"),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\nsettle = "soon"\n',
        "watch[0].settle",
        "cannot read duration 'soon'",
    ),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\nsettle = "2d"\n',
        "watch[0].settle",
        "out of range",
    ),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\nready_marker = "a/DONE"\n',
        "watch[0].ready_marker",
        "file name",
    ),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\nstructure = "strict"\n',
        "watch[0].structure",
        "not one of",
    ),
    (
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\nupload_manifest = "yes"\n',
        "watch[0].upload_manifest",
        "expected true or false",
    ),
    (
        # manifests go to <project>/<source>/workspace/qc/...: a project alone names no source
        '[[watch]]\npath = "/x"\ndestination = "s3://bkt/cpg0001-x/"\nupload_manifest = true\n',
        "watch[0].upload_manifest",
        "not under a <project>/<source>/ folder",
    ),
    (
        '[[watch]]\nname = "a"\npath = "/x"\ndestination = "s3://bkt/x/"\n'
        '[[watch]]\nname = "a"\npath = "/y"\ndestination = "s3://bkt/y/"\n',
        "watch[1].name",
        "already used by watch[0]",
    ),
    (
        # two folders with the same name and no explicit names
        '[[watch]]\npath = "/a/images"\ndestination = "s3://bkt/a/"\n'
        '[[watch]]\npath = "/b/images"\ndestination = "s3://bkt/b/"\n',
        "watch[1].name",
        "'images'",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), CASES, ids=[c[1] for c in CASES])
def test_config_error_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path, error = config_error(tmp_path, text)
    assert error.key == key
    assert problem in error.problem
    # one line a person reads: "<file>: <key>: <problem>"
    assert str(error) == f"{path}: {key}: {error.problem}"


def test_unknown_key_lists_the_known_keys(tmp_path: Path) -> None:
    _, error = config_error(tmp_path, "[s3]\nmax_concurency = 4\n")
    assert "max_concurrency" in error.problem
    assert "part_size" in error.problem


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path, error = config_error(tmp_path, '[s3]\nregion = "us-east-1\n')
    assert "not valid TOML" in error.problem
    assert "line 2" in error.problem
    assert str(error).startswith(f"{path}: ")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[s3]\nregion = "\xe9"\n')
    with pytest.raises(ConfigError, match="UTF-8") as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)


def test_nonexistent_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "config.toml"
    with pytest.raises(ConfigError, match="does not exist") as excinfo:
        load_config(path)
    assert str(excinfo.value).startswith(str(path))


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as excinfo:
        load_config(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


@pytest.mark.parametrize(("mode", "refused"), [(0o666, True), (0o646, True), (0o664, False)])
def test_a_config_every_user_may_write_is_refused(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    """It names the commands the daemon runs and where the data goes: not for everyone."""
    path = tmp_path / "config.toml"
    path.write_text('[s3]\nregion = "us-east-1"\n', encoding="utf-8")
    path.chmod(mode)
    if not refused:
        assert load_config(path).s3.region == "us-east-1"
        return
    with pytest.raises(ConfigError, match="writable by every user") as excinfo:
        load_config(path)
    assert f"chmod o-w {path}" in str(excinfo.value)
    assert str(excinfo.value).startswith(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another owner")
@pytest.mark.parametrize(
    ("owner", "group", "mode", "refused"),
    [
        (0, 65534, 0o660, "writable by the group"),  # root's file, nogroup may write
        (65534, 0, 0o644, "belongs to user"),  # nobody's file: its owner may write
        (0, 65534, 0o640, ""),  # the README's 0640 root:cpg-daemon
    ],
)
def test_a_config_someone_else_may_write_is_refused(
    tmp_path: Path, owner: int, group: int, mode: int, refused: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[s3]\nregion = "us-east-1"\n', encoding="utf-8")
    os.chown(path, owner, group)
    path.chmod(mode)
    if not refused:
        assert load_config(path).s3.region == "us-east-1"
        return
    with pytest.raises(ConfigError, match=refused) as excinfo:
        load_config(path)
    assert "Fix it with: ch" in str(excinfo.value)


# -- the command line ---------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpg_daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


BAD = '[s3]\nmax_concurency = 4\n[[watch]]\npath = "/x"\ndestination = "s3://bkt/x/"\n'


@pytest.mark.parametrize(
    "command", [["check", "--offline"], ["run"]], ids=["check --offline", "run"]
)
def test_cli_bad_config_exits_2_naming_file_key_and_problem(
    tmp_path: Path, command: list[str]
) -> None:
    bad = write(tmp_path, BAD, "bad.toml")
    result = cli(*command, "-c", str(bad))
    assert result.returncode == 2, result.stderr
    assert str(bad) in result.stderr
    assert "s3.max_concurency" in result.stderr
    assert "did you mean 'max_concurrency'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = cli("check", "--offline", "-c", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "does not exist" in result.stderr


def test_cli_check_offline_good_config(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    good = write(
        tmp_path,
        f'[[watch]]\nname = "b8"\npath = "{folder}"\ndestination = "s3://bucket/cpg0123/x"\n',
    )
    result = cli("check", "--offline", "-c", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"watch b8: {folder} -> s3://bucket/cpg0123/x/" in result.stdout


def test_config_example_prints_the_documented_example_which_loads(tmp_path: Path) -> None:
    """A pip-installed cpg-daemon has no checkout to copy config.example.toml from."""
    result = cli("config", "--example")
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXAMPLE.read_text(encoding="utf-8")
    written = tmp_path / "config.toml"
    written.write_text(result.stdout, encoding="utf-8")
    assert load_config(written).watches == load_config(EXAMPLE).watches


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("**/*.{tif,tiff}", "braces {a,b} are not supported"),
        ("[[:digit:]]*.csv", "POSIX classes"),
        ("\\*.tmp", "a backslash escape is not supported"),
    ],
)
def test_a_glob_of_another_dialect_is_refused_rather_than_matching_nothing(
    tmp_path: Path, pattern: str, says: str
) -> None:
    """An exclude that silently matches nothing fails open: the files go to S3."""
    path = tmp_path / "config.toml"
    text = WATCH + f"exclude = [{json.dumps(pattern)}]\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="exclude") as excinfo:
        load_config(path)
    assert says in str(excinfo.value)


def test_a_bracket_matches_what_the_refusals_suggest() -> None:
    from cpg_daemon.core.objectkeys import PathFilter, glob_problem

    literal = PathFilter(("**",), ("**/[{]draft[}].csv", "[*]*", "**/[.]DS_Store"))
    assert not literal.accepts("Plate1/{draft}.csv") and not literal.accepts("*old")
    assert not literal.accepts("Plate1/.DS_Store")
    assert all(glob_problem(p) is None for p in ("[{]x", "[*]", "[.]DS_Store", "[\\]"))
    assert literal.accepts("Plate1/draft.csv") and literal.accepts("old")
