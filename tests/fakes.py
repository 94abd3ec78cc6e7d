"""Local fakes of the AWS services that hand out short-lived S3 keys, and an S3 gatekeeper.

No AWS account is reachable from the tests, so these speak the real wire formats well
enough for unmodified botocore/aiobotocore clients to talk to them:

* :class:`KeyRegistry` mints short-lived key sets (``ASIA...`` key id, secret, session
  token, expiration) and decides whether a key pair is still good.
* :class:`FakeControlPlane` is one HTTP server answering S3 Control ``GetDataAccess``
  (S3 Access Grants, REST-XML) and STS ``AssumeRole`` (query protocol). Both mint their
  keys in a :class:`KeyRegistry`.
* :class:`AuthProxy` is a reverse proxy in front of the moto S3 server that rejects
  requests signed with unknown or expired keys exactly like S3 does (``ExpiredToken``,
  ``InvalidToken``, ``InvalidAccessKeyId``) and forwards everything else, streaming.

Everything listens on 127.0.0.1 on a free port, runs in daemon threads and is shut down
(including idle keep-alive connections) by ``stop()`` or by leaving the ``with`` block.

botocore puts the account id in front of the S3 Control host even when a custom
endpoint URL is configured (``123456789012.127.0.0.1:PORT``); test clients must call
:func:`route_s3control_to_endpoint` so requests reach the fake.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import http.client
import re
import secrets
import socket
import socketserver
import string
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit
from xml.sax.saxutils import escape

__all__ = [
    "S3CONTROL_NAMESPACE",
    "STS_NAMESPACE",
    "AssumeRoleCall",
    "AuthProxy",
    "DataAccessCall",
    "FakeControlPlane",
    "KeyRegistry",
    "MintedKeys",
    "grant_covers",
    "route_s3control_to_endpoint",
]

HOST = "127.0.0.1"
S3CONTROL_NAMESPACE = "http://awss3control.amazonaws.com/doc/2018-08-20/"
STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
DATA_ACCESS_PATH = "/v20180820/accessgrantsinstance/dataaccess"
DEFAULT_DURATION_SECONDS = 3600
MIN_DURATION_SECONDS = 900
MAX_DURATION_SECONDS = 43200
DEFAULT_ACCOUNT_ID = "123456789012"
CHUNK_SIZE = 64 * 1024
SOCKET_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0

_ALNUM_UPPER = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
# "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/s3/aws4_request, SignedHeaders=..."
_SIGV4_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")
# Signature version 2: "AWS AKID:signature"
_SIGV2_RE = re.compile(r"^AWS ([^:\s]+):")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

ErrorSpec = tuple[int, str, str]
"""(HTTP status, error code, message) of an error response."""


# -- keys --------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso8601(moment: datetime) -> str:
    """``2026-11-25T12:00:00.123Z``: the millisecond UTC format STS uses."""
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _request_id() -> str:
    return uuid.uuid4().hex.upper()[:16]


@dataclass(frozen=True)
class MintedKeys:
    """One set of temporary credentials, as a control plane hands them out."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime
    """UTC, millisecond precision: exactly what the wire format says."""
    issued_at: datetime
    """UTC time of minting."""
    permission: str = "READWRITE"
    """What the grant allows: READ keys may only GET and HEAD, WRITE keys only write
    (AuthProxy refuses the rest with AccessDenied, as S3 does for a grant's keys)."""

    @property
    def lifetime(self) -> float:
        return (self.expiration - self.issued_at).total_seconds()

    def expired(self, now: datetime | None = None) -> bool:
        return (now or _utcnow()) >= self.expiration

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client(...)`` / ``session.create_client(...)``."""
        return {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "aws_session_token": self.session_token,
        }


MINTED_SECRETS: list[str] = []
"""Every secret key and session token any registry minted in this test session (conftest
scans all the output of the session for them)."""


class KeyRegistry:
    """Thread-safe store of minted temporary keys, plus control-plane failure switches.

    ``lifetime`` (seconds) caps the lifetime of keys minted by the control plane and can
    be changed at any time. ``fail_with = (status, code, message)`` makes every
    control-plane call answer that error; ``down = True`` makes the control plane close
    each connection without answering (clients see a dropped connection).
    """

    def __init__(self, lifetime: float = 3600.0) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, MintedKeys] = {}
        self._mints: list[MintedKeys] = []
        self.lifetime: float = lifetime
        self.fail_with: ErrorSpec | None = None
        self.down: bool = False

    def mint(self, lifetime: float | None = None, permission: str = "READWRITE") -> MintedKeys:
        """Mint a key set valid for ``lifetime`` seconds (default: ``self.lifetime``)."""
        seconds = self.lifetime if lifetime is None else lifetime
        issued_at = _utcnow()
        expiration = issued_at + timedelta(seconds=seconds)
        # Keep only what the ISO-8601 wire format carries, so client and server agree.
        expiration = expiration.replace(microsecond=expiration.microsecond // 1000 * 1000)
        token = base64.b64encode(b"FakeSessionToken/" + secrets.token_bytes(96)).decode()
        keys = MintedKeys(
            access_key_id="ASIA" + "".join(secrets.choice(_ALNUM_UPPER) for _ in range(16)),
            secret_access_key="".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40)),
            session_token=token,
            expiration=expiration,
            issued_at=issued_at,
            permission=permission,
        )
        with self._lock:
            self._keys[keys.access_key_id] = keys
            self._mints.append(keys)
            MINTED_SECRETS.extend((keys.secret_access_key, keys.session_token))
        return keys

    def check(self, access_key_id: str, session_token: str | None) -> str | None:
        """None if the pair is known and unexpired, else the S3 error code to answer."""
        with self._lock:
            keys = self._keys.get(access_key_id)
        if keys is None:
            return "InvalidAccessKeyId"
        if session_token != keys.session_token:
            return "InvalidToken"
        if keys.expired():
            return "ExpiredToken"
        return None

    def get(self, access_key_id: str) -> MintedKeys | None:
        """The current record of a key (its expiration reflects :meth:`expire`)."""
        with self._lock:
            return self._keys.get(access_key_id)

    def expire(self, access_key_id: str | None = None) -> None:
        """Make one key (or every key) expire now, without waiting."""
        now = _utcnow()
        with self._lock:
            ids = list(self._keys) if access_key_id is None else [access_key_id]
            for key_id in ids:
                keys = self._keys.get(key_id)
                if keys is not None and keys.expiration > now:
                    self._keys[key_id] = dataclasses.replace(keys, expiration=now)

    @property
    def mints(self) -> list[MintedKeys]:
        """Every key set minted so far, oldest first (as minted)."""
        with self._lock:
            return list(self._mints)


# -- shared HTTP server machinery --------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can close its idle keep-alive connections on stop."""

    daemon_threads = True
    # A pool of clients may open many connections at once; 5 (the default) drops SYNs.
    request_queue_size = 128

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        owner: _BackgroundServer,
    ) -> None:
        self.owner = owner
        self._workers_lock = threading.Lock()
        self._workers: dict[threading.Thread, socket.socket] = {}
        super().__init__((HOST, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the FQDN of 127.0.0.1 (a DNS query).
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = int(self.server_address[1])

    def process_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: Any,
    ) -> None:
        sock = cast(socket.socket, request)
        thread = threading.Thread(
            target=self._work,
            args=(sock, client_address),
            name=f"{type(self.owner).__name__}-conn",
            daemon=True,
        )
        with self._workers_lock:
            self._workers[thread] = sock
        thread.start()

    def _work(self, sock: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(sock, client_address)
        except Exception:
            self.handle_error(sock, client_address)
        finally:
            self.shutdown_request(sock)
            with self._workers_lock:
                self._workers.pop(threading.current_thread(), None)

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: Any,
    ) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | http.client.HTTPException):
            return  # a client or upstream went away: normal for a proxy
        if exc is not None:
            self.owner.errors.append(exc)
        super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        with self._workers_lock:
            workers = dict(self._workers)
        for sock in workers.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in workers:
            thread.join(timeout)


