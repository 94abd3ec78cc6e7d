"""The only module that touches private botocore, aiobotocore and aioboto3 internals.

Each access to something the libraries do not document (an underscore attribute, an
internal component, an internal method) is one small function here, with the reason
we need it. tests/test_botocore_internals.py exercises every one of them against the
installed versions, so an upgrade that moves one fails there, loudly, instead of
somewhere in an upload. Supported: the versions ``aioboto3>=13.0,<16`` pins in
pyproject.toml (tested with aioboto3 15.5, aiobotocore 2.25, botocore 1.40).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import aioboto3
import anyio.to_thread
from aiobotocore.credentials import AioRefreshableCredentials
from botocore.exceptions import DataNotFoundError

from cpg_daemon.core.errors import CredentialsError

_building = threading.Lock()
"""botocore sessions are not thread-safe: one thread at a time loads models or builds a client."""


def _core(session: aioboto3.Session) -> Any:
    """The aiobotocore session inside an aioboto3 one (aioboto3 offers no public accessor)."""
    return session._session


_loaders: dict[Any, Any] = {}
"""One botocore model loader per data path, shared by every session of the process."""


def _data_loader(session: aioboto3.Session) -> Any:
    """botocore's loader of model files: an internal component of the session, replaced
    by the process's shared one for the same data path.

    Each session makes a loader of its own, which parses S3's model files again (about
    80 ms of CPU): a daemon makes a session per set of keys and per renewal, a one-shot
    command several. The loader only reads files and caches what it parsed; the parsed
    models are never changed, so sessions can share them.
    """
    core = _core(session)
    path = core.get_config_variable("data_path")
    with _building:
        shared = _loaders.get(path)
        if shared is None:
            shared = _loaders[path] = core.get_component("data_loader")
        else:
            core.register_component("data_loader", shared)
    return shared


def preload_models(session: aioboto3.Session, service: str) -> None:
    """Read botocore's model files for a service into the session's loader cache. Blocking.

    Creating a client reads and parses several JSON files (S3's: about 80 ms, far more
    on a busy machine); called in a worker thread first, the client built next finds
    them in memory instead of parsing them on the event loop.
    """
    loader = _data_loader(session)
    with _building:
        loader.load_service_model(service, "service-2")
        for kind in ("endpoint-rule-set-1", "paginators-1"):
            with contextlib.suppress(DataNotFoundError):  # not every service has them
                loader.load_service_model(service, kind)
        for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
            loader.load_data(name)


def s3_endpoint_ruleset(session: aioboto3.Session) -> Mapping[str, Any]:
    """S3's endpoint rule set, as botocore evaluates it for every request. Blocking."""
    ruleset: Mapping[str, Any] = _data_loader(session).load_service_model(
        "s3", "endpoint-rule-set-1"
    )
    return ruleset


def ca_bundle(session: aioboto3.Session) -> str | None:
    """The CA bundle botocore verifies TLS with (AWS_CA_BUNDLE, ca_bundle in a profile)."""
    value = _core(session).get_config_variable("ca_bundle")
    return str(value) if value else None


class _NeedsTheLoop(Exception):
    """Building the client wanted to wait for I/O, which needs the event loop."""


