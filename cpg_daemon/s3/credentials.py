"""Where the S3 client's keys come from: one provider per ``[credentials]`` table.

Every provider keeps its keys in one botocore refreshable-credentials object shared
by every S3 client of its session, so new keys reach every client at once and
nothing is rebuilt. The providers differ in where keys come from:

- ``environment`` and ``profile`` (``CredentialProvider``): botocore's standard
  chain, read again when the AWS files change (a person pasted new keys) or S3
  refuses the keys; what the chain can refresh itself (``credential_process``,
  SSO, a role) is renewed ahead of its expiry.
- ``access-grants`` and ``assume-role`` (``RenewingProvider``): long-term keys (the
  profile, the environment, or a file systemd passes with ``LoadCredential=``)
  traded for short-lived keys (S3 Control GetDataAccess or STS AssumeRole),
  renewed ``refresh_before`` ahead of the *returned* expiry (with jitter);
  failures are retried with backoff while the keys last.
- ``handed-over`` (``HandedOverProvider``): keys obtained elsewhere and given to
  the running daemon (``cpg-daemon credentials set``), kept in the state folder.

While a provider has no usable keys (none yet, expired, refused by S3 and not
replaced) its watches are paused (the scheduler asks ``usable``), so no file fails
for lack of keys; they resume by themselves once keys arrive. Keys nothing renews
are warned about ``warn_before`` ahead of their expiry.

Keys never reach logs, status or errors: only their expiry does.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import json
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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
from cpg_daemon.core.units import duration
from cpg_daemon.s3 import _botocore

log = structlog.get_logger(__name__)

CredentialState = Literal["valid", "refreshing", "expired", "refused", "waiting", "error"]
"""``refused``: S3 refused the keys and no others were found; ``waiting``: handed-over
keys were never given (or have expired and were dropped)."""
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
    warning: str | None = None
    """Set from ``warn_before`` ahead of an expiry nothing will renew: what to do."""


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


@dataclass(frozen=True)
class Keys:
    """One set of keys and, when known, when they expire. Never logged or shown."""

    access_key: str
    secret_key: str
    token: str
    expires_at: datetime | None

    def __repr__(self) -> str:  # a traceback or a debugger never shows the secret
        return f"Keys(expires_at={self.expires_at!r})"


class KeysExpiredError(CredentialsError):
    """The only keys there are have expired (nothing renews them)."""


FAR_FUTURE = timedelta(days=3650)
"""The expiry botocore is told for keys whose expiry is not known (static keys)."""
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CredentialProvider:
    """Keys for one ``[credentials]`` entry, handed out as an aioboto3 Session.

    The keys live in one refreshable credentials object that every S3 client of the
    session signs with, so new keys (renewed, re-read from the AWS files, handed
    over) reach every client at once and nothing is rebuilt. Subclasses say where
    keys come from (``_fetch``) and whether the daemon renews them itself.

    This base class serves ``environment`` and ``profile``: botocore's standard
    chain, read again when the AWS files change (every ``LOOK_EVERY`` s, a stat
    each) or when S3 refuses the keys. Keys the chain refreshes by itself
    (``credential_process``, SSO, a role in the profile) are renewed ahead of their
    expiry. Keys S3 refuses, and that no new read replaces, stop this entry's
    watches (``refuse``): files wait, none fails, until other keys arrive.
    """

    LOOK_EVERY = 5.0
    """Seconds between looks at the expiry and the AWS files."""
    ADVISORY = 15 * 60.0
    """Seconds before a known expiry that keys the chain can refresh are renewed."""

    def __init__(self, config: CredentialsConfig, region: str) -> None:
        self.config = config
        self.region = region
        self._mandatory = min(30.0, self._advisory_timeout() / 2)
        """Seconds before their expiry botocore stops using keys."""
        self._keys = _botocore.RenewableCredentials(
            access_key="",
            secret_key="",
            token="",
            expiry_time=EPOCH,  # fetched at the first request, or by run()
            refresh_using=self._refresh,
            method=f"cpg-daemon-{config.source}",
            advisory_timeout=self._advisory_timeout(),
            mandatory_timeout=self._mandatory,
        )
        self.session = aioboto3.Session(region_name=region)
        _botocore.share_credentials(self.session, self._keys)
        self._listeners: list[Callable[[], None]] = []
        self._lock = anyio.Lock()
        self._attempted = anyio.Event()
        self._in_use: Keys | None = None
        self._expires_at: datetime | None = None
        self._state: CredentialState = "refreshing"
        self._last_error: str | None = None
        self._refused: str | None = None
        """Why S3 refused the keys in use (None: it did not)."""
        self._renewals = 0
        self._renews_itself = False
        self._warned = False
        self._files: tuple[tuple[str, int, int], ...] = ()
        self._check_profile()

    def _advisory_timeout(self) -> float:
        return self.ADVISORY

    # -- what others ask -------------------------------------------------------------

    @property
    def renews_itself(self) -> bool:
        """Whether fresh keys come without a person (Access Grants, a role, SSO...)."""
        return self._renews_itself

    @property
    def usable(self) -> bool:
        """Whether uploads may use this provider's keys now."""
        if self._refused is not None or self._state == "error":
            return False
        return self._expires_at is None or self._seconds_left() > 0

    @property
    def expires_at(self) -> datetime | None:
        return self._expires_at

    def covers(self, destination: S3Location) -> bool:
        """Whether this entry's target covers a destination (no target covers all)."""
        return target_covers(self.config.target, destination)

    def on_usable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the keys become usable again."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    def describe(self) -> str:
        """The entry as status names it: its target, else what the keys come from."""
        return self.config.target or f"({self.config.source})"

    def statistics(self) -> CredentialStatistics:
        state = self._state
        if self._refused is not None:
            state = "refused"
        elif state == "valid" and not self.usable:
            state = "expired"
        return CredentialStatistics(
            target=self.describe(),
            source=self.config.source,
            state=state,
            expires_at=_iso(self._expires_at),
            last_error=self._refused or self._last_error,
            renewals=self._renewals,
            warning=self._warning(),
        )

    def _seconds_left(self) -> float:
        if self._expires_at is None:
            return float("inf")
        return (self._expires_at - datetime.now(timezone.utc)).total_seconds()

    def _warning(self) -> str | None:
        """Keys that expire within ``warn_before`` with nothing to renew them, or None."""
        left = self._seconds_left()
        if self._expires_at is None or left > self.config.warn_before or left <= 0:
            return None
        if self.renews_itself and self._last_error is None:
            return None
        at = self._expires_at.strftime("%Y-%m-%d %H:%M UTC")
        why = (
            f"renewing them fails ({self._last_error})"
            if self.renews_itself
            else "the daemon cannot renew them"
        )
        return f"the keys expire at {at} (in {duration(left)}) and {why}: {self.fix()}"

    def fix(self) -> str:
        """What a person does to give this entry new keys."""
        if self.config.source == "profile":
            return (
                f"put new keys in profile {self.config.profile!r} (~/.aws/credentials of the "
                f"daemon's user): they are read within {self.LOOK_EVERY:.0f} s"
            )
        return (
            "restart the daemon with new keys in its environment (or in ~/.aws/credentials "
            'of its user, read within 5 s), or use source = "handed-over" and hand keys '
            "over with cpg-daemon credentials set"
        )

    # -- keys ------------------------------------------------------------------------

    async def _fetch(self) -> Keys:
        """The current keys from botocore's standard chain (the files read again)."""
        self._files = await anyio.to_thread.run_sync(_aws_files_signature)
        try:
            session = await anyio.to_thread.run_sync(self._long_term_session)
        except ProfileMissingError as exc:
            raise CredentialsError(str(exc)) from None
        try:
            found = await session.get_credentials()
            if found is None:
                raise CredentialsError(self._no_keys())
            frozen = await found.get_frozen_credentials()
        except (BotoCoreError, ClientError) as exc:
            raise CredentialsError(f"cannot get keys: {exc}") from None
        expiry = _botocore.credentials_expiry(found)
        self._renews_itself = expiry is not None and found.method != "env"
        return Keys(frozen.access_key, frozen.secret_key, frozen.token or "", expiry)

    def _no_keys(self) -> str:
        where = f"profile {self.config.profile!r}" if self.config.profile else "the environment"
        return (
            f"no AWS keys found ({where}, ~/.aws/credentials, or {CREDENTIALS_FILE_NAME} in "
            "$CREDENTIALS_DIRECTORY)"
        )

    def _check_profile(self) -> None:
        """A missing profile is a configuration error, found before anything starts."""
        if self.config.source == "profile":
            self._long_term_session()

    def _long_term_session(self) -> aioboto3.Session:
        """A session on botocore's standard chain (reads the AWS files: blocking)."""
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

    async def _refresh(self) -> dict[str, str]:
        """botocore's refresh callback: new keys, as its metadata.

        Keys already at their end are an error here (a CredentialsError, which the
        scheduler handles by waiting), not botocore's RuntimeError after the fact.
        """
        keys = await self._fetch()
        if keys.expires_at is not None:
            left = (keys.expires_at - datetime.now(timezone.utc)).total_seconds()
            if left <= self._mandatory:
                at = keys.expires_at.strftime("%Y-%m-%d %H:%M:%S UTC")
                raise KeysExpiredError(f"the keys expired at {at}: {self.fix()}")
        self._in_use = keys
        self._expires_at = keys.expires_at
        expiry = keys.expires_at or datetime.now(timezone.utc) + FAR_FUTURE
        return {
            "access_key": keys.access_key,
            "secret_key": keys.secret_key,
            "token": keys.token,
            "expiry_time": expiry.isoformat(),
        }

    def refuse(self, reason: str) -> None:
        """S3 refused the keys in use and no other keys were found: stop the watches.

        They start again by themselves once other keys arrive (``renew_now`` finds
        keys that differ from these).
        """
        if self._refused is None:
            log.warning(
                "credentials_waiting",
                target=self.describe(),
                error=reason,
                hint=f"files wait (none fails) until new keys arrive: {self.fix()}",
            )
        self._refused = reason

    async def renew_now(self) -> bool:
        """Read the keys again; whether they are new keys that may be used."""
        seen = self._renewals
        async with self._lock:
            if self._renewals != seen:
                return self.usable  # renewed while we waited: one renewal serves them all
            return await self._renew()

    async def first_attempt(self) -> bool:
        """Wait for the running provider's first attempt at keys; whether they are usable."""
        await self._attempted.wait()
        return self.usable

    async def _renew(self) -> bool:
        try:
            return await self._renew_once()
        finally:
            self._attempted.set()

    async def _renew_once(self) -> bool:
        was_usable = self.usable
        before = self._in_use
        if self._state != "valid" or not was_usable:
            self._state = "refreshing"
        try:
            await self._keys.renew()
        except CredentialsError as exc:
            self._renew_failed(str(exc), isinstance(exc, KeysExpiredError))
            return False
        same = before is not None and self._in_use is not None and (
            before.access_key == self._in_use.access_key and before.token == self._in_use.token
        )
        self._last_error = None
        self._state = "valid"
        if same and not self.renews_itself:
            return False  # the very keys in use (refused, perhaps): nothing new
        self._refused = None
        self._warned = False
        self._renewals += 1
        log.info(
            "credentials_renewed",
            target=self.describe(),
            expires_at=_iso(self._expires_at),
            valid_for_s=None if self._expires_at is None else round(self._seconds_left()),
        )
        if not was_usable and self.usable:
            self._notify()
        return True

    def _renew_failed(self, error: str, expired: bool = False) -> None:
        again = error == self._last_error and not self.renews_itself
        self._last_error = error
        if expired:
            self._state = "expired"
        else:
            self._state = "valid" if self.usable and self._in_use is not None else "error"
        if again:
            return  # the chain is read again every few seconds: say it once
        log.warning(
            "credentials_renewal_failed",
            target=self.describe(),
            error=error,
            keys_valid_for_s=None
            if self._expires_at is None
            else round(max(self._seconds_left(), 0.0)),
        )

    def look(self) -> None:
        """Warn once when the keys are about to expire with nothing to renew them."""
        warning = self._warning()
        if warning is not None and not self._warned:
            self._warned = True
            log.warning("credentials_expiring", target=self.describe(), hint=warning)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the keys current until cancelled: the first keys at once (so their
        expiry shows), then again when the AWS files change, when keys the chain can
        refresh near their end, and after a failure."""
        task_status.started()
        await self.renew_now()
        while True:
            await anyio.sleep(self.LOOK_EVERY)
            self.look()
            changed = await anyio.to_thread.run_sync(_aws_files_signature) != self._files
            ending = self.renews_itself and self._seconds_left() < self.ADVISORY
            if changed or ending or (self._state == "error"):
                await self.renew_now()


def _aws_files_signature() -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of each AWS file botocore reads keys from, to notice a change."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    paths = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    ]
    if directory:
        paths.append(str(Path(directory) / CREDENTIALS_FILE_NAME))
    seen = []
    for path in paths:
        try:
            info = os.stat(os.path.expanduser(path))
        except OSError:
            continue
        seen.append((path, info.st_mtime_ns, info.st_size))
    return tuple(seen)


class HandedOverProvider(CredentialProvider):
    """Keys a person obtained elsewhere (a laptop) and handed to the daemon.

    They arrive with ``cpg-daemon credentials set`` (``hand_over``), are kept in
    the state folder (``HandedOverKeys``, mode 0600) until they expire, so a restart
    keeps them, and cannot be renewed by the daemon: before they expire it warns,
    and once they expire (or S3 refuses them) the watches wait for new ones. A
    daemon may start with none: it runs, queues, and says it waits for keys.
    """

    def __init__(self, config: CredentialsConfig, region: str, store: HandedOverKeys) -> None:
        self._store = store
        self._handed = store.load(config.target)
        super().__init__(config, region)
        if self._handed is None:
            self._state = "waiting"

    @property
    def usable(self) -> bool:
        return self._handed is not None and super().usable

    def _advisory_timeout(self) -> float:
        return 2.0  # nothing renews these keys: use them to their end

    def fix(self) -> str:
        return (
            "hand over new keys: cpg-daemon credentials set (README: \"Keys from a laptop\")"
        )

    def statistics(self) -> CredentialStatistics:
        stats = super().statistics()
        if self._handed is None:
            return dataclasses.replace(
                stats, state="waiting", last_error="no keys yet: " + self.fix()
            )
        return stats

    async def _fetch(self) -> Keys:
        if self._handed is None:
            raise CredentialsError("no keys were handed over yet: " + self.fix())
        return self._handed

    async def hand_over(self, keys: Keys) -> tuple[Keys | None, str | None]:
        """Use these keys from now on; returns what to ``restore`` if S3 refuses them."""
        before = (self._handed, self._refused)
        self._handed = keys
        await self.renew_now()
        return before

    async def restore(self, before: tuple[Keys | None, str | None]) -> None:
        """Go back to the keys in use before ``hand_over`` (S3 refused the new ones)."""
        self._handed, refused = before
        if self._handed is None:
            self._in_use = None
            self._expires_at = None
            self._state = "waiting"
        else:
            await self.renew_now()
        self._refused = refused

    async def keep(self) -> None:
        """Store the keys in use, for a restart."""
        if self._handed is not None:
            await anyio.to_thread.run_sync(self._store.save, self.config.target, self._handed)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._handed is not None:
            await self.renew_now()
        else:
            self._attempted.set()  # nothing to try: a one-shot command says so at once
        expired_said = False
        while True:
            self.look()
            if self._handed is not None and not self.usable and not expired_said:
                expired_said = True
                log.warning(
                    "credentials_expired",
                    target=self.describe(),
                    hint=f"files wait (none fails) until new keys arrive: {self.fix()}",
                )
            elif self.usable:
                expired_said = False
            await anyio.sleep(self.LOOK_EVERY)


class HandedOverKeys:
    """Handed-over keys in the state folder, by target: one JSON file, mode 0600.

    Written atomically (a new file renamed over the old); expired keys are dropped
    when the file is read. Only the daemon's user (and root) can read it, like
    ~/.aws/credentials.
    """

    NAME = "handed-over-keys.json"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.NAME

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("handed_over_keys_unreadable", path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, target: str) -> Keys | None:
        """The keys kept for this target, unless they have expired."""
        entry = self._read().get(target)
        if not isinstance(entry, dict):
            return None
        try:
            expiry = entry.get("expires_at")
            keys = Keys(
                entry["access_key"],
                entry["secret_key"],
                entry.get("token", ""),
                datetime.fromisoformat(expiry) if expiry else None,
            )
        except (KeyError, TypeError, ValueError):
            return None
        if keys.expires_at is not None and keys.expires_at <= datetime.now(timezone.utc):
            return None
        return keys

    def save(self, target: str, keys: Keys) -> None:
        data = self._read()
        data[target] = {
            "access_key": keys.access_key,
            "secret_key": keys.secret_key,
            "token": keys.token,
            "expires_at": _iso(keys.expires_at) or "",
        }
        now = datetime.now(timezone.utc)
        for name, entry in list(data.items()):
            expiry = entry.get("expires_at") if isinstance(entry, dict) else None
            with contextlib.suppress(TypeError, ValueError):
                if expiry and datetime.fromisoformat(expiry) <= now:
                    del data[name]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.NAME}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)


class RenewingProvider(CredentialProvider):
    """Short-lived keys from Access Grants or AssumeRole, renewed before they expire.

    A renewal loop renews them ``refresh_before`` ahead of the *returned* expiry
    (with jitter); failures are retried with backoff while the keys last.
    """

    RETRY_FIRST = 5.0
    RETRY_MAX = 300.0

    def __init__(self, config: CredentialsConfig, region: str) -> None:
        super().__init__(config, region)
        self._base = self._long_term_session()  # the long-term keys
        self._renews_itself = True
        self._client: Any = None
        self._unusable_since: float | None = None

    def _advisory_timeout(self) -> float:
        # botocore's own on-demand refresh is the last resort, only in the final
        # moments; the renewal loop renews well before that.
        return min(60.0, self.config.refresh_before / 2)

    def _check_profile(self) -> None:
        pass  # the long-term session, built in __init__, checks it

    @property
    def usable(self) -> bool:
        return self._expires_at is not None and self._seconds_left() > 0

    def describe(self) -> str:
        return self.config.target or self.config.role_arn

    def fix(self) -> str:
        return "see the last error; renewals are retried"

    def refuse(self, reason: str) -> None:
        pass  # the scheduler renews these keys at once instead

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
        left = self._seconds_left() if self._expires_at is not None else 0.0
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

    def _renew_failed(self, error: str, expired: bool = False) -> None:
        super()._renew_failed(error, expired)
        if not self.usable and self._unusable_since is None:
            self._unusable_since = time.monotonic()

    async def _renew_once(self) -> bool:
        renewed = await super()._renew_once()
        if renewed:
            self._unusable_since = None
        return renewed

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

    async def _fetch(self) -> Keys:
        """New keys from S3 Control or STS. Raises CredentialsError, one sentence."""
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
        return Keys(keys["AccessKeyId"], keys["SecretAccessKey"], keys["SessionToken"], expiration)

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
                'grants are in us-east-1: set [s3] region = "us-east-1" (cpg-daemon upload: '
                "--region us-east-1)"
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


def make_provider(
    entry: CredentialsConfig, region: str, state_dir: Path | None = None
) -> CredentialProvider:
    if entry.source in ("access-grants", "assume-role"):
        return RenewingProvider(entry, region)
    if entry.source == "handed-over":
        if state_dir is None:
            raise CredentialsError('source = "handed-over" needs the daemon\'s state folder')
        return HandedOverProvider(entry, region, HandedOverKeys(state_dir))
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
            providers.append(make_provider(entry, config.s3.region, config.daemon.state_dir))
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
