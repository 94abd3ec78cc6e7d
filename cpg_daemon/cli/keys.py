"""Keys as people carry them from a laptop: the forms ``cpg-daemon credentials set`` reads.

- what ``aws s3control get-data-access`` prints (JSON: ``Credentials`` with
  ``AccessKeyId``, ``SecretAccessKey``, ``SessionToken``, ``Expiration``, and the
  ``MatchedGrantTarget``);
- what ``aws configure export-credentials`` prints as ``--format process`` (flat JSON)
  or ``--format env`` (``export AWS_...=`` lines), and the ``AWS_*`` lines people
  paste from a shell, Windows' ``set`` or PowerShell's ``$Env:``;
- nothing: the command's own environment (``AWS_ACCESS_KEY_ID`` and the others).

Pure functions; nothing here prints or keeps a key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass


class KeysFormatError(ValueError):
    """The input holds no keys in a form this command reads (the message quotes no key)."""


@dataclass(frozen=True)
class HandedKeys:
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: str | None
    """ISO 8601, as given (None: not known)."""
    target: str | None
    """The grant's target, when the input names it (``MatchedGrantTarget``)."""

    def __repr__(self) -> str:
        return f"HandedKeys(expiration={self.expiration!r}, target={self.target!r})"

    def request(self, target: str | None) -> dict[str, str | None]:
        """The ``credentials`` request's arguments."""
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
            "expiration": self.expiration,
            "target": target or self.target or "",
        }


_LINE = re.compile(
    r"""^\s*(?:export\s+|set\s+|\$env:)?(AWS_[A-Z_]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|(\S*))\s*;?\s*$""",
    re.IGNORECASE,
)
_NAMES = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_CREDENTIAL_EXPIRATION": "expiration",
}


def parse_keys(text: str) -> HandedKeys:
    """Keys from pasted or piped text, in any of the forms above."""
    stripped = text.strip()
    if not stripped:
        raise KeysFormatError("no keys given")
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            raise KeysFormatError(
                "the input starts like JSON but is not valid JSON (cut short when pasted?)"
            ) from None
        if not isinstance(data, dict):
            raise KeysFormatError("the JSON is not an object")
        return _from_json(data)
    found: dict[str, str] = {}
    for line in stripped.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        name = _NAMES.get(match.group(1).upper())
        if name is not None:
            found[name] = next(g for g in match.groups()[1:] if g is not None)
    if not found:
        raise KeysFormatError(
            "no keys found: give the JSON that aws s3control get-data-access prints, or "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN lines"
        )
    return _complete(found, None)


def keys_from_environment(environ: Mapping[str, str]) -> HandedKeys:
    """Keys from this command's own environment variables."""
    found = {name: environ[var] for var, name in _NAMES.items() if environ.get(var)}
    if not found:
        raise KeysFormatError(
            "no keys given: pipe in the JSON that aws s3control get-data-access prints, "
            "or set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
        )
    return _complete(found, None)


def _from_json(data: Mapping[str, object]) -> HandedKeys:
    inner = data.get("Credentials", data)
    if not isinstance(inner, dict):
        raise KeysFormatError("'Credentials' in the JSON is not an object")
    found = {
        name: value
        for key, name in (
            ("AccessKeyId", "access_key_id"),
            ("SecretAccessKey", "secret_access_key"),
            ("SessionToken", "session_token"),
            ("Expiration", "expiration"),
        )
        if isinstance(value := inner.get(key), str) and value
    }
    target = data.get("MatchedGrantTarget")
    return _complete(found, target if isinstance(target, str) and target else None)


def _complete(found: Mapping[str, str], target: str | None) -> HandedKeys:
    missing = [
        label
        for name, label in (
            ("access_key_id", "the access key id"),
            ("secret_access_key", "the secret access key"),
        )
        if not found.get(name)
    ]
    if missing:
        raise KeysFormatError(f"incomplete keys: {' and '.join(missing)} missing")
    return HandedKeys(
        found["access_key_id"],
        found["secret_access_key"],
        found.get("session_token", ""),
        found.get("expiration") or None,
        target,
    )
