"""The command line: parsing and presentation only.

The daemon: ``run`` (``ops.daemon``), and the control-socket clients ``status``,
``pause``, ``resume``, ``retry``, ``rescan``, ``reload`` and ``verify --via-daemon``
(``ops.control``). One-shot work: ``upload`` (``engine.oneshot``), ``verify``
(``engine.verify``), ``check`` (``discovery.plan`` and ``engine.grants``),
``check-dataset`` (``engine.dataset``, ``core.dataset``), ``demo`` (``cli.demo``).
Operations: ``install-service`` (``ops.service``) and ``recover-journal`` (``journal``).
Exit statuses follow the interface contract: 0 ok, 1 a problem found or files failed,
2 a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from cpg_daemon import __version__
from cpg_daemon.cli.helptext import add_examples
from cpg_daemon.core.checksums import CHECKSUM_NAMES, encode
from cpg_daemon.core.config import (
    CANNED_ACLS,
    DEFAULT_SOCKET,
    GALLERY_BUCKET,
    GALLERY_GRANTS_ACCOUNT,
    Config,
    CredentialsConfig,
    S3Config,
    WatchConfig,
    default_config_path,
    load_config,
)
from cpg_daemon.core.errors import ConfigError, CpgError
from cpg_daemon.core.objectkeys import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    S3Location,
    glob_problem,
    manifest_folder,
    parse_grant_target,
    parse_s3_uri,
    target_covers,
)
from cpg_daemon.core.text import printable
from cpg_daemon.core.units import format_size, parse_size
from cpg_daemon.ops import client, platforms
from cpg_daemon.ops import status as status_view

if TYPE_CHECKING:
    from cpg_daemon.core.dataset import DatasetReport
    from cpg_daemon.engine.dataset import Listing
    from cpg_daemon.engine.grants import Assignment
    from cpg_daemon.s3.store import Storage

# The control-socket commands (status, pause, ...) import no S3 client, no logging and
# no journal: the commands that need one import it when they run (0.5 s of CPU a call
# saved by the S3 client, 0.15 s more by the rest).


def _configure_logs(log_format: str, level: str) -> None:
    from cpg_daemon.ops import logs

    logs.configure(log_format, level)


def _say(line: str, file: TextIO | None = None) -> None:
    """One line of output that may hold names (of files, keys, folders): whatever they
    contain is escaped, so that it cannot act on a terminal or start a line of its own."""
    print(printable(line), file=file or sys.stdout)


EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_CONFIG = 2


def _config_arg(
    parser: argparse.ArgumentParser,
    text: str = "configuration file (default: $CPG_DAEMON_CONFIG, then "
    "/etc/cpg-daemon/config.toml)",
) -> None:
    parser.add_argument("-c", "--config", type=Path, default=None, help=text)


def _json_arg(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"{what} as one JSON document on standard output, for scripts (fields: README, "
        '"Machine-readable output")',
    )


def _source_args(parser: argparse.ArgumentParser) -> Any:
    """The flags that say how an S3 SRC is read; returns their group."""
    source = parser.add_argument_group(
        "an S3 SRC",
        "read with its own keys: --source-profile, else --profile when it is "
        "not only for --access-grants, else the environment's",
    )
    source.add_argument("--source-profile", default=None, help="AWS profile that reads SRC")
    source.add_argument(
        "--source-endpoint-url", default=None, help="SRC's S3 endpoint (default: DEST's)"
    )
    source.add_argument("--source-region", default=None, help="SRC's region (default: DEST's)")
    source.add_argument(
        "--source-no-sign-request", action="store_true", help="SRC is public: read it unsigned"
    )
    return source


def _socket_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-s",
        "--socket",
        type=Path,
        default=None,
        help="the daemon's control socket (default: the config's daemon.socket, then "
        f"{DEFAULT_SOCKET})",
    )
    _config_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpg-daemon",
        description="Upload microscopy data to the Cell Painting Gallery staging bucket.",
    )
    parser.add_argument("--version", action="version", version=f"cpg-daemon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground until SIGTERM/SIGINT")
    _config_arg(run)

    check = commands.add_parser(
        "check",
        help="validate the configuration, show what each watch would upload (with the "
        "gallery folder-rule findings) and prove write access to each destination",
    )
    _config_arg(check)
    check.add_argument(
        "--offline", action="store_true", help="only validate the file; contact no server"
    )
    _json_arg(check, "the checks")

    upload = commands.add_parser(
        "upload",
        help="upload a folder, a file, or an S3 prefix or object to s3://bucket/prefix/ "
        "once, skipping what is there",
        description="Uploads SRC below DEST as `aws s3 sync` would, with the daemon's "
        "engine: every file of a folder (its path below SRC appended to DEST's prefix), or "
        "one file (its name appended; without a trailing / DEST names the object, as with "
        "aws s3 cp), or the objects of another bucket (s3://BUCKET/PREFIX/, streamed "
        "through or copied within S3), checksummed, large files in parts; files whose "
        "object is already there with the same size and checksum are skipped. Keys are "
        "checked against the Cell Painting Gallery's folder rules (--structure). On a "
        "terminal it shows its progress; at the end it prints a summary.",
    )
    upload.add_argument(
        "src",
        metavar="SRC",
        help="local folder or file, or s3://BUCKET/PREFIX/ (or one object) of another bucket",
    )
    upload.add_argument(
        "dest",
        metavar="DEST",
        help="destination folder, s3://bucket/prefix/; for one file or object, without a "
        "trailing / it names the object (as aws s3 cp does)",
    )
    _config_arg(
        upload,
        "take [s3] and [credentials] from this configuration file (default: "
        "$CPG_DAEMON_CONFIG if set, else none: the flags and the usual AWS places)",
    )
    upload.add_argument(
        "--dry-run",
        action="store_true",
        help="send nothing: list what would be uploaded (with sizes, and why) and what is "
        "already there, compared with a listing of DEST, and the folder-rule findings",
    )
    upload.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="upload only files below SRC that match (repeatable; default: every file); "
        "globs as a watch's include: * and ? within a folder, ** across folders",
    )
    upload.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files, or folders and all below them, that match (repeatable; "
        "added to the defaults: hidden files, *.tmp, Thumbs.db); wins over --include",
    )
    upload.add_argument(
        "--structure",
        choices=("warn", "reject", "off"),
        default="warn",
        help="the Cell Painting Gallery's folder rules: warn (upload, and say so; the "
        "default), reject (keep out files that break a required rule), off (for another "
        "bucket)",
    )
    upload.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint")
    upload.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="the most requests in flight (default 64; the number adapts to the link below it)",
    )
    upload.add_argument("--part-size", default=None, help='multipart part size, e.g. "16MiB"')
    upload.add_argument(
        "--acl", default=None, choices=CANNED_ACLS, help="canned ACL ('' sends none)"
    )
    upload.add_argument(
        "--checksum",
        default=None,
        choices=CHECKSUM_NAMES,
        help="the checksum sent with every request, which S3 checks (default CRC32C)",
    )
    upload.add_argument(
        "--profile",
        default=None,
        help="AWS profile with the keys to use: on S3 directly or, with --access-grants, "
        "only to ask S3 Access Grants for short-lived keys (the gallery's long-term keys "
        "may do nothing else)",
    )
    upload.add_argument(
        "--access-grants",
        action="store_true",
        help="get keys for the destination from S3 Access Grants (GetDataAccess, renewed "
        "as needed), as the gallery's guide does by hand",
    )
    upload.add_argument(
        "--grant-target",
        default=None,
        metavar="s3://BUCKET/FOLDER/*",
        help="with --access-grants: the target you were granted (default: the "
        "destination's first folder, s3://BUCKET/FOLDER/*)",
    )
    upload.add_argument(
        "--account-id",
        default=None,
        help="with --access-grants: the grants instance's account (default for "
        f"{GALLERY_BUCKET}: {GALLERY_GRANTS_ACCOUNT})",
    )
    upload.add_argument(
        "--grants-endpoint-url", default=None, help=argparse.SUPPRESS
    )  # a private or test S3 Control endpoint
    upload.add_argument(
        "--region",
        default=None,
        help="AWS region (default: -c's [s3] region, then AWS_REGION, AWS_DEFAULT_REGION, "
        "the profile's region, us-east-1)",
    )
    upload.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the resumable journal of this upload is kept "
        "(default: $XDG_STATE_HOME/cpg-daemon/upload; on Windows %%LOCALAPPDATA%%\\cpg-daemon"
        "\\upload)",
    )
    upload.add_argument(
        "--quiet",
        action="store_true",
        help="print only errors (on standard error): no progress, no warnings, no summary; "
        "the exit status says how it went (--json still prints its document)",
    )
    _json_arg(upload, "the summary (with --dry-run: every file's decision)")
    source = _source_args(upload)
    source.add_argument(
        "--no-server-side-copy",
        action="store_true",
        help="stream every object through this machine even when the destination's keys "
        "could copy it within S3 (CopyObject; used when SRC and DEST share endpoint, region "
        "and keys, and the keys are not Access Grants')",
    )

    dataset = commands.add_parser(
        "check-dataset",
        help="list a dataset (on S3 or a local folder) as the gallery's maintainers see it "
        "and check it against the gallery's guide",
        description="Lists batches, plates per batch and what each plate has, and reports "
        "what the Cell Painting Gallery's guide requires (exit status 1 when something is "
        "missing) and what it advises (no effect on the exit status). TARGET is "
        "s3://BUCKET/cpgNNNN-name/SOURCE/, s3://BUCKET/cpgNNNN-name/ (every source), or a "
        "local folder laid out the same way (a source folder holds images/ or workspace/).",
    )
    dataset.add_argument(
        "target", metavar="TARGET", help="s3://BUCKET/PROJECT/[SOURCE/] or a local folder"
    )
    dataset.add_argument(
        "--json", action="store_true", help="the whole report as JSON (keys: see README)"
    )
    _config_arg(dataset)
    dataset.add_argument("--profile", default=None, help="AWS profile whose keys list the bucket")
    dataset.add_argument(
        "--no-sign-request",
        action="store_true",
        help="send no keys (the public cellpainting-gallery bucket needs none)",
    )
    dataset.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint")
    dataset.add_argument(
        "--region",
        default=None,
        help="AWS region (default: -c's [s3] region, then AWS_REGION, AWS_DEFAULT_REGION, "
        "the profile's region, us-east-1)",
    )
    dataset.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="listings in flight at once (default 32)",
    )

    status = commands.add_parser("status", help="what the running daemon is doing")
    _socket_args(status)
    status.add_argument("--json", action="store_true", help="the status object, for scripts")
    status.add_argument(
        "-w", "--watch", action="store_true", help="refresh every second with progress bars"
    )
    for name, text in (
        ("pause", "stop starting new uploads (in-flight parts finish)"),
        ("resume", "start new uploads again"),
        ("retry", "queue failed files again"),
        ("rescan", "walk the watched folders again now"),
    ):
        command = commands.add_parser(name, help=f"{text}; all watches, or one")
        command.add_argument("watch", nargs="?", metavar="WATCH", help="a watch's name")
        _socket_args(command)
        _json_arg(command, "the daemon's answer")
    reload = commands.add_parser(
        "reload",
        help="make the running daemon read its configuration file again (as SIGHUP); "
        "exits 1 and changes nothing if the file is invalid",
    )
    _socket_args(reload)
    _json_arg(reload, "the daemon's answer")

    verify = commands.add_parser(
        "verify",
        help="compare every local file with its staged object (presence, size, checksum), "
        "or staging with a manifest (--manifest); exit status 1 on any difference",
    )
    verify.add_argument("watch", nargs="?", metavar="WATCH", help="only this watch")
    verify.add_argument(
        "--report", type=Path, metavar="PATH", help="write every file's line as CSV here"
    )
    verify.add_argument(
        "--quick", action="store_true", help="presence and size only (no checksums)"
    )
    verify.add_argument(
        "--via-daemon",
        action="store_true",
        help="let the running daemon do it with its own credentials (over its socket)",
    )
    verify.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="check staging against a manifest instead of local files (no local folder "
        "needed; read access is enough)",
    )
    verify.add_argument(
        "--destination",
        metavar="s3://BUCKET/PREFIX/",
        help="with --manifest: where the objects are now (after a transfer), instead of "
        "the manifest's destination",
    )
    verify.add_argument(
        "--endpoint-url", default=None, help="with --manifest and no -c: an S3 endpoint"
    )
    verify.add_argument(
        "--profile", default=None, help="with --manifest and no -c: the AWS profile to read with"
    )
    verify.add_argument(
        "--no-sign-request",
        action="store_true",
        help="with --manifest: read without keys (the public gallery bucket, after a transfer)",
    )
    verify.add_argument(
        "--region",
        default=None,
        help="with --manifest or --source: the AWS region (default: -c's [s3] region, then "
        "AWS_REGION, AWS_DEFAULT_REGION, the profile's region, us-east-1)",
    )
    verify.add_argument(
        "--source",
        metavar="SRC",
        help="compare SRC (a folder, a file, or s3://BUCKET/PREFIX/ of another bucket) with "
        "--destination, as `upload SRC DEST` sent it; no configuration needed",
    )
    verify.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="with --source: where upload kept its journal (default: "
        "$XDG_STATE_HOME/cpg-daemon/upload); without one, every object is read",
    )
    _source_args(verify)
    _socket_args(verify)
    _json_arg(verify, "the counts and every difference")

    manifest = commands.add_parser(
        "manifest",
        help="write the manifest of what a watch (or one folder of it) has uploaded",
        description="From the journal: every uploaded object with its size, checksum and "
        "ETag, after a header (destination, tool, totals). JSON lines; its SHA-256 goes "
        "to FILE.sha256 (with -o) or standard error. The daemon writes one for each batch "
        "when it completes, in STATE_DIR/manifests/.",
    )
    manifest.add_argument(
        "watch", nargs="?", metavar="WATCH", help="the watch (default: the only one)"
    )
    manifest.add_argument(
        "folder", nargs="?", metavar="FOLDER", help="only this top-level folder (a batch)"
    )
    manifest.add_argument("-o", "--output", type=Path, metavar="FILE", help="write it here")
    _config_arg(manifest)

    recover = commands.add_parser(
        "recover-journal",
        help="with the daemon stopped: check the journal and, if it is damaged, move it "
        "aside so the daemon can start again (it then lists S3 and sends nothing twice)",
    )
    _config_arg(recover)
    recover.add_argument(
        "--force",
        action="store_true",
        help="move the journal aside even if SQLite's integrity check finds nothing wrong",
    )

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on this machine against a local S3 server"
    )
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit once the sample is uploaded and verified (default when not on a terminal)",
    )

    keys = commands.add_parser(
        "credentials",
        help="hand keys obtained elsewhere (a laptop) to the running daemon",
        description="Reads, from standard input, the JSON that `aws s3control "
        "get-data-access` prints, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
        "AWS_SESSION_TOKEN lines (export, set or $Env: forms); with nothing piped in, "
        "this command's own AWS_* environment variables. The daemon tries them, uses them "
        'at once for the watches of its source = "handed-over" entry and keeps them '
        "until they expire. Keys are never printed or logged.",
    )
    keys.add_argument("action", choices=["set"], help="set: hand over new keys")
    keys.add_argument(
        "--target",
        default=None,
        help="the [credentials] target the keys are for (default: the grant's target in "
        "the JSON, or the only handed-over entry)",
    )
    _socket_args(keys)

    example = commands.add_parser(
        "config", help="print a configuration file to start from (--example)"
    )
    example.add_argument(
        "--example",
        action="store_true",
        required=True,
        help="the commented example, every key documented: "
        "cpg-daemon config --example > config.toml",
    )

    service = commands.add_parser(
        "install-service",
        help="the systemd units for this installation (the service and its control "
        "socket): the service on stdout, or both written to --output",
    )
    _config_arg(service)
    service.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="PATH",
        help="write cpg-daemon.service and cpg-daemon.socket into this folder (or the "
        "service to this file and the socket beside it; atomically, mode 0644), "
        "e.g. /etc/systemd/system/",
    )
    service.add_argument(
        "--socket-unit",
        action="store_true",
        help="print the socket unit (cpg-daemon.socket) instead of the service",
    )
    service.add_argument(
        "--user", default="cpg-daemon", help="the daemon's user (default: cpg-daemon)"
    )
    service.add_argument("--group", default=None, help="the daemon's group (default: --user)")
    service.add_argument(
        "--aws-credentials",
        type=Path,
        default=None,
        metavar="FILE",
        help="hand this AWS credentials file (root-only) to the daemon with LoadCredential=",
    )
    add_examples(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unsupported = platforms.unsupported(args.command)  # before its modules are imported
    if unsupported is not None:
        _say(f"cpg-daemon {args.command}: {unsupported}", file=sys.stderr)
        return EXIT_NO_DAEMON if args.command in platforms.CLIENT_COMMANDS else EXIT_PROBLEM
    handlers = {
        "run": _run,
        "check": _check,
        "upload": _upload,
        "demo": _demo,
        "verify": _verify,
        "manifest": _manifest,
        "check-dataset": _check_dataset,
        "status": _status,
        "pause": _control,
        "resume": _control,
        "retry": _control,
        "rescan": _control,
        "reload": _reload,
        "credentials": _credentials,
        "config": _example_config,
        "install-service": _install_service,
        "recover-journal": _recover_journal,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        _say(f"cpg-daemon: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CpgError as exc:  # FatalError, or a server error outside any one file
        _say(f"cpg-daemon: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a task group's errors arrive grouped (ExceptionGroup)
        errors = _known_errors(exc)
        if errors is None:
            raise
        for error in errors:
            _say(f"cpg-daemon: {error}", file=sys.stderr)
        return EXIT_CONFIG if all(isinstance(e, ConfigError) for e in errors) else EXIT_PROBLEM


def _known_errors(exc: BaseException) -> list[CpgError] | None:
    """The errors inside a (nested) exception group, if all are ours; else None."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return [exc] if isinstance(exc, CpgError) else None
    found: list[CpgError] = []
    for error in inner:
        leaves = _known_errors(error)
        if leaves is None:
            return None
        found += leaves
    return found


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or default_config_path())


