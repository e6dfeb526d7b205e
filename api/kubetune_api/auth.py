"""API keys: ``Authorization: Bearer <key>`` → the caller's org and role.

Keys are kept as SHA-256 digests only. Keys are long random strings, so a fast hash is the right
tool (a slow password hash defends low-entropy secrets and would cost every request).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from kubetune.finetunejob import ORG_PATTERN
from kubetune_api.errors import AuthenticationFailed

KEY_PREFIX = "kt-"


class Role(StrEnum):
    """What a key may do: members use the API; admins also manage the org."""

    ADMIN = "admin"
    MEMBER = "member"


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    org: str
    role: Role
    key_name: str


class ApiKeyEntry(BaseModel):
    """One line of the keys file: a key (hashed on load) or its SHA-256 digest."""

    name: str = Field(min_length=1, max_length=128)
    org: str = Field(pattern=ORG_PATTERN)
    role: Role = Role.MEMBER
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    key: str | None = Field(default=None, min_length=16)

    @model_validator(mode="after")
    def _one_of_key_or_digest(self) -> ApiKeyEntry:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of key or sha256")
        return self

    def digest(self) -> str:
        """The key's SHA-256 digest, hex."""
        return self.sha256 or hash_key(self.key or "")


def hash_key(key: str) -> str:
    """SHA-256 of a key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random key: ``kt-`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """Looks up callers by key digest."""

    def __init__(self, entries: list[ApiKeyEntry]) -> None:
        self._by_digest = {
            e.digest(): Principal(org=e.org, role=e.role, key_name=e.name) for e in entries
        }

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        """Load a JSON list of :class:`ApiKeyEntry`."""
        entries = [ApiKeyEntry.model_validate(e) for e in json.loads(path.read_text())]
        return cls(entries)

    def orgs(self) -> list[str]:
        """The orgs that hold at least one key, sorted."""
        return sorted({principal.org for principal in self._by_digest.values()})

    def authenticate(self, authorization: str | None) -> Principal:
        """Resolve an ``Authorization`` header, or raise 401 in OpenAI's words."""
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        scheme, _, token = authorization.partition(" ")
        principal = (
            self._by_digest.get(hash_key(token.strip())) if scheme.lower() == "bearer" else None
        )
        if principal is None:
            shown = token.strip()[-4:] if len(token.strip()) > 8 else ""
            raise AuthenticationFailed(f"Incorrect API key provided: ...{shown}.")
        return principal


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read: created 0600 (never readable by others, not even
    for a moment), then renamed into place so a reader never sees half of it.
    """
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)