_S = TypeVar("_S", bound="_BackgroundServer")


class _BackgroundServer:
    """start()/stop()/context manager around a :class:`_Server` in a daemon thread."""

    handler_class: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []
        """Unexpected exceptions raised in request handlers (connection errors excluded)."""

    def start(self: _S) -> _S:
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        httpd = _Server(self.handler_class, self)
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-serve",
            daemon=True,
        )
        self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        thread.join(STOP_TIMEOUT)
        httpd.close_connections(STOP_TIMEOUT)
        httpd.server_close()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return int(self._httpd.server_address[1])

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self: _S) -> _S:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler: every response has Content-Length or is chunked."""

    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server_version = "AmazonS3"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    # -- request bodies (Expect: 100-continue is answered before _dispatch runs) --

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in pieces of at most CHUNK_SIZE bytes (de-chunked)."""
        if self._is_chunked():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(65537)  # the CRLF after the chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, length: int) -> Iterator[bytes]:
        remaining = length
        while remaining > 0:
            data = self.rfile.read(min(remaining, CHUNK_SIZE))
            if not data:
                raise ConnectionError("connection closed inside a request body")
            remaining -= len(data)
            yield data

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain_body(self) -> None:
        for _ in self._iter_body():
            pass

    # -- responses --

    def _send_body(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/xml",
        headers: dict[str, str] | None = None,
    ) -> None:
        request_id = _request_id()
        self.send_response(status)
        self.send_header("x-amz-request-id", request_id)
        self.send_header("x-amzn-RequestId", request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body or self.command != "HEAD":
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _sender_access_key(authorization: str | None) -> str | None:
    """The access key id in a SigV4 (or SigV2) Authorization header."""
    if not authorization:
        return None
    match = _SIGV4_CREDENTIAL_RE.search(authorization) or _SIGV2_RE.search(authorization)
    return match[1] if match else None


# -- the control plane -------------------------------------------------------------------


@dataclass(frozen=True)
class DataAccessCall:
    """One S3 Control GetDataAccess request the fake answered."""

    target: str | None
    permission: str | None
    duration_seconds: int | None
    account_id: str | None
    caller_access_key_id: str | None
    at: datetime
    status: int
    keys: MintedKeys | None


@dataclass(frozen=True)
class AssumeRoleCall:
    """One STS AssumeRole request the fake answered."""

    role_arn: str | None
    role_session_name: str | None
    duration_seconds: int | None
    caller_access_key_id: str | None
    at: datetime
    status: int
    keys: MintedKeys | None


def grant_covers(grant: str, target: str) -> bool:
    """Whether an Access Grants scope (``s3://bucket/prefix/*``) covers a requested target.

    A scope ending in ``*`` covers every target under its prefix (a target's own
    trailing ``*`` is ignored); any other scope covers exactly one object.
    """
    if grant.endswith("*"):
        return target.removesuffix("*").startswith(grant.removesuffix("*"))
    return target == grant


def _s3control_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<ErrorResponse><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>{_request_id()}</RequestId>"
        f"<HostId>{secrets.token_urlsafe(32)}</HostId></ErrorResponse>"
    ).encode()


