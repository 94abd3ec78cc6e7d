"""Where the S3 client's keys come from: one provider per ``[credentials]`` table.

``environment`` and ``profile`` use botocore's standard chain as it is (it
refreshes SSO and ``credential_process`` keys by itself).

``access-grants`` and ``assume-role`` start from long-term keys (the profile,
the environment, or a file systemd passes with ``LoadCredential=``) and trade
them for short-lived keys: S3 Control GetDataAccess or STS AssumeRole. The
short-lived keys live in one botocore refreshable-credentials object shared
by every S3 client of the provider's session, so renewed keys reach every
client at once and nothing is rebuilt. A renewal loop renews them
``refresh_before`` ahead of the *returned* expiry (with jitter); failures are
retried with backoff while the keys last. While a provider has no valid keys
its watches are paused (the scheduler asks ``usable``), so no file fails for
lack of keys; they resume by themselves once a renewal succeeds.

Keys never reach logs, status or errors: only their expiry does.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aioboto3
import anyio
import anyio.to_thread
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from anyio.abc import TaskStatus
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cpg_daemon.core.config import Config, CredentialsConfig
from cpg_daemon.core.errors import ConfigError, CpgError, CredentialsError
from cpg_daemon.core.objectkeys import S3Location, target_covers
from cpg_daemon.s3 import _botocore

log = structlog.get_logger(__name__)

CredentialState = Literal["valid", "refreshing", "expired", "error"]
CREDENTIALS_FILE_NAME = "aws-credentials"
"""The file looked for in systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``)."""


@dataclass(frozen=True)
class CredentialStatistics:
    target: str
    source: str
    state: CredentialState
    expires_at: str | None
    last_error: str | None
    renewals: int


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


class ProfileMissingError(CpgError):
    """The configured AWS profile exists in none of the files botocore reads."""

    def __init__(self, profile: str, config_file: str = "~/.aws/config") -> None:
        message = (
            f"no AWS profile named {profile!r} in ~/.aws/config, ~/.aws/credentials "
            f"(of the user running cpg-daemon) or $CREDENTIALS_DIRECTORY/{CREDENTIALS_FILE_NAME}"
        )
        if _bare_section(config_file, profile):
            # The gallery's guide had people add [NAME] to ~/.aws/config; the AWS CLI
            # and botocore read only [profile NAME] there.
            message = (
                f"{config_file} has a section [{profile}], but in that file a profile's "
                f"section is written [profile {profile}] (only ~/.aws/credentials uses "
                f"[{profile}]): rename it to [profile {profile}]"
            )
        super().__init__(message)


def _bare_section(config_file: str, name: str) -> bool:
    """Whether an AWS config file has ``[name]`` (not ``[profile name]``)."""
    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read(os.path.expanduser(config_file), encoding="utf-8")
    except (OSError, configparser.Error, UnicodeDecodeError):
        return False
    return parser.has_section(name)


class CredentialProvider:
    """Keys for one ``[credentials]`` entry, handed out as an aioboto3 Session.

    The base class serves ``environment`` and ``profile``: botocore's chain,
    always usable, nothing to renew.
    """

    def __init__(self, config: CredentialsConfig, region: str) -> None:
        self.config = config
        self.region = region
        self.session = self._long_term_session()
        self._listeners: list[Callable[[], None]] = []

    def _long_term_session(self) -> aioboto3.Session:
        core = AioSession()
        directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
        try:
            handed_over = bool(directory) and (Path(directory) / CREDENTIALS_FILE_NAME).is_file()
        except OSError as exc:
            raise CredentialsError(
                f"cannot look in $CREDENTIALS_DIRECTORY ({directory}) for the long-term keys: "
                f"{exc.strerror}; systemd sets it for LoadCredential= and makes it readable "
                "by the service's user only: run cpg-daemon as that user, or unset it"
            ) from None
        if handed_over:
            # systemd LoadCredential=aws-credentials:/etc/cpg-daemon/aws-credentials
            core.set_config_variable(
                "credentials_file", str(Path(directory) / CREDENTIALS_FILE_NAME)
            )
        profile = self.config.profile if self.config.source != "environment" else ""
        if profile:
            if profile not in core.available_profiles:
                raise ProfileMissingError(profile, str(core.get_config_variable("config_file")))
            core.set_config_variable("profile", profile)
        return aioboto3.Session(botocore_session=core, region_name=self.region)

    def covers(self, destination: S3Location) -> bool:
        """Whether this entry's target covers a destination (no target covers all)."""
        return target_covers(self.config.target, destination)

    @property
    def usable(self) -> bool:
        """Whether uploads may use this provider's keys now."""
        return True

    def on_usable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the keys become usable again."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    async def renew_now(self) -> bool:
        """Renew at once (after the server refused the keys); whether that worked."""
        return False

    async def first_attempt(self) -> bool:
        """Wait for the running provider's first attempt at keys; whether they are usable."""
        return True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the keys fresh until cancelled (nothing to do for the standard chain)."""
        task_status.started()

    def statistics(self) -> CredentialStatistics:
        return CredentialStatistics(
            target=self.config.target or f"({self.config.source})",
            source=self.config.source,
            state="valid",
            expires_at=None,
            last_error=None,
            renewals=0,
        )


class RenewingProvider(CredentialProvider):
    """Short-lived keys from Access Grants or AssumeRole, renewed before they expire."""

    RETRY_FIRST = 5.0
    RETRY_MAX = 300.0

    def __init__(self, config: CredentialsConfig, region: str) -> None:
        super().__init__(config, region)
        self._base = self.session  # the long-term keys
        # The session S3 clients are made from holds the short-lived keys from the
        # start (empty and expired until the first renewal), so no client can fall
        # back to the standard chain by accident.
        self._keys = _botocore.RenewableCredentials(
            access_key="",
            secret_key="",
            token="",
            expiry_time=datetime(1970, 1, 1, tzinfo=timezone.utc),
            refresh_using=self._fetch,
            method=f"cpg-daemon-{config.source}",
            # botocore's own on-demand refresh is the last resort, only in the final
            # moments; the renewal loop renews well before that.
            advisory_timeout=min(60.0, config.refresh_before / 2),
            mandatory_timeout=min(30.0, config.refresh_before / 4),
        )
        self.session = aioboto3.Session(region_name=region)
        _botocore.share_credentials(self.session, self._keys)
        self._expires_at: datetime | None = None
        self._state: CredentialState = "refreshing"
        self._last_error: str | None = None
        self._renewals = 0
        self._client: Any = None
        self._lock = anyio.Lock()
        self._attempted = anyio.Event()
        self._unusable_since: float | None = None

    # -- what others ask -------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self._expires_at is not None and self._seconds_left() > 0

    @property
    def expires_at(self) -> datetime | None:
        return self._expires_at

    def statistics(self) -> CredentialStatistics:
        state = self._state
        if state == "valid" and not self.usable:
            state = "expired"
        return CredentialStatistics(
            target=self.config.target or self.config.role_arn,
            source=self.config.source,
            state=state,
            expires_at=_iso(self._expires_at),
            last_error=self._last_error,
            renewals=self._renewals,
        )

    def _seconds_left(self) -> float:
        if self._expires_at is None:
            return 0.0
        return (self._expires_at - datetime.now(timezone.utc)).total_seconds()

    # -- renewing --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Obtain keys, then renew them ahead of expiry until cancelled."""
        async with AsyncExitStack() as stack:
            self._client = await stack.enter_async_context(self._control_client())
            task_status.started()
            while True:
                renewed = await self.renew_now()
                await anyio.sleep(self._next_attempt_in(renewed))

    def _next_attempt_in(self, renewed: bool) -> float:
        """Seconds until the loop tries again."""
        left = self._seconds_left()
        if renewed:
            # refresh_before ahead of the returned expiry, with jitter; but never in the
            # first half of the keys' life (a server may grant less than refresh_before).
            wait = left - self.config.refresh_before
            wait -= random.uniform(0, min(60.0, self.config.refresh_before * 0.1))
            return max(wait, left / 2, 0.5)
        if self.usable:  # retry while the keys last, well before they end
            return max(left / 4, 1.0)
        # No usable keys: back off with the length of the outage (5 s, ... 5 min).
        outage = time.monotonic() - (self._unusable_since or time.monotonic())
        return min(max(outage / 2, self.RETRY_FIRST), self.RETRY_MAX)

    async def renew_now(self) -> bool:
        seen = self._renewals
        async with self._lock:
            if self._renewals != seen:
                return self.usable  # renewed while we waited: one renewal serves them all
            if self._client is None:  # used outside run(), e.g. by `check`
                async with self._control_client() as client:
                    self._client = client
                    try:
                        return await self._renew()
                    finally:
                        self._client = None
            return await self._renew()

    async def first_attempt(self) -> bool:
        await self._attempted.wait()
        return self.usable

    async def _renew(self) -> bool:
        try:
            return await self._renew_once()
        finally:
            self._attempted.set()

    async def _renew_once(self) -> bool:
        was_usable = self.usable
        if self._state != "valid" or not was_usable:
            self._state = "refreshing"
        try:
            await self._keys.renew()
        except CredentialsError as exc:
            self._last_error = str(exc)
            self._state = "valid" if self.usable else "error"
            if not self.usable and self._unusable_since is None:
                self._unusable_since = time.monotonic()
            log.warning(
                "credentials_renewal_failed",
                target=self.statistics().target,
                error=str(exc),
                keys_valid_for_s=round(max(self._seconds_left(), 0.0)),
            )
            return False
        self._last_error = None
        self._state = "valid"
        self._renewals += 1
        self._unusable_since = None
        log.info(
            "credentials_renewed",
            target=self.statistics().target,
            expires_at=_iso(self._expires_at),
            valid_for_s=round(self._seconds_left()),
        )
        if not was_usable:
            self._notify()
        return True

    @asynccontextmanager
    async def _control_client(self) -> AsyncIterator[Any]:
        """An S3 Control or STS client on the long-term keys (built off the event loop).

        botocore puts the account id in front of the S3 Control host
        (``309624411020.s3-control...``), also for a custom endpoint such as a
        private deployment or a local test server, where that name does not
        resolve; with a custom endpoint, the request's host is put back.
        """
        service = "s3control" if self.config.source == "access-grants" else "sts"
        async with _botocore.client(
            self._base,
            service,
            region_name=self.region,
            endpoint_url=self.config.endpoint_url or None,
            config=AioConfig(
                retries={"mode": "standard", "total_max_attempts": 3},
                connect_timeout=10,
                read_timeout=30,
            ),
        ) as client:
            if self.config.endpoint_url:
                keep_host = partial(_keep_host, urlsplit(self.config.endpoint_url).netloc)
                client.meta.events.register("before-send.s3-control", keep_host)
            yield client

    async def _fetch(self) -> dict[str, str]:
        """New keys, as botocore's refresh metadata. Raises CredentialsError, one sentence."""
        if self._client is None:
            raise CredentialsError("the credentials provider is not running")
        try:
            if self.config.source == "access-grants":
                reply = await self._client.get_data_access(
                    AccountId=self.config.account_id,
                    Target=self.config.target,
                    Permission=self.config.permission,
                    DurationSeconds=int(self.config.duration),
                )
            else:
                reply = await self._client.assume_role(
                    RoleArn=self.config.role_arn,
                    RoleSessionName=f"cpg-daemon-{socket.gethostname()}"[:64],
                    DurationSeconds=int(self.config.duration),
                )
        except (ClientError, BotoCoreError) as exc:
            raise CredentialsError(self._explain(exc)) from None
        keys = reply["Credentials"]
        expiration = keys["Expiration"]
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=timezone.utc)
        self._expires_at = expiration
        return {
            "access_key": keys["AccessKeyId"],
            "secret_key": keys["SecretAccessKey"],
            "token": keys["SessionToken"],
            "expiry_time": expiration.isoformat(),
        }

    def _explain(self, exc: ClientError | BotoCoreError) -> str:
        """One sentence a person can act on, for the errors people actually hit."""
        what = "S3 Access Grants" if self.config.source == "access-grants" else "STS AssumeRole"
        keys = f"profile {self.config.profile!r}" if self.config.profile else "the environment"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return (
                f"{what}: no long-term keys found ({keys}, or {CREDENTIALS_FILE_NAME} in "
                "$CREDENTIALS_DIRECTORY)"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return (
                f"{what}: cannot reach the endpoint, or it did not answer ({exc}); check the "
                "network and any proxy"
            )
        if not isinstance(exc, ClientError):
            return f"{what}: {exc}"
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", ""))
        wrong_region = re.search(r"arn:aws[\w-]*:s3:([a-z0-9-]+):", message)
        if code == "AccessDenied" and wrong_region and wrong_region.group(1) != "us-east-1":
            return (
                f"{what}: the request went to region {wrong_region.group(1)}, but the "
                'grants are in us-east-1: set [s3] region = "us-east-1"'
            )
        if code == "AccessDenied" and "no matching grant" in message.lower():
            return (
                f"{what}: no grant matches target {self.config.target}; use exactly the "
                "prefix you were granted, ending in /*"
            )
        if code in (
            "InvalidAccessKeyId",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
            "UnrecognizedClientException",
            "ExpiredToken",
        ):
            return f"{what}: the long-term keys ({keys}) were refused ({code}); check them"
        if code == "RequestTimeTooSkewed":
            return f"{what}: this machine's clock is wrong (RequestTimeTooSkewed); enable NTP"
        if code == "AccessDenied":
            return f"{what}: access denied: {message}"
        return f"{what}: {code}: {message}"


def _keep_host(host: str, request: Any, **_: Any) -> None:
    """Send an S3 Control request to ``host`` (the custom endpoint's), not the prefixed one."""
    request.url = urlunsplit(urlsplit(request.url)._replace(netloc=host))
    request.headers["Host"] = host


def make_provider(entry: CredentialsConfig, region: str) -> CredentialProvider:
    if entry.source in ("access-grants", "assume-role"):
        return RenewingProvider(entry, region)
    return CredentialProvider(entry, region)


def build_providers(
    config: Config, running: Sequence[CredentialProvider] = ()
) -> list[CredentialProvider]:
    """One provider per ``[credentials]`` entry; a missing profile is a ConfigError.

    On a reload, ``running`` are the providers in use: an entry that did not
    change keeps its provider, and with it its keys and renewal schedule.
    """
    providers = []
    for index, entry in enumerate(config.credentials):
        same = [p for p in running if p.config == entry and p.region == config.s3.region]
        if same:
            providers.append(same[0])
            continue
        try:
            providers.append(make_provider(entry, config.s3.region))
        except ProfileMissingError as exc:
            where = "credentials" if len(config.credentials) == 1 else f"credentials[{index}]"
            raise ConfigError(
                str(config.path or "<config>"), f"{where}.profile", str(exc)
            ) from None
    return providers


def provider_for(
    providers: list[CredentialProvider], destination: S3Location, file: str, key: str
) -> CredentialProvider:
    """The provider whose target covers ``destination`` (the most specific one)."""
    covering = [p for p in providers if p.covers(destination)]
    if not covering:
        targets = ", ".join(p.config.target for p in providers)
        raise ConfigError(
            file, key, f"no [credentials] target covers {destination} (targets: {targets})"
        )
    return max(covering, key=lambda p: len(p.config.target))