def _run(args: argparse.Namespace) -> int:
    from cpg_daemon.ops import daemon

    config = _load(args)
    _configure_logs(config.daemon.log_format, config.daemon.log_level)
    anyio.run(daemon.run, config)
    return EXIT_OK


class _Said:
    """What a command found, said line by line as it goes, or kept for its --json
    document (``document``), which is printed at the end instead."""

    def __init__(self, as_json: bool, document: dict[str, Any]) -> None:
        self.as_json = as_json
        self.document = document

    def __call__(self, line: str, *, escaped: bool = False) -> None:
        """A line for people (``escaped``: its names are ``printable`` already)."""
        if self.as_json:
            return
        if escaped:
            print(line)
        else:
            _say(line)

    def end(self) -> None:
        if self.as_json:
            print(json.dumps(self.document, indent=2))


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    from cpg_daemon.discovery.plan import describe_plan, plan_json, plan_watch
    from cpg_daemon.engine.grants import assign
    from cpg_daemon.ops.service import private_tmp_problem

    assignment = assign(config)
    problems = 0
    _configure_logs("console", "error")  # the folder walk's debug events stay quiet
    watches: list[dict[str, Any]] = []
    document: dict[str, Any] = {
        "command": "check",
        "config": str(config.path),
        "journal": str(config.daemon.state_dir),
        "offline": args.offline,
        "watches": watches,
        "credentials": [],
        "problems": 0,
    }
    say = _Said(args.json, document)
    say(f"configuration {config.path}: valid")
    say(f"journal: {config.daemon.state_dir}")
    if not config.watches:
        say("warning: no [[watch]] tables: the daemon would have nothing to do")
    for watch in config.watches:
        provider = assignment.by_watch[watch.name]
        found: dict[str, Any] = {
            "name": watch.name,
            "path": str(watch.path),
            "destination": str(watch.destination),
            "credentials": {"source": provider.config.source, "target": provider.config.target},
            "warnings": [],
            "problems": [],
            "plan": None,
            "write_access": [],
        }
        watches.append(found)
        say(f"watch {watch.name}: {watch.path} -> {watch.destination}")
        say(f"  credentials: {provider.config.source} {provider.config.target}".rstrip())
        problem = private_tmp_problem(watch.path)  # fine in the foreground, not as the service
        if problem is not None:
            found["warnings"].append(problem)
            say(f"  warning: {problem}")
        if not watch.path.is_dir():
            found["problems"].append(f"{watch.path} does not exist or is not a folder")
        elif not os.access(watch.path, os.R_OK | os.X_OK):
            found["problems"].append(f"{watch.path} is not readable by this user")
        else:
            plan = plan_watch(watch)
            found["plan"] = plan_json(plan)
            for line in describe_plan(plan):
                say(line, escaped=True)
            problems += plan.problems
        for problem in found["problems"]:
            say(f"  problem: {problem}")
            problems += 1
    if not args.offline:
        problems += anyio.run(_check_online, config, assignment, say)
    document["problems"] = problems
    say.end()
    return EXIT_PROBLEM if problems else EXIT_OK


