"""API keys as the database keeps them (the api_keys table, edgellm.store): made, listed and
revoked by `edgellm keys`, read by the server (edgellm.server.keys.KeyRing). Light on purpose:
the CLI imports it without the server.

A key is `edg-` and 43 URL-safe characters from `secrets` (256 random bits). It is shown once,
when made; the database keeps its SHA-256 and its first 12 characters (`prefix`), never the
rest. The prefix is not secret: it names the key in `edgellm keys list` and is the index a
lookup starts from; the 35 characters after it (210 bits) are what an attacker would have to
guess.

Why SHA-256 and not a password hash (bcrypt, argon2): a password hash makes guessing slow
because passwords are guessable; a 210-bit random secret is not, so a stolen database gives
nothing to guess from, and a fast hash keeps every request's check in microseconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from edgellm.errors import ValidationError
from edgellm.store import open_db, utc_now

Role = Literal["admin", "user", "metrics"]
State = Literal["active", "revoked", "expired"]

KEY_PREFIX = "edg-"
PREFIX_CHARS = 12  # "edg-" and 8 random characters, stored in the clear as the lookup index
API_KEY_NAME = "api-key"  # the principal of --api-key; no stored key may take this name
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
PREFIX_PATTERN = r"edg-[A-Za-z0-9_-]{8}"  # KEY_PREFIX, then PREFIX_CHARS - 4 of the secret


class KeyExists(ValidationError):
    """A key of that name is stored (409 from the admin API; `keys create` says it in one
    line like any bad input)."""

    status_code = 409


class UnknownKey(ValidationError):
    status_code = 404


def utc_today() -> date:
    return datetime.now(UTC).date()


class KeySpec(BaseModel):
    """What `edgellm keys create` asks for, checked before anything is written."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, . _ @ -")
    role: Role
    models: tuple[str, ...] | None = Field(None, description="model names the key may use")
    rpm: int | None = Field(None, ge=1, le=1_000_000_000)
    tpm: int | None = Field(None, ge=1, le=1_000_000_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000)
    expires: date | None = Field(None, description="the last day (UTC) the key works")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == API_KEY_NAME:
            raise ValueError(f"'{API_KEY_NAME}' is the name of --api-key; choose another")
        return name

    @field_validator("models", mode="before")
    @classmethod
    def _comma_list(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("role", "user") != "user":
            raise ValueError("models limit a user key; admin and metrics keys have no models")
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            if not value or any(not isinstance(m, str) or not m or len(m) > 256 for m in value):
                raise ValueError("give model names separated by commas, none of them empty")
            return tuple(dict.fromkeys(value))
        return value

    @field_validator("expires", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError("give a date as YYYY-MM-DD")
        return value


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One stored key, as `keys list` shows it: everything but the secret."""

    name: str
    prefix: str  # the key's first PREFIX_CHARS characters
    role: Role
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    expires: date | None  # the last day (UTC) the key works; None: never
    created_at: str  # ISO 8601 UTC
    revoked_at: str | None  # ISO 8601 UTC; None: not revoked

    def state(self, today: date | None = None) -> State:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires is not None and (today or utc_today()) > self.expires:
            return "expired"
        return "active"

    def as_json(self, today: date | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "role": self.role,
            "models": list(self.models) if self.models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent": self.max_concurrent,
            "expires": self.expires.isoformat() if self.expires else None,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "state": self.state(today),
        }


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes: 256 bits, 43 characters


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


_COLUMNS = "name, prefix, role, models, rpm, tpm, max_concurrent, expires, created_at, revoked_at"


def _info(row: tuple[Any, ...]) -> KeyInfo:
    name, prefix, role, models, rpm, tpm, max_concurrent, expires, created, revoked = row
    return KeyInfo(
        name=name,
        prefix=prefix,
        role=role,
        models=tuple(json.loads(models)) if models is not None else None,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        expires=date.fromisoformat(expires) if expires else None,
        created_at=created,
        revoked_at=revoked,
    )


class KeyStore:
    """The api_keys table of one database connection. Thread-safe (one lock around it)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | None = None) -> KeyStore:
        """The store in the database at `path` (default: the data directory's)."""
        return cls(open_db(path, check_same_thread=False))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create(self, spec: KeySpec) -> tuple[str, KeyInfo]:
        """Make a key as `spec` says; returns the key (to be shown once) and its row."""
        key = new_key()
        return key, self.add_hashed(spec, key[:PREFIX_CHARS], key_digest(key.encode()))

    def add_hashed(self, spec: KeySpec, prefix: str, digest: bytes) -> KeyInfo:
        """Store a key made elsewhere from its prefix and SHA-256 (`edgellm fleet keys
        create` makes one secret and gives every worker only these): this store never sees
        the secret. KeyExists if the name is taken."""
        if not re.fullmatch(PREFIX_PATTERN, prefix):
            raise ValidationError(
                f"a key's prefix is its first {PREFIX_CHARS} characters ({KEY_PREFIX}...)",
                param="prefix",
            )
        if len(digest) != hashlib.sha256().digest_size:
            raise ValidationError("a key's digest is its SHA-256: 32 bytes", param="sha256")
        models = json.dumps(list(spec.models)) if spec.models is not None else None
        expires = spec.expires.isoformat() if spec.expires else None
        values = (spec.name, prefix, digest, spec.role, models)
        limits = (spec.rpm, spec.tpm, spec.max_concurrent, expires, utc_now())
        with self._lock:
            try:
                with self._conn:
                    self._conn.execute(
                        "INSERT INTO api_keys (name, prefix, key_sha256, role, models, rpm, tpm,"
                        " max_concurrent, expires, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        values + limits,
                    )
            except sqlite3.IntegrityError as exc:
                if self._row(spec.name) is None:
                    raise KeyExists(  # its digest is stored: the same secret once more
                        "this key is stored already, under another name", param="sha256"
                    ) from exc
                raise KeyExists(
                    f"a key named '{spec.name}' exists already (names are never reused, "
                    "revoked keys' included: the audit log names keys); choose another",
                    param="name",
                ) from exc
            info = self._row(spec.name)
        if info is None:  # pragma: no cover - deleted between the two statements
            raise ValidationError(f"the key '{spec.name}' vanished as it was made")
        return info

    def all_keys(self) -> list[KeyInfo]:
        """Every key, revoked and expired ones too, oldest first."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id").fetchall()
        return [_info(row) for row in rows]

    def revoke(self, name: str) -> KeyInfo:
        """Revoke the key `name` (already revoked: left as it was). ValidationError if there is
        no such key."""
        with self._lock:
            with self._conn:
                self._conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                    (utc_now(), name),
                )
            info = self._row(name)
        if info is None:
            raise UnknownKey(f"there is no key named '{name}'", param="name")
        return info

    def find(self, name: str) -> KeyInfo:
        """The key `name` (revoked or expired ones too); UnknownKey if there is none."""
        with self._lock:
            info = self._row(name)
        if info is None:
            raise UnknownKey(f"there is no key named '{name}'", param="name")
        return info

    def digests(self) -> list[tuple[bytes, KeyInfo]]:
        """Every key's SHA-256 with its row: what the server looks keys up in."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT key_sha256, {_COLUMNS} FROM api_keys ORDER BY id"
            ).fetchall()
        return [(bytes(row[0]), _info(row[1:])) for row in rows]

    def data_version(self) -> int:
        """A number that changes when another connection committed a change to the database
        (SQLite's `PRAGMA data_version`): a cheap way to know whether to reload."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _row(self, name: str) -> KeyInfo | None:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE name = ?", (name,)
        ).fetchone()
        return _info(row) if row is not None else None
