"""S3's error replies, turned into cpg-daemon's error classes.

One table for both data planes: botocore's exceptions (``translate_errors``)
and the CRT's replies (``crt._failure``) give a code, an HTTP status and a message,
and ``classify`` says what the daemon does about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cpg_daemon.core.errors import (
    CpgError,
    CredentialsError,
    RetryableError,
    SkipFileError,
    ThrottledError,
    UploadGoneError,
)

_CREDENTIAL_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
}
_PER_FILE_CODES = {
    "AccessDenied": "access denied: the credentials may not write this key",
    "AllAccessDisabled": "access to the bucket is disabled",
    "NoSuchBucket": "the bucket does not exist",
    "KeyTooLongError": "the object key is too long for S3",
    "InvalidArgument": "S3 refused an argument",
    "InvalidRequest": "S3 refused the request",
    "EntityTooLarge": "the object is too large for one request",
    "InvalidBucketName": "the bucket name is not valid",
    "AccessControlListNotSupported": 'the bucket does not take ACLs; set s3.acl = ""',
}


_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
}
"""Replies asking for fewer requests (botocore's standard retry mode's list, for S3)."""

_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IncorrectEndpoint"}
"""Replies to a request sent to another region than the bucket's."""


def classify(what: str, code: str, status: int, message: str) -> CpgError:
    """The error class for an S3 error reply (its code, HTTP status and message)."""
    text = f"{what}: {code or status}: {message or code}"
    if code == "NoSuchUpload":
        return UploadGoneError(text)
    if code in _CREDENTIAL_CODES:
        return CredentialsError(text)
    if code in _THROTTLE_CODES or status == 429:
        return ThrottledError(text)
    if code == "RequestTimeTooSkewed":  # retried: NTP may put the clock right meanwhile
        return RetryableError(
            f"{what}: this machine's clock differs from S3's by more than 15 minutes "
            "(RequestTimeTooSkewed); enable NTP (timedatectl set-ntp true)"
        )
    if code in _PER_FILE_CODES:
        return SkipFileError(f"{what}: {_PER_FILE_CODES[code]} ({code})")
    if code in _REGION_CODES:
        return SkipFileError(f"{what}: the bucket is not in s3.region's region ({code})")
    if code == "403" or status == 403:
        return SkipFileError(f"{what}: access denied (HTTP 403)")
    return RetryableError(text)


def error_code(error: ClientError) -> str:
    """The S3 error code of a botocore error reply ("NoSuchKey", "404", ...)."""
    return str(error.response.get("Error", {}).get("Code", ""))


def _message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", ""))


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn botocore exceptions into cpg-daemon error classes."""
    try:
        yield
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        raise classify(what, error_code(exc), status, _message(exc)) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise CredentialsError(f"{what}: {exc}") from None
    except EndpointConnectionError as exc:
        raise RetryableError(f"{what}: cannot reach the S3 endpoint: {exc}") from None
    except (BotoConnectionError, HTTPClientError) as exc:
        raise RetryableError(f"{what}: the connection to the S3 endpoint failed: {exc}") from None
    except BotoCoreError as exc:
        raise RetryableError(f"{what}: {exc}") from None
    except OSError as exc:
        raise RetryableError(f"{what}: network error: {exc}") from None