async def _check_online(config: Config, assignment: Assignment, say: _Said) -> int:
    """Obtain keys once per grant, then prove write access to each destination."""
    from cpg_daemon.engine.grants import Grant, Grants
    from cpg_daemon.s3.credentials import RenewingProvider

    problems = 0
    by_name = {found["name"]: found for found in say.document["watches"]}
    async with Grants.open(config, assignment) as grants:
        working: set[Grant] = set()
        for grant in grants:
            provider = grant.provider
            if not isinstance(provider, RenewingProvider):
                working.add(grant)
                continue
            keys: dict[str, Any] = {"target": grant.target, "expires_at": None, "error": None}
            say.document["credentials"].append(keys)
            if await grant.renew_now():
                working.add(grant)
                expires = provider.expires_at
                keys["expires_at"] = None if expires is None else expires.isoformat()
                say(f"credentials {grant.target}: obtained, valid until {provider.expires_at}")
            else:
                keys["error"] = provider.statistics().last_error
                say(f"credentials {grant.target}: {keys['error']}")
                problems += 1
        for active in grants.table(config, assignment).values():
            watch = active.config
            access = by_name[watch.name]["write_access"]
            if active.grant not in working:
                say(f"watch {watch.name}: not checked (no credentials)")
                continue
            places = [watch.destination]
            if watch.upload_manifest:
                places.append(manifest_folder(watch.destination))
            for place in places:
                error = await _probe_write(active.grant.store, place)
                access.append({"destination": str(place), "error": error})
                if error:
                    say(f"watch {watch.name}: cannot write to {place}: {error}")
                    problems += 1
                else:
                    say(f"watch {watch.name}: write access to {place} confirmed")
    return problems


