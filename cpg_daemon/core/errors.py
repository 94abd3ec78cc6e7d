"""Errors named for how they are handled.

Every failure the daemon meets is turned into one of these classes at the edge
where it happens (the store adapter, the file reader, the config loader), so the
code that decides what to do next only asks which kind it is.
"""

from __future__ import annotations


class CpgError(Exception):
    """Base class of every error cpg-daemon raises on purpose."""


class ConfigError(CpgError):
    """The configuration is invalid: fatal at start-up, exit status 2.

    The message always names the file, the key and the problem, so a person can
    fix it without reading code.
    """

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class RetryableError(CpgError):
    """A transient failure (network, throttling, 5xx): try the file again later, with backoff."""


class ThrottledError(RetryableError):
    """S3 asked for fewer requests (SlowDown): the whole daemon backs off; not the file's fault."""


class FileChangedError(RetryableError):
    """The file changed on disk while it was being read or uploaded: restart it once it settles."""


class UploadGoneError(RetryableError):
    """The server no longer knows a multipart upload id: start that file's upload again."""


class CredentialsError(RetryableError):
    """The server refused our keys (expired, unknown, bad signature): renew them, then retry."""


class SkipFileError(CpgError):
    """This file cannot be uploaded as it is (unreadable, bad name, denied): mark it failed.

    Other files carry on; `cpg-daemon retry` queues it again once a person fixed it.
    """


class VanishedError(CpgError):
    """The file disappeared before it was uploaded: forget it, it is not a failure."""


class FatalError(CpgError):
    """The daemon cannot go on (journal unusable, bucket missing): stop with a clear message."""
