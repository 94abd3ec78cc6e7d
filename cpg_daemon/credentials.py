"""Where the S3 client's keys come from: one provider per ``[credentials]`` table.

Every provider hands out an aioboto3 Session whose credentials object refreshes
itself (botocore's refreshable-credentials machinery), so S3 clients built from
it never have to be rebuilt when keys are renewed.

Sources implemented: ``environment`` (botocore's standard chain: environment
variables, shared files, SSO, ``credential_process``, instance roles) and
``profile`` (the same chain, for one named profile). ``access-grants`` and
``assume-role`` are recognised in the configuration but not built yet; asking
for them fails at start-up with a clear message rather than at the first upload.
"""

from __future__ import annotations

from dataclasses import dataclass

import aioboto3

from cpg_daemon.config import Config, CredentialsConfig
from cpg_daemon.errors import ConfigError
from cpg_daemon.keys import S3Location


@dataclass(frozen=True)
class CredentialStatistics:
    target: str
    source: str
    state: str
    expires_at: str | None
    last_error: str | None


class CredentialProvider:
    """Keys for one ``[credentials]`` entry, as an aioboto3 Session."""

    def __init__(self, config: CredentialsConfig, region: str) -> None:
        self.config = config
        self._region = region
        self._session = aioboto3.Session(
            profile_name=config.profile if config.source == "profile" else None,
            region_name=region,
        )

    @property
    def session(self) -> aioboto3.Session:
        return self._session

    def covers(self, destination: S3Location) -> bool:
        """Whether this entry's grant target covers a destination (no target covers all)."""
        return target_covers(self.config.target, destination)

    def statistics(self) -> CredentialStatistics:
        return CredentialStatistics(
            target=self.config.target or f"({self.config.source})",
            source=self.config.source,
            state="valid",
            expires_at=None,
            last_error=None,
        )


def target_covers(target: str, destination: S3Location) -> bool:
    """Whether an Access Grants style target (``s3://bucket/prefix/*``) covers a destination."""
    if not target:
        return True
    base = target[:-1] if target.endswith("*") else target
    return str(destination).startswith(base)


def build_providers(config: Config) -> list[CredentialProvider]:
    """One provider per ``[credentials]`` entry; fails early for sources not built yet."""
    file = str(config.path) if config.path else "<config>"
    providers = []
    for index, entry in enumerate(config.credentials):
        if entry.source in ("access-grants", "assume-role"):
            key = (
                "credentials.source"
                if len(config.credentials) == 1
                else (f"credentials[{index}].source")
            )
            raise ConfigError(
                file,
                key,
                f"source {entry.source!r} is not available in this version of cpg-daemon yet; "
                'use "profile" or "environment" with keys that can write to the destination',
            )
        providers.append(CredentialProvider(entry, config.s3.region))
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