async def _probe_write(store: Storage, destination: S3Location) -> str | None:
    """Write and delete a zero-byte marker under the destination; the error, or None."""
    key = f"{destination.prefix}.cpg-daemon-check/{socket.gethostname()}-{int(time.time())}"
    try:
        empty = encode(store.algorithm.digest(b""))
        await store.put_object(destination.bucket, key, b"", empty)
        await store.delete_object(destination.bucket, key)
    except CpgError as exc:
        return str(exc)
    return None


def _grant_for(args: argparse.Namespace, destination: S3Location) -> CredentialsConfig:
    """The Access Grants entry ``upload --access-grants`` uses (ValueError: what is wrong)."""
    folder = destination.prefix.split("/", 1)[0]
    target = args.grant_target or (
        f"s3://{destination.bucket}/{folder}/*" if folder else f"s3://{destination.bucket}/*"
    )
    parse_grant_target(target)
    gallery = destination.bucket == GALLERY_BUCKET
    account = args.account_id or (GALLERY_GRANTS_ACCOUNT if gallery else "")
    if not (account.isdigit() and len(account) == 12):
        raise ValueError(
            "--access-grants needs the grants instance's 12-digit account (--account-id)"
        )
    return CredentialsConfig(
        source="access-grants",
        profile=args.profile or "",
        account_id=account,
        target=target,
        endpoint_url=args.grants_endpoint_url or "",
    )