def _finish_without_a_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that does no I/O to its end in this thread, without an event loop.

    aiobotocore's client factory is a coroutine, but once the session's credentials are
    resolved it never waits for anything: it only computes (the client class, the
    endpoint rule set's objects, the event handlers: about 20 ms of CPU per client).
    Should a future version wait for I/O, or look for the running loop, after all, it
    is abandoned here and built on the loop as before (where a real error shows again).
    """
    with _building:
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        except RuntimeError:  # "no running event loop"
            raise _NeedsTheLoop from None
        coroutine.close()
    raise _NeedsTheLoop


@asynccontextmanager
async def client(session: aioboto3.Session, service: str, **options: Any) -> AsyncIterator[Any]:
    """An aiobotocore client, built in a worker thread; closed on exit.

    ``session.client(service, **options)`` does all its work on the event loop (with
    its model files: 80-200 ms of CPU for STS or S3 Control). Here the model files are
    read in a worker thread, the credentials are resolved on the loop (that may need
    I/O: SSO, IMDS), and the rest, pure computation, runs in a worker thread through
    the factory coroutine inside aioboto3's client context (a private attribute). The
    HTTP connection pool is created on the loop when the client is entered, as aiohttp
    requires.
    """
    await anyio.to_thread.run_sync(preload_models, session, service)
    built: Any = None
    if await session.get_credentials() is not None:
        factory = session.client(service, **options)._coro
        try:
            built = await anyio.to_thread.run_sync(_finish_without_a_loop, factory)
        except _NeedsTheLoop:
            built = None
        except BaseException:
            factory.close()  # cancelled before the thread ran it: never awaited, no warning
            raise
    if built is None:  # no credentials (the client raises on its first request) or I/O
        async with session.client(service, **options) as entered:
            yield entered
        return
    entered = await built.__aenter__()
    try:
        yield entered
    except BaseException as exc:
        await built.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    else:
        await built.__aexit__(None, None, None)


def leave_out_endpoint_parameters(client: Any, names: tuple[str, ...]) -> None:
    """Make the client's endpoint resolver ignore rule-set parameters (see store).

    The parameter definitions are an attribute of botocore's private
    ``EndpointRulesetResolver``; nothing to do if that ever changes.
    """
    definitions = getattr(getattr(client, "_ruleset_resolver", None), "_param_definitions", None)
    if isinstance(definitions, dict):
        for name in names:
            definitions.pop(name, None)


def endpoint_cache_info(client: Any) -> Any:
    """The LRU cache statistics of the client's endpoint rule-set evaluations (for tests)."""
    return client._ruleset_resolver._provider.resolve_endpoint.cache_info()


async def bucket_endpoint(client: Any, bucket: str) -> tuple[str, Mapping[str, Any]]:
    """(URL, properties) of the endpoint botocore would send a PutObject to the bucket to.

    The CRT data plane signs and sends requests itself but must go where botocore would
    (regional endpoints, FIPS, dual-stack, a custom endpoint): the client's private
    rule-set evaluation gives exactly that, including the signing region in the
    properties' ``authSchemes``.
    """
    operation = client.meta.service_model.operation_model("PutObject")
    url, _, properties = await client._resolve_endpoint_ruleset(operation, {"Bucket": bucket}, {})
    return str(url), properties or {}


def signing_credentials(client: Any) -> Any | None:
    """The credentials object the client signs with (None when it found none).

    For the CRT data plane, which signs with the keys botocore's client uses now,
    refreshable ones included; the request signer keeps them in a private attribute.
    """
    return getattr(getattr(client, "_request_signer", None), "_credentials", None)


def share_credentials(session: aioboto3.Session, credentials: Any) -> None:
    """Make every client created from ``session`` sign with this credentials object.

    botocore has no public way to give a session a credentials object (only static
    keys); set this way, renewed keys reach every client of the session at once.
    """
    _core(session)._credentials = credentials


def credentials_expiry(credentials: Any) -> datetime | None:
    """When keys from botocore's chain expire (refreshable ones: a process, SSO, a
    role, AWS_CREDENTIAL_EXPIRATION), or None for static keys. The expiry is a private
    attribute of botocore's RefreshableCredentials."""
    expiry = getattr(credentials, "_expiry_time", None)
    if not isinstance(expiry, datetime):
        return None
    return expiry if expiry.tzinfo is not None else expiry.replace(tzinfo=timezone.utc)


class RenewableCredentials(AioRefreshableCredentials):  # type: ignore[misc]
    """botocore's refreshable credentials, with a way to renew them on purpose."""

    async def renew(self) -> None:
        """Fetch new keys now, whatever the expiry (under botocore's own refresh lock)."""
        async with self._refresh_lock:
            try:
                await self._protected_refresh(is_mandatory=True)
            except RuntimeError as exc:  # botocore: "refreshed credentials are still expired"
                raise CredentialsError(str(exc)) from None