def _sts_error(code: str, message: str, status: int) -> bytes:
    kind = "Sender" if status < 500 else "Receiver"
    return (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n'
        f"  <Error>\n    <Type>{kind}</Type>\n    <Code>{escape(code)}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n  </Error>\n"
        f"  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n"
    ).encode()


def _credentials_xml(keys: MintedKeys) -> str:
    return (
        "<Credentials>"
        f"<AccessKeyId>{keys.access_key_id}</AccessKeyId>"
        f"<SecretAccessKey>{escape(keys.secret_access_key)}</SecretAccessKey>"
        f"<SessionToken>{escape(keys.session_token)}</SessionToken>"
        f"<Expiration>{_iso8601(keys.expiration)}</Expiration>"
        "</Credentials>"
    )


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


class _ControlPlaneHandler(_Handler):
    server: _Server

    @property
    def plane(self) -> FakeControlPlane:
        return cast(FakeControlPlane, self.server.owner)

    def _dispatch(self) -> None:
        plane = self.plane
        if plane.registry.down:
            self._drain_body()
            self.close_connection = True  # close without a response
            return
        path, _, query = self.path.partition("?")
        if path == DATA_ACCESS_PATH:
            if self.command != "GET":
                self._drain_body()
                self._send_body(
                    405, _s3control_error("MethodNotAllowed", "The method is not allowed.")
                )
                return
            self._get_data_access(parse_qs(query, keep_blank_values=True))
        elif path == "/" and self.command == "POST":
            self._sts(parse_qs(self._read_body().decode("utf-8"), keep_blank_values=True))
        else:
            self._drain_body()
            self._send_body(404, _s3control_error("NotFound", f"No such operation: {path}"))

    # -- S3 Control GetDataAccess --

    def _get_data_access(self, query: dict[str, list[str]]) -> None:
        plane, registry = self.plane, self.plane.registry
        caller = _sender_access_key(self.headers.get("Authorization"))
        target = query.get("target", [None])[0]
        permission = query.get("permission", [None])[0]
        raw_duration = query.get("durationSeconds", [None])[0]
        duration = _int_or_none(raw_duration)
        account_id = self.headers.get("x-amz-account-id")
        keys: MintedKeys | None = None
        matched = target

        error: ErrorSpec | None = registry.fail_with
        if error is None and caller not in plane.long_term_keys:
            error = (
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            )
        if error is None and (
            not account_id
            or (plane.expected_account_id is not None and account_id != plane.expected_account_id)
        ):
            error = (403, "AccessDenied", "Access Denied")
        if error is None and (not target or not target.startswith("s3://")):
            error = (400, "InvalidRequest", "Invalid target: an S3 URI is required.")
        if error is None and permission not in ("READ", "WRITE", "READWRITE"):
            error = (400, "InvalidRequest", f"Invalid permission: {permission}")
        if error is None and (
            (raw_duration is not None and duration is None)
            or (
                duration is not None
                and not MIN_DURATION_SECONDS <= duration <= MAX_DURATION_SECONDS
            )
        ):
            error = (400, "InvalidRequest", f"Invalid durationSeconds: {raw_duration}")
        if error is None and target is not None and plane.grants is not None:
            covering = [g for g in plane.grants if grant_covers(g, target)]
            if covering:
                matched = max(covering, key=len)
            else:
                error = (
                    403,
                    "AccessDenied",
                    "You do not have permission to perform this action. No matching grant found.",
                )

        if error is None:
            requested = DEFAULT_DURATION_SECONDS if duration is None else duration
            keys = registry.mint(min(float(requested), registry.lifetime), str(permission))
            status = 200
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<GetDataAccessResult xmlns="{S3CONTROL_NAMESPACE}">'
                f"{_credentials_xml(keys)}"
                f"<MatchedGrantTarget>{escape(matched or '')}</MatchedGrantTarget>"
                "<Grantee><GranteeType>IAM</GranteeType>"
                f"<GranteeIdentifier>{escape(plane.grantee_arn(account_id or ''))}"
                "</GranteeIdentifier></Grantee>"
                "</GetDataAccessResult>"
            ).encode()
        else:
            status, code, message = error
            body = _s3control_error(code, message)
        plane._record_data_access(
            DataAccessCall(
                target=target,
                permission=permission,
                duration_seconds=duration,
                account_id=account_id,
                caller_access_key_id=caller,
                at=_utcnow(),
                status=status,
                keys=keys,
            )
        )
        self._send_body(status, body)

    # -- STS (query protocol) --

    def _sts(self, form: dict[str, list[str]]) -> None:
        action = form.get("Action", [None])[0]
        if action != "AssumeRole":
            self._send_body(
                400,
                _sts_error(
                    "InvalidAction",
                    f"Could not find operation {action} for version 2011-06-15",
                    400,
                ),
                content_type="text/xml",
            )
            return
        plane, registry = self.plane, self.plane.registry
        caller = _sender_access_key(self.headers.get("Authorization"))
        role_arn = form.get("RoleArn", [None])[0]
        session_name = form.get("RoleSessionName", [None])[0]
        raw_duration = form.get("DurationSeconds", [None])[0]
        duration = _int_or_none(raw_duration)
        keys: MintedKeys | None = None

        error: ErrorSpec | None = registry.fail_with
        if error is None and caller not in plane.long_term_keys:
            error = (
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        if error is None and (not role_arn or not session_name):
            error = (400, "ValidationError", "RoleArn and RoleSessionName are required.")
        if error is None and (
            (raw_duration is not None and duration is None)
            or (
                duration is not None
                and not MIN_DURATION_SECONDS <= duration <= MAX_DURATION_SECONDS
            )
        ):
            error = (
                400,
                "ValidationError",
                f"1 validation error detected: Value '{raw_duration}' at 'durationSeconds' "
                "failed to satisfy constraint: Member must have value greater than or "
                "equal to 900",
            )
        if (
            error is None
            and plane.allowed_role_arns is not None
            and role_arn not in plane.allowed_role_arns
        ):
            error = (
                403,
                "AccessDenied",
                f"User: {plane.caller_arn(caller or '')} is not authorized to perform: "
                f"sts:AssumeRole on resource: {role_arn}",
            )

        if error is None:
            assert role_arn is not None and session_name is not None
            requested = DEFAULT_DURATION_SECONDS if duration is None else duration
            keys = registry.mint(min(float(requested), registry.lifetime))
            status = 200
            arn_parts = role_arn.split(":", 5)
            account = arn_parts[4] if len(arn_parts) == 6 else DEFAULT_ACCOUNT_ID
            role_name = role_arn.rsplit("/", 1)[-1]
            role_id = "AROA" + "".join(secrets.choice(_ALNUM_UPPER) for _ in range(17))
            body = (
                f'<AssumeRoleResponse xmlns="{STS_NAMESPACE}">\n'
                "  <AssumeRoleResult>\n"
                "    <AssumedRoleUser>\n"
                f"      <AssumedRoleId>{role_id}:{escape(session_name)}</AssumedRoleId>\n"
                f"      <Arn>arn:aws:sts::{escape(account)}:assumed-role/{escape(role_name)}/"
                f"{escape(session_name)}</Arn>\n"
                "    </AssumedRoleUser>\n"
                f"    {_credentials_xml(keys)}\n"
                "  </AssumeRoleResult>\n"
                "  <ResponseMetadata>\n"
                f"    <RequestId>{uuid.uuid4()}</RequestId>\n"
                "  </ResponseMetadata>\n"
                "</AssumeRoleResponse>\n"
            ).encode()
        else:
            status, code, message = error
            body = _sts_error(code, message, status)
        plane._record_assume_role(
            AssumeRoleCall(
                role_arn=role_arn,
                role_session_name=session_name,
                duration_seconds=duration,
                caller_access_key_id=caller,
                at=_utcnow(),
                status=status,
                keys=keys,
            )
        )
        self._send_body(status, body, content_type="text/xml")


class FakeControlPlane(_BackgroundServer):
    """One HTTP server speaking S3 Control GetDataAccess and STS AssumeRole.

    * ``grants``: Access Grants scopes (``s3://bucket/prefix/*``); a GetDataAccess target
      no scope covers gets 403 AccessDenied "... No matching grant found.". None: every
      target is granted (and is its own MatchedGrantTarget).
    * ``expected_account_id``: if set, another ``x-amz-account-id`` gets 403 AccessDenied.
    * ``long_term_keys``: access key ids allowed to call either API (else 403
      InvalidAccessKeyId / InvalidClientTokenId).
    * ``allowed_role_arns``: if set, AssumeRole on another role gets 403 AccessDenied.

    Keys are minted in ``registry`` with lifetime ``min(requested, registry.lifetime)``;
    ``registry.fail_with`` / ``registry.down`` simulate outages. All attributes can be
    changed while the server runs.
    """

    handler_class = _ControlPlaneHandler

    def __init__(
        self,
        registry: KeyRegistry | None = None,
        *,
        grants: list[str] | None = None,
        expected_account_id: str | None = None,
        long_term_keys: set[str] | None = None,
        allowed_role_arns: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry if registry is not None else KeyRegistry()
        self.grants = grants
        self.expected_account_id = expected_account_id
        self.long_term_keys: set[str] = {"testing"} if long_term_keys is None else long_term_keys
        self.allowed_role_arns = allowed_role_arns
        self._calls_lock = threading.Lock()
        self._data_access_calls: list[DataAccessCall] = []
        self._assume_role_calls: list[AssumeRoleCall] = []

    def grantee_arn(self, account_id: str) -> str:
        return f"arn:aws:iam::{account_id or DEFAULT_ACCOUNT_ID}:role/cpg-uploader"

    def caller_arn(self, access_key_id: str) -> str:
        return f"arn:aws:iam::{self.expected_account_id or DEFAULT_ACCOUNT_ID}:user/{access_key_id}"

    @property
    def data_access_calls(self) -> list[DataAccessCall]:
        with self._calls_lock:
            return list(self._data_access_calls)

    @property
    def assume_role_calls(self) -> list[AssumeRoleCall]:
        with self._calls_lock:
            return list(self._assume_role_calls)

    def _record_data_access(self, call: DataAccessCall) -> None:
        with self._calls_lock:
            self._data_access_calls.append(call)

    def _record_assume_role(self, call: AssumeRoleCall) -> None:
        with self._calls_lock:
            self._assume_role_calls.append(call)


def route_s3control_to_endpoint(client: Any, endpoint_url: str | None = None) -> None:
    """Make a botocore/aiobotocore S3 Control client send to its endpoint's own host.

    botocore's endpoint rules prefix the account id to the host even for a custom
    endpoint URL (``123456789012.127.0.0.1:PORT``). This ``before-send`` handler puts the
    endpoint's netloc back into ``request.url``; everything else (including the signed
    ``host`` header) is left as it is.
    """
    netloc = urlsplit(endpoint_url or client.meta.endpoint_url).netloc

    def rewrite(request: Any, **_: Any) -> None:
        parts = urlsplit(request.url)
        if parts.netloc != netloc:
            request.url = urlunsplit(parts._replace(netloc=netloc))

    client.meta.events.register(
        "before-send.s3-control", rewrite, unique_id="fakes-route-s3control-to-endpoint"
    )


# -- the S3 gatekeeper -------------------------------------------------------------------

_S3_ERRORS: dict[str, tuple[int, str]] = {
    "ExpiredToken": (400, "The provided token has expired."),
    "InvalidToken": (400, "The provided token is malformed or otherwise invalid."),
    "InvalidAccessKeyId": (
        403,
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    "AccessDenied": (403, "Access Denied"),
}


def _s3_error(code: str, message: str, extra: dict[str, str]) -> bytes:
    fields = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in extra.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>{fields}"
        f"<RequestId>{_request_id()}</RequestId>"
        f"<HostId>{secrets.token_urlsafe(48)}</HostId></Error>"
    ).encode()


class _ProxyHandler(_Handler):
    server: _Server

    @property
    def proxy(self) -> AuthProxy:
        return cast(AuthProxy, self.server.owner)

    def _credentials(self) -> tuple[str | None, str | None]:
        access_key_id = _sender_access_key(self.headers.get("Authorization"))
        token = self.headers.get("X-Amz-Security-Token")
        if access_key_id is None:  # a presigned URL (SigV4 or SigV2 query parameters)
            query = {
                name.lower(): values[0]
                for name, values in parse_qs(self.path.partition("?")[2]).items()
            }
            credential = query.get("x-amz-credential") or query.get("awsaccesskeyid")
            if credential:
                access_key_id = credential.split("/", 1)[0]
                token = query.get("x-amz-security-token", token)
        return access_key_id, token

    def _dispatch(self) -> None:
        proxy = self.proxy
        access_key_id, token = self._credentials()
        if access_key_id is None:
            code: str | None = "AccessDenied"
        elif access_key_id in proxy.allow_access_keys:
            code = None
        else:
            code = proxy.registry.check(access_key_id, token)
            keys = proxy.registry.get(access_key_id) if code is None else None
            reading = self.command in ("GET", "HEAD")
            if keys is not None and keys.permission == ("WRITE" if reading else "READ"):
                code = "AccessDenied"
        if code is not None:
            self._reject(code, access_key_id, token)
        else:
            self._forward()

    def _reject(self, code: str, access_key_id: str | None, token: str | None) -> None:
        self.proxy._count_rejection(code)
        self._drain_body()
        status, message = _S3_ERRORS[code]
        extra: dict[str, str] = {}
        if code == "ExpiredToken" and token:
            extra["Token-0"] = token
        elif code == "InvalidAccessKeyId" and access_key_id:
            extra["AWSAccessKeyId"] = access_key_id
        self._send_body(status, b"" if self.command == "HEAD" else _s3_error(code, message, extra))

    def _forward(self) -> None:
        proxy = self.proxy
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=SOCKET_TIMEOUT
        )
        try:
            self._forward_via(upstream)
        finally:
            upstream.close()

    def _forward_via(self, upstream: http.client.HTTPConnection) -> None:
        chunked = self._is_chunked()
        dropped = {
            token.strip().lower()
            for token in self.headers.get("Connection", "").split(",")
            if token.strip()
        }
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lower = name.lower()
                if lower in _HOP_BY_HOP or lower in dropped:
                    continue
                if lower in ("host", "expect", "content-length"):
                    continue
                upstream.putheader(name, value)
            upstream.putheader("Host", self.proxy.upstream_netloc)
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            elif "Content-Length" in self.headers:
                upstream.putheader("Content-Length", self.headers["Content-Length"])
            upstream.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            self._drain_body()
            self._bad_gateway(exc)
            return
        try:
            for data in self._iter_body():
                upstream.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                upstream.send(b"0\r\n\r\n")
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            # The request body may be half read: this connection cannot be reused.
            self.close_connection = True
            self._bad_gateway(exc)
            return
        self.proxy._count_forwarded(f"{self.command} {self.path}", response.status)
        self._relay(response)

    def _bad_gateway(self, exc: BaseException) -> None:
        self._send_body(
            502,
            b"" if self.command == "HEAD" else _s3_error("BadGateway", str(exc), {}),
        )

    def _relay(self, response: http.client.HTTPResponse) -> None:
        no_body = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        content_length = response.getheader("Content-Length")
        stream_chunked = not no_body and (response.chunked or content_length is None)
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or (lower == "content-length" and stream_chunked):
                continue
            self.send_header(name, value)
        if stream_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif content_length is None:
            self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if no_body:
            response.read()
            return
        try:
            while data := response.read(CHUNK_SIZE):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if stream_chunked else data)
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # the client sees a truncated body
            return
        if stream_chunked:
            self.wfile.write(b"0\r\n\r\n")