def _upload(args: argparse.Namespace) -> int:
    from cpg_daemon.engine import oneshot
    from cpg_daemon.s3.credentials import ProfileMissingError
    from cpg_daemon.s3.region import region_for

    try:
        destination, object_name = oneshot.parse_destination(args.dest)
    except ValueError as exc:
        _say(f"cpg-daemon upload: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config is not None or os.environ.get("CPG_DAEMON_CONFIG"):
        config = load_config(args.config or default_config_path(), default_region="")
        s3, credentials = config.s3, config.credentials[0]
    else:
        s3, credentials = S3Config(region=""), CredentialsConfig()
    changes: dict[str, Any] = {}
    if args.endpoint_url is not None:
        changes["endpoint_url"] = args.endpoint_url
    if args.region is not None:
        changes["region"] = args.region
    if args.acl is not None:
        changes["acl"] = args.acl
    if args.checksum is not None:
        changes["checksum"] = args.checksum
    if args.concurrency is not None:
        if not 1 <= args.concurrency <= 1024:
            print("cpg-daemon upload: --concurrency must be 1 to 1024", file=sys.stderr)
            return EXIT_CONFIG
        changes["max_concurrency"] = args.concurrency
    if args.part_size is not None:
        try:
            size = parse_size(args.part_size)
        except ValueError as exc:
            _say(f"cpg-daemon upload: --part-size: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if not MIN_PART_SIZE <= size <= MAX_PART_SIZE:
            print("cpg-daemon upload: --part-size must be 5MiB to 5GiB", file=sys.stderr)
            return EXIT_CONFIG
        changes["part_size"] = size
    s3 = replace(s3, **changes)
    if args.access_grants:
        try:
            credentials = _grant_for(args, destination)
        except ValueError as exc:
            _say(f"cpg-daemon upload: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    elif args.profile is not None:
        credentials = CredentialsConfig(source="profile", profile=args.profile)
    if not s3.region:
        s3 = replace(s3, region=region_for(destination.bucket, credentials.profile))
    state_dir = args.state_dir or oneshot.default_state_dir()
    try:
        if args.src.startswith("s3://"):
            parse_s3_uri(args.src)
            _check_patterns(args, single=False)
            send = _objects_from(args, s3, credentials)
            # (A pattern given for one object is refused once the store says it is one.)
            return _upload_run(args, None, s3, credentials, state_dir, send)
        watch = oneshot.source_watch(Path(args.src), destination, object_name)
        # The journal is the source's and the destination's, whatever files are chosen.
        journal = oneshot.journal_for(state_dir, watch, None)
        watch = _chosen_files(args, watch, single=not Path(args.src).is_dir())
        return _upload_run(args, watch, s3, credentials, journal)
    except (FileNotFoundError, ValueError, ProfileMissingError) as exc:
        _say(f"cpg-daemon upload: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _objects_from(
    args: argparse.Namespace, s3: S3Config, credentials: CredentialsConfig
) -> Callable[[Any], Coroutine[Any, Any, Any]]:
    """The upload of an S3 SRC, given the progress callback: the source's store open
    (its own keys) while the objects are listed and read, or copied within S3."""
    from cpg_daemon.engine import oneshot
    from cpg_daemon.engine.dataset import open_store

    destination, object_name = oneshot.parse_destination(args.dest)
    reader = _source_access(args, s3)
    server_side = not args.no_server_side_copy and oneshot.same_access(reader, (s3, credentials))
    state_dir = args.state_dir or oneshot.default_state_dir()

    async def send(progress: Any) -> Any:
        """The upload's summary, or with --dry-run its ``DryRun``."""
        from cpg_daemon.engine.dryrun import dry_run

        async with open_store(*reader, reads=True) as store:
            watch, objects = await oneshot.object_watch(
                store, args.src, destination, object_name, server_side=server_side
            )
            journal = oneshot.journal_for(state_dir, watch, objects)
            watch = _chosen_files(args, watch, single=bool(objects.single))
            if args.dry_run:
                return await dry_run(watch, s3, credentials, journal, objects=objects)
            return await oneshot.upload(
                watch, s3, credentials, state_dir, progress, journal=journal, objects=objects
            )

    return send


def _check_patterns(args: argparse.Namespace, *, single: bool) -> None:
    """ValueError for --include/--exclude patterns that would not mean what they seem to
    (as in the config), or given for a single file."""
    for pattern in args.include + args.exclude:
        problem = "an empty pattern matches nothing" if not pattern else glob_problem(pattern)
        if problem is not None:
            raise ValueError(f"{pattern!r}: {problem}")
    if (args.include or args.exclude) and single:
        raise ValueError(f"--include and --exclude choose files in a folder; {args.src} is a file")


def _chosen_files(args: argparse.Namespace, watch: WatchConfig, *, single: bool) -> WatchConfig:
    """The source's watch with --include, --exclude and --structure (``_check_patterns``)."""
    _check_patterns(args, single=single)
    return replace(
        watch,
        include=tuple(args.include) or watch.include,
        exclude=watch.exclude + tuple(args.exclude),
        structure=args.structure,
    )


def _upload_run(
    args: argparse.Namespace,
    watch: WatchConfig | None,
    s3: S3Config,
    credentials: CredentialsConfig,
    journal: Path,
    send: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
) -> int:
    """The upload, or with --dry-run what it would do (0 when a real run would upload
    every file; 1 when it would fail some, keep some out, or could not list DEST).
    ``send``: the upload itself, given the progress callback (an S3 SRC's, whose watch
    is made once its store is open); else ``watch``'s, kept in ``journal``.

    The upload shows a progress display on a terminal (not with --quiet), then the
    summary (a line, a JSON document, or nothing with --quiet) and each failure."""
    from contextlib import nullcontext

    from cpg_daemon.cli import uploadview
    from cpg_daemon.engine import oneshot
    from cpg_daemon.engine.dryrun import dry_run

    if send is None:
        assert watch is not None

        async def send(progress: Any) -> Any:
            assert watch is not None
            return await oneshot.upload(
                watch, s3, credentials, journal.parent, progress=progress, journal=journal
            )

    where = watch.destination if watch is not None else oneshot.parse_destination(args.dest)[0]
    if args.dry_run:
        _configure_logs("console" if sys.stderr.isatty() else "json", "error")
        if watch is not None:
            result = anyio.run(lambda: dry_run(watch, s3, credentials, journal))
        else:  # an S3 SRC: its source's store is open only inside ``send``
            result = anyio.run(send, None)
        planned = result.plan.watch.destination
        if args.json:
            document = uploadview.dry_run_json(result, str(args.src), planned)
            print(json.dumps(document, indent=2))
        elif args.quiet:
            for line in uploadview.dry_run_errors(result, planned):
                print(line, file=sys.stderr)
        else:
            for line in uploadview.dry_run_lines(result, planned):
                print(line)
        return EXIT_PROBLEM if result.problems else EXIT_OK

    terminal = sys.stderr.isatty()
    display = None
    if terminal and not args.quiet:
        from rich.console import Console

        display = uploadview.ProgressDisplay(Console(stderr=True))
    with display.shown() if display is not None else nullcontext():
        # Configured inside: on a terminal the log lines then appear above the display.
        level = "error" if args.quiet else "warning" if terminal else "info"
        _configure_logs("console" if terminal else "json", level)
        summary = anyio.run(send, None if display is None else display.update)
    if args.json:
        document = uploadview.summary_json(summary, str(args.src), where)
        print(json.dumps(document, indent=2))
    elif not args.quiet:
        print(uploadview.summary_line(summary))
    for path, error in summary.failures:
        _say(f"failed: {path}: {error}", file=sys.stderr)
    if summary.files == 0:
        _say(f"cpg-daemon upload: nothing to upload under {args.src} (is it right?)", sys.stderr)
    return EXIT_PROBLEM if summary.failed else EXIT_OK


def _source_access(
    args: argparse.Namespace, destination: S3Config
) -> tuple[S3Config, CredentialsConfig | None]:
    """S3 settings and keys (None: unsigned) to read an S3 SRC with: its own endpoint and
    region where given (else the destination's; the data plane and attempts are the
    destination's), its own profile, else --profile when
    that profile writes the destination itself (not only asks Access Grants for keys),
    else botocore's standard chain (environment, default profile, instance role)."""
    s3 = replace(
        S3Config(),
        endpoint_url=args.source_endpoint_url or destination.endpoint_url,
        region=args.source_region or destination.region,
        request_attempts=destination.request_attempts,
        data_plane=destination.data_plane,
    )
    if args.source_no_sign_request:
        return s3, None
    if args.source_profile is not None:
        return s3, CredentialsConfig(source="profile", profile=args.source_profile)
    if args.profile is not None and not getattr(args, "access_grants", False):
        return s3, CredentialsConfig(source="profile", profile=args.profile)
    return s3, CredentialsConfig()


def _recover_journal(args: argparse.Namespace) -> int:
    """Move a damaged journal aside (the daemon must be stopped: its lock is taken here)."""
    from cpg_daemon.journal import JOURNAL_NAME, check_integrity, lock_state_dir, move_aside

    config = _load(args)
    state_dir = config.daemon.state_dir
    path = state_dir / JOURNAL_NAME
    if not path.exists():
        _say(f"no journal at {path}: nothing to recover")
        return EXIT_OK
    lock = lock_state_dir(state_dir)  # FatalError (exit 1) while a daemon runs on it
    try:
        problem = check_integrity(path)
        if problem == "ok" and not args.force:
            _say(f"the journal {path} is intact (SQLite integrity check: ok); nothing to do")
            return EXIT_OK
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = move_aside(path, f".damaged-{stamp}")
    finally:
        os.close(lock)
    _say(f"the journal {path}: {problem}")
    print(
        f"moved it to {moved} (keep it until staging is verified). Start the daemon again: "
        "it lists each destination on S3 and uploads only what is missing or different; "
        "then `cpg-daemon verify` proves staging complete"
    )
    return EXIT_OK


def _example_config(args: argparse.Namespace) -> int:
    from importlib import resources

    example = resources.files("cpg_daemon") / "data" / "config.example.toml"
    print(example.read_text(encoding="utf-8"), end="")
    return EXIT_OK


def _install_service(args: argparse.Namespace) -> int:
    from cpg_daemon.ops import service

    try:
        installation, notes = service.installation(
            args.config or default_config_path(),
            user=args.user,
            group=args.group,
            aws_credentials=args.aws_credentials,
        )
        unit = service.render(installation)
        socket_unit = service.render_socket(installation)
    except ValueError as exc:
        _say(f"cpg-daemon install-service: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        _say(f"cpg-daemon install-service: note: {note}", file=sys.stderr)
    if args.output is None:
        print(socket_unit if args.socket_unit else unit, end="")
        return EXIT_OK
    # A folder gets both; a file gets the service, and the socket goes beside it.
    folder = args.output if args.output.is_dir() else args.output.parent
    try:
        path = service.write_unit(unit, args.output)
        socket_path = service.write_unit(socket_unit, folder, service.SOCKET_UNIT_NAME)
    except OSError as exc:
        _say(f"cpg-daemon install-service: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(
        f"wrote {path} and {socket_path}; now `systemctl daemon-reload`, then "
        f"`systemctl enable --now {socket_path.name} {path.name}` (first install) or "
        f"`systemctl restart {path.name}` (its socket restarts with it)"
    )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from cpg_daemon.engine import verify

    if args.source is not None:
        try:
            result = _verify_source(args)
        except (ValueError, FileNotFoundError, CpgError) as exc:
            _say(f"cpg-daemon verify: {exc}", file=sys.stderr)
            return EXIT_PROBLEM if isinstance(exc, CpgError) else EXIT_CONFIG
        summary = result.summary()
    elif args.manifest is not None:
        try:
            result = _verify_against_manifest(args)
        except (ValueError, CpgError) as exc:
            _say(f"cpg-daemon verify: {exc}", file=sys.stderr)
            return EXIT_CONFIG if isinstance(exc, (ValueError, ConfigError)) else EXIT_PROBLEM
        summary = result.summary().replace("local files", "objects in the manifest")
        counts = result.counts
    elif args.via_daemon:
        arguments = {"quick": args.quick, "rows": args.report is not None}
        if args.watch:
            arguments["watch"] = args.watch
        reply, failed = _ask(args, "verify", arguments, timeout=VERIFY_TIMEOUT)
        if failed is not None:
            return failed
        result = verify.Result([verify.Row(**row) for row in reply["rows"]], reply["seconds"])
        summary, counts = reply["summary"], reply["counts"]
    else:
        config = _load(args)
        if args.watch:
            try:
                config = replace(config, watches=(config.watch(args.watch),))
            except KeyError as exc:
                _say(f"cpg-daemon verify: {exc.args[0]}", file=sys.stderr)
                return EXIT_PROBLEM
        absent = [w for w in config.watches if not w.path.is_dir()]
        for watch in absent:
            _say(
                f"cpg-daemon verify: watch {watch.name}: the local folder {watch.path} is not "
                "here, and verify compares local files with staging. To check staging "
                "without them: cpg-daemon verify --manifest FILE, with a batch's manifest "
                "from the machine that uploaded it (STATE_DIR/manifests/)",
                file=sys.stderr,
            )
        if absent:
            return EXIT_PROBLEM
        _configure_logs("console", "error")
        result = anyio.run(_verify_here, config, args.quick)
        summary, counts = result.summary(), result.counts
    different = [row for row in result.rows if row.status != "match"]
    if args.report is not None:
        with open(args.report, "w", encoding="utf-8", newline="") as out:
            verify.write_report(result.rows, out)
    if args.json:
        document = {
            "command": "verify",
            "ok": not different,
            "counts": {status: counts.get(status, 0) for status in verify.STATUSES},
            "seconds": round(result.seconds, 3),
            "summary": summary,
            "differences": list(verify.row_dicts(different)),
            "report": None if args.report is None else str(args.report),
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK if not different else EXIT_PROBLEM
    for row in different[:VERIFY_SHOWN]:
        where = row.path or row.key
        detail = ""
        if row.status == "size_mismatch":
            detail = f" (local {row.local_size:,} bytes, staged {row.remote_size:,})"
        elif row.status == "checksum_mismatch":
            detail = (
                f" ({row.checksum_algorithm} local {row.local_checksum}, "
                f"staged {row.remote_checksum})"
            )
        _say(f"{row.status}: {where}{detail}")
    if len(different) > VERIFY_SHOWN:
        _say(f"... and {len(different) - VERIFY_SHOWN:,} more (see --report)")
    if args.report is not None:
        _say(f"report: {args.report}")
    print(summary)
    return EXIT_OK if not different else EXIT_PROBLEM


def _verify_source(args: argparse.Namespace) -> Any:
    """``verify --source SRC --destination DEST``: what ``upload SRC DEST`` sent, checked
    without a configuration (the upload's journal proves what it recorded)."""
    from cpg_daemon.engine import oneshot, verify
    from cpg_daemon.engine.dataset import open_store

    if args.destination is None:
        raise ValueError("--source needs --destination s3://BUCKET/PREFIX/ (upload's DEST)")
    destination, object_name = oneshot.parse_destination(args.destination)
    s3, credentials, _ = _read_access(args, destination)
    state_dir = args.state_dir or oneshot.default_state_dir()
    _configure_logs("console", "error")

    async def run() -> verify.Result:
        started = time.monotonic()
        async with open_store(s3, credentials) as store:
            if not args.source.startswith("s3://"):
                watch = oneshot.source_watch(Path(args.source), destination, object_name)
                journal = oneshot.journal_for(state_dir, watch, None)
                source: verify.Source = verify.Folder(watch)
                rows = await _verify_rows(watch, store, journal, source, args.quick)
            else:
                reader = _source_access(args, s3)
                async with open_store(*reader, reads=True) as read:
                    watch, objects = await oneshot.object_watch(
                        read, args.source, destination, object_name
                    )
                    journal = oneshot.journal_for(state_dir, watch, objects)
                    source = verify.Objects(watch, objects)
                    rows = await _verify_rows(watch, store, journal, source, args.quick)
        return verify.Result(rows, time.monotonic() - started)

    return anyio.run(run)


async def _verify_rows(
    watch: WatchConfig, store: Storage, journal: Path, source: Any, quick: bool
) -> list[Any]:
    from cpg_daemon.engine import verify

    known = journal if await anyio.Path(journal).is_file() else None
    return await verify.Verifier(watch, store, known, quick=quick, source=source).run()


def _verify_against_manifest(args: argparse.Namespace) -> Any:
    """``verify --manifest``: with -c's [s3]/[credentials], else --endpoint-url/--profile,
    or no keys at all (--no-sign-request)."""
    from cpg_daemon.engine import manifest

    listed = manifest.read(args.manifest)
    destination = parse_s3_uri(args.destination) if args.destination else listed.destination
    if args.no_sign_request and args.profile:
        raise ValueError("--no-sign-request and --profile exclude each other")
    s3, credentials, state_dir = _read_access(args, destination)
    _configure_logs("console", "error")

    async def run() -> Any:
        from cpg_daemon.engine.dataset import open_store

        async with open_store(s3, credentials, state_dir) as store:
            return await manifest.verify_manifest(listed, store, destination)

    return anyio.run(run)


def _manifest(args: argparse.Namespace) -> int:
    """``manifest``: streamed from the journal as the daemon writes a batch's (a million
    objects cost no memory), to FILE or standard output."""
    import sqlite3

    from cpg_daemon.engine import manifest
    from cpg_daemon.journal import JOURNAL_NAME, counted_uploads

    config = _load(args)
    names = [w.name for w in config.watches]
    if args.watch is None and len(names) != 1:
        _say(f"cpg-daemon manifest: name a watch ({', '.join(names) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        watch = config.watch(args.watch or names[0])
    except KeyError as exc:
        _say(f"cpg-daemon manifest: {exc.args[0]}", file=sys.stderr)
        return EXIT_CONFIG
    folder = (args.folder or "").strip("/")
    journal = config.daemon.state_dir / JOURNAL_NAME
    if not journal.is_file():
        _say(f"cpg-daemon manifest: no journal in {config.daemon.state_dir}", file=sys.stderr)
        return EXIT_PROBLEM
    destination = (
        parse_s3_uri(f"s3://{watch.destination.bucket}/{watch.destination.prefix}{folder}/")
        if folder
        else watch.destination
    )
    try:
        with counted_uploads(journal, watch.name, folder) as (files, size, uploads):
            header = manifest.header_of(destination, watch.name, folder, watch.path, files, size)
            entries = map(manifest.entry_of, uploads)
            if args.output is not None:
                digest = manifest.write_stream(header, entries, args.output)
                _say(f"manifest {args.output}: {files:,} objects, sha256 {digest}")
            else:
                digest = manifest.dump(header, entries, sys.stdout.buffer, "standard output")
                sys.stdout.flush()
                _say(f"sha256 {digest}", file=sys.stderr)
    except sqlite3.Error as exc:
        _say(f"cpg-daemon manifest: cannot read the journal {journal}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except (OSError, manifest.ManifestError) as exc:
        _say(f"cpg-daemon manifest: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


VERIFY_SHOWN = 50
"""Differences printed before "see --report"."""
DATASET_SHOWN = 20
"""Problems of one check printed before "... and N more"."""


def _check_dataset(args: argparse.Namespace) -> int:
    """``check-dataset TARGET``: 0 complete, 1 something required missing, 2 bad arguments."""
    from cpg_daemon.engine import dataset

    def bad(message: str) -> int:
        _say(f"cpg-daemon check-dataset: {message}", file=sys.stderr)
        return EXIT_CONFIG

    if args.concurrency is not None and not 1 <= args.concurrency <= 1024:
        return bad("--concurrency must be 1 to 1024")
    concurrency = args.concurrency or dataset.DEFAULT_CONCURRENCY
    _configure_logs("console", "error")
    if not args.target.startswith("s3://"):
        root = Path(args.target)
        if not root.is_dir():
            return bad(f"{args.target} is not a folder, nor an s3://BUCKET/PROJECT/[SOURCE/] URI")
        try:
            checked = dataset.check_folder(root)
        except OSError as exc:
            _say(f"cpg-daemon check-dataset: cannot read {args.target}: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
        target = str(root)
    else:
        try:
            location = parse_s3_uri(args.target)
        except ValueError as exc:
            return bad(str(exc))
        if not 1 <= location.prefix.count("/") <= 2:
            return bad(
                f"{args.target} is not a dataset: expected s3://BUCKET/cpgNNNN-name/SOURCE/ "
                "(one source) or s3://BUCKET/cpgNNNN-name/ (every source)"
            )
        if args.no_sign_request and args.profile:
            return bad("--no-sign-request and --profile exclude each other")
        try:
            s3, credentials, state_dir = _read_access(args, location)
        except ValueError as exc:
            return bad(str(exc))
        checked = anyio.run(
            lambda: dataset.check_s3(
                location, s3, credentials, concurrency=concurrency, state_dir=state_dir
            )
        )
        target = str(location)
    report, listing = checked.report, checked.listing
    if args.json:
        document = report.to_json(target)
        document["listing"] = {"requests": listing.requests, "seconds": round(listing.seconds, 3)}
        print(json.dumps(document, indent=2))
    else:
        for line in _dataset_lines(report, target, listing):
            _say(line)
    return EXIT_OK if report.complete else EXIT_PROBLEM


def _read_access(
    args: argparse.Namespace, location: S3Location
) -> tuple[S3Config, CredentialsConfig | None, Path | None]:
    """S3 settings, keys (None: unsigned) and the state folder (for handed-over keys) to
    read ``location`` with, for check-dataset and verify --manifest: the -c config's
    entry that covers it, else --profile, the environment, or --no-sign-request
    (ValueError: why not)."""
    from cpg_daemon.s3.region import region_for

    s3, credentials, state_dir = S3Config(region=""), CredentialsConfig(), None
    if args.config is not None or os.environ.get("CPG_DAEMON_CONFIG"):
        config = load_config(args.config or default_config_path(), default_region="")
        s3, state_dir = config.s3, config.daemon.state_dir
        covering = [c for c in config.credentials if target_covers(c.target, location)]
        if covering:
            credentials = max(covering, key=lambda c: len(c.target))
        elif not (args.profile or args.no_sign_request):
            targets = ", ".join(c.target for c in config.credentials)
            raise ValueError(
                f"no [credentials] target of {config.path} covers {location} "
                f"(targets: {targets}); give --profile or --no-sign-request"
            )
    changes: dict[str, Any] = {}
    if args.endpoint_url is not None:
        changes["endpoint_url"] = args.endpoint_url
    if args.region is not None:
        changes["region"] = args.region
    s3 = replace(s3, **changes)
    if args.profile is not None:
        credentials = CredentialsConfig(source="profile", profile=args.profile)
    if not s3.region:
        s3 = replace(s3, region=region_for(location.bucket, credentials.profile))
    if args.no_sign_request:
        return s3, None, None
    return s3, credentials, state_dir


def _dataset_lines(report: DatasetReport, target: str, listing: Listing) -> list[str]:
    """The human-readable report (names pass through ``_say``, hence ``printable``)."""
    from cpg_daemon.core.dataset import FOLDER_RULE

    lines = [
        f"check-dataset {target}: {report.objects:,} objects ({format_size(report.bytes)}) "
        f"in {len(report.sources)} source{'s' if len(report.sources) != 1 else ''}, "
        f"listed in {listing.seconds:.1f} s"
        + (f" ({listing.requests:,} listings)" if listing.requests else "")
    ]
    for source in report.sources:
        workspace = ", ".join(f"{name} ({files:,})" for name, files in source.workspace.items())
        lines.append(
            f"source {source.name}: {source.objects:,} objects ({format_size(source.bytes)}); "
            f"workspace: {workspace or 'none'}"
        )
        for batch in source.batches:
            count = len(batch.plates)
            also = ", ".join(batch.image_manipulations)
            extra = f"; also {also}" if also else ""
            lines.append(f"  batch {batch.name}: {count} plate{'s' if count != 1 else ''}{extra}")
            width = max([5, *(len(plate.name) for plate in batch.plates)])
            lines.append(
                f"    {'plate':<{width}}  {'images':>7} {'illum':>5} {'load_data':>9} "
                f"{'analysis':>8} {'backend':>10} {'profiles':>8}"
            )
            for plate in batch.plates:
                backend = f"{plate.backend}" + (" +sqlite" if plate.backend_sqlite else "")
                row = (
                    f"    {plate.name:<{width}}  {plate.images or '-':>7} {plate.illum or '-':>5} "
                    f"{plate.load_data_csv or '-':>9} {plate.analysis or '-':>8} "
                    f"{backend if plate.backend else '-':>10} {plate.profiles or '-':>8}"
                )
                folders = [f for f in plate.image_folders if f != plate.name]
                if folders:
                    row += f"  (images/{batch.name}/images/{', '.join(folders)}/)"
                lines.append(row)
    for required, heading in (
        (True, "required (the gallery's guide asks for it; exit status 1):"),
        (False, "advice (recommended, or the contributor's choice; exit status unchanged):"),
    ):
        problems = [p for p in report.problems if p.required == required]
        if not problems:
            continue
        lines.append(heading)
        shown: dict[str, int] = {}
        for problem in problems:
            name = problem.rule if problem.check == FOLDER_RULE else problem.check
            shown[name] = shown.get(name, 0) + 1
            if shown[name] > DATASET_SHOWN:
                continue
            files = f" ({problem.files:,} files)" if problem.check == FOLDER_RULE else ""
            lines.append(f"  [{name}] {problem.message}{files}")
        for name, count in shown.items():
            if count > DATASET_SHOWN:
                more = count - DATASET_SHOWN
                lines.append(f"  [{name}] ... and {more:,} more (--json lists all)")
    required_count, advice_count = len(report.required), len(report.advice)
    if report.complete:
        lines.append(
            f"complete: nothing the gallery's guide requires is missing ({advice_count} advice)"
        )
    else:
        lines.append(
            f"incomplete: {required_count} required problem{'s' if required_count != 1 else ''} "
            f"({advice_count} advice)"
        )
    return lines


VERIFY_TIMEOUT = 24 * 3600.0
"""How long ``verify --via-daemon`` waits for the daemon's answer."""


async def _verify_here(config: Config, quick: bool) -> Any:
    """Verify with this process's own credentials (the config's, as the daemon would)."""
    from cpg_daemon.engine import verify
    from cpg_daemon.engine.grants import Grants, assign
    from cpg_daemon.journal import JOURNAL_NAME

    assignment = await anyio.to_thread.run_sync(assign, config)
    async with Grants.open(config, assignment) as grants:
        await grants.obtain()
        watches = [(w.config, w.grant.store) for w in grants.table(config, assignment).values()]
        return await verify.verify(
            watches,
            config.daemon.state_dir / JOURNAL_NAME,
            quick=quick,
            concurrency=config.s3.max_concurrency,
        )


def _demo(args: argparse.Namespace) -> int:
    try:
        import moto  # noqa: F401 - only checks that the local S3 server is installed
    except ImportError:
        print(
            "cpg-daemon demo needs a local S3 server: pip install 'cpg-daemon[server]'",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    from cpg_daemon.cli import demo

    _configure_logs("console" if sys.stderr.isatty() else "json", "warning")
    once = args.once or not sys.stdout.isatty()
    result: int = anyio.run(demo.run_demo, once)
    return result


EXIT_NO_DAEMON = 3
EXIT_PERMISSION = 4
"""The daemon's socket is there, but this user may not use it."""


def _socket_path(args: argparse.Namespace) -> Path:
    """-s, else the config's daemon.socket (when there is a config), else the default.

    A default config this user may not read (``0640 root:cpg-daemon``, read by a member
    of ``socket_group``) is no error: its socket is most likely the default one.
    """
    if args.socket is not None:
        return Path(args.socket)
    path = args.config or default_config_path()
    if args.config is None and (not path.exists() or not os.access(path, os.R_OK)):
        return DEFAULT_SOCKET
    return load_config(path).daemon.socket


def _ask(
    args: argparse.Namespace,
    command: str,
    arguments: dict[str, Any],
    path: Path | None = None,
    timeout: float = client.CLIENT_TIMEOUT,
) -> tuple[Any, int | None]:
    """The daemon's answer, or None and the exit status after printing why there is none."""
    try:
        path = path or _socket_path(args)
        return client.request(path, command, arguments, timeout=timeout), None
    except client.SocketPermissionError as exc:
        _say(f"cpg-daemon {command}: {exc}", file=sys.stderr)
        return None, EXIT_PERMISSION
    except client.NoDaemonError as exc:
        _say(f"cpg-daemon {command}: {exc}", file=sys.stderr)
        return None, EXIT_NO_DAEMON
    except client.CommandError as exc:
        _say(f"cpg-daemon {command}: {exc}", file=sys.stderr)
        return None, EXIT_PROBLEM


def _status(args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return _status_live(args)
    result, failed = _ask(args, "status", {})
    if failed is not None:
        return failed
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(status_view.render(status_view.from_wire(result)))
    return EXIT_OK


def _control(args: argparse.Namespace) -> int:
    arguments = {} if args.watch is None else {"watch": args.watch}
    result, failed = _ask(args, args.command, arguments)
    if failed is not None:
        return failed
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "retry":
        _say(f"{result['requeued']} failed files queued again ({', '.join(result['watches'])})")
    else:
        verb = {"pause": "paused", "resume": "resumed", "rescan": "rescanning"}[args.command]
        _say(f"{verb}: {', '.join(result[verb])}")
    return EXIT_OK


def _credentials(args: argparse.Namespace) -> int:
    from cpg_daemon.cli.keys import KeysFormatError, keys_from_environment, parse_keys

    piped = sys.stdin.read() if sys.stdin is not None and not sys.stdin.isatty() else ""
    try:
        keys = parse_keys(piped) if piped.strip() else keys_from_environment(os.environ)
    except KeysFormatError as exc:
        _say(f"cpg-daemon credentials: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    result, failed = _ask(args, "credentials", keys.request(args.target))
    if failed is not None:
        return failed
    until = result["expires_at"] or "an unknown time (no expiration given)"
    watches = ", ".join(result["watches"]) or "none"
    _say(f"credentials {result['target']}: handed to the daemon, valid until {until}")
    _say(f"watches using them: {watches}")
    if result.get("note"):
        _say(f"note: {result['note']}")
    return EXIT_OK


def _reload_socket(args: argparse.Namespace) -> Path:
    """The socket to ask for a reload, even when the edited config no longer loads.

    The daemon must hear of a broken file (it keeps its old configuration and
    shows the error in status), so only ``daemon.socket`` is read here.
    """
    try:
        return _socket_path(args)
    except ConfigError:
        path = args.config or default_config_path()
        try:
            value = tomllib.loads(path.read_text(encoding="utf-8"))["daemon"]["socket"]
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
            return DEFAULT_SOCKET
        return Path(value) if isinstance(value, str) and value else DEFAULT_SOCKET


def _reload(args: argparse.Namespace) -> int:
    result, failed = _ask(args, "reload", {}, _reload_socket(args))
    if failed is not None:
        return failed
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    changes = "; ".join(
        f"{what} {', '.join(result[what])}"
        for what in ("added", "removed", "changed")
        if result[what]
    )
    _say(f"configuration reloaded: {changes or 'no watch changed'}")
    if result["restart_needed"]:
        print(
            "restart the daemon to apply: " + ", ".join(result["restart_needed"]),
            file=sys.stderr,
        )
    return EXIT_OK


def _status_live(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    path = _socket_path(args)
    console = Console()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                try:
                    reply = status_view.from_wire(client.request(path, "status"))
                    view = status_view.live_view(reply)
                except client.NoDaemonError as exc:
                    view = Text(f"{exc} (retrying; Ctrl-C to stop)", style="yellow")
                live.update(view, refresh=True)
                time.sleep(1.0)
    except KeyboardInterrupt:
        return EXIT_OK