class AuthProxy(_BackgroundServer):
    """A reverse proxy in front of an S3 server that enforces temporary keys like S3.

    Each request's access key id (SigV4 ``Authorization`` header, or a presigned URL's
    ``X-Amz-Credential``) and ``X-Amz-Security-Token`` are checked with
    ``registry.check``; a failure gets S3's error (ExpiredToken 400, InvalidToken 400,
    InvalidAccessKeyId 403; an unsigned request gets AccessDenied 403) without
    forwarding. Keys in ``allow_access_keys`` pass unchecked. Everything else is
    forwarded to ``upstream_url`` (Host rewritten), streaming in both directions.
    """

    handler_class = _ProxyHandler

    def __init__(
        self,
        upstream_url: str,
        registry: KeyRegistry,
        *,
        allow_access_keys: set[str] | None = None,
    ) -> None:
        super().__init__()
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self.upstream_url = upstream_url
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port or 80
        self.upstream_netloc: str = parts.netloc
        self.registry = registry
        self.allow_access_keys: set[str] = set() if allow_access_keys is None else allow_access_keys
        self._counts_lock = threading.Lock()
        self._rejections: collections.Counter[str] = collections.Counter()
        self._forwarded = 0
        self._answered: list[tuple[str, int]] = []

    @property
    def rejections(self) -> dict[str, int]:
        """Rejected requests by S3 error code."""
        with self._counts_lock:
            return dict(self._rejections)

    @property
    def forwarded(self) -> int:
        """Requests forwarded upstream that got a response."""
        with self._counts_lock:
            return self._forwarded

    def reset_counters(self) -> None:
        with self._counts_lock:
            self._rejections.clear()
            self._forwarded = 0
            self._answered.clear()

    def _count_rejection(self, code: str) -> None:
        with self._counts_lock:
            self._rejections[code] += 1

    def _count_forwarded(self, request: str, status: int) -> None:
        with self._counts_lock:
            self._forwarded += 1
            self._answered.append((request, status))

    @property
    def answered(self) -> list[tuple[str, int]]:
        """("METHOD /path?query", status) of each request forwarded upstream, in order."""
        with self._counts_lock:
            return list(self._answered)
