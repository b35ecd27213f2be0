"""Who is asking: the principal an API key stands for, as the auth middleware
(edgellm.server.auth) puts it in a request's scope for the layers after it (quotas, the
pipeline's records, the audit log), and the server's view of the keys (`KeyRing`): the stored
keys (edgellm.keystore: how they are made and kept) in memory, reloaded when the database
changed (looked at most every RELOAD_S), and `--api-key`.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date

from starlette.types import Scope

from edgellm.errors import AuthError
from edgellm.keystore import (
    API_KEY_NAME,
    PREFIX_CHARS,
    KeyInfo,
    KeySpec,
    KeyStore,
    Role,
    key_digest,
    utc_today,
)

__all__ = [
    "API_KEY_PRINCIPAL",
    "KeyRing",
    "KeySpec",
    "KeyStore",
    "Principal",
    "Role",
    "principal_of",
]

log = logging.getLogger("edgellm.server")

RELOAD_S = 0.5  # the server looks for new and revoked keys at most this often


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # the key's name ("api-key" for --api-key); never the key itself
    role: Role
    models: frozenset[str] | None = None  # the models it may use; None: every one
    rpm: int | None = None  # requests per minute at most; None: no limit
    tpm: int | None = None  # prompt + completion tokens per minute at most
    max_concurrent: int | None = None  # requests in flight at most


def principal_of(scope: Scope) -> Principal | None:
    """The principal of an authenticated request; None when auth is off."""
    principal = (scope.get("state") or {}).get("principal")
    return principal if isinstance(principal, Principal) else None


API_KEY_PRINCIPAL = Principal(API_KEY_NAME, "admin")  # --api-key acts as an admin key


def principal_for(info: KeyInfo) -> Principal:
    """What a stored key may do, as the layers after auth read it."""
    models = frozenset(info.models) if info.models is not None else None
    return Principal(info.name, info.role, models, info.rpm, info.tpm, info.max_concurrent)


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes  # SHA-256 of the key
    info: KeyInfo
    principal: Principal


_NO_DIGEST = bytes(32)  # compared against when no stored key has the presented prefix


class KeyRing:
    """The keys the server accepts: the store's (when it has one) and `--api-key`. Kept in
    memory and reloaded when the database changed, which `refresh` checks at most every
    `reload_s`: a key made or revoked with `edgellm keys` counts within that, and a request
    costs no database round trip. Call it from one thread (the event loop)."""

    def __init__(
        self,
        store: KeyStore | None = None,
        *,
        api_key: str | None = None,
        reload_s: float = RELOAD_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._store = store
        self._api_digest = key_digest(api_key.encode()) if api_key else None
        self._reload_s = reload_s
        self._clock = clock
        self._by_prefix: dict[str, list[_Entry]] = {}
        self._entries: list[_Entry] = []
        self._version: int | None = None
        self._next_check = 0.0
        self._failed = False  # the last reload failed (logged once until one succeeds)
        self._counted = False  # whether the keys were counted once
        self.enforced = self._api_digest is not None  # whether requests need a key
        self.active = 0  # stored keys that are neither revoked nor expired
        self.refresh(force=True)

    @property
    def store(self) -> KeyStore | None:
        """Where stored keys live (the admin API writes keys there, then refreshes)."""
        return self._store

    def reload(self) -> None:
        """Read the keys again now: after a write through `store` itself, which SQLite's
        data_version (what `refresh` looks at) does not count, being this connection's own."""
        self._version = None
        self.refresh(force=True)

    def describe(self) -> str:
        """One line for the log: whether auth is enforced, and by which keys."""
        if not self.enforced:
            return "auth: off (no API key made, no --api-key): every request is served"
        keys = f"{self.active} active key{'s' if self.active != 1 else ''}"
        return f"auth: enforced ({keys}{', and --api-key' if self._api_digest else ''})"

    def announce(self) -> None:
        """Log whether auth is on and with how many keys (serve's start-up line)."""
        self.refresh(force=True)
        log.info("%s", self.describe())

    def refresh(self, *, force: bool = False) -> None:
        """Reload the keys if the database changed since the last look; at most every
        `reload_s` unless `force`. A database that cannot be read keeps the keys there were."""
        now = self._clock()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._reload_s
        if self._store is not None:
            try:
                version = self._store.data_version()
                if version != self._version:
                    self._load(self._store.digests())
                    self._version = version
                self._failed = False
            except sqlite3.Error as exc:
                if not self._failed:
                    log.error("cannot read the API keys, keeping those read before: %s", exc)
                self._failed = True
        self._count(utc_today())

    def _load(self, rows: Iterable[tuple[bytes, KeyInfo]]) -> None:
        entries = [_Entry(digest, info, principal_for(info)) for digest, info in rows]
        by_prefix: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_prefix.setdefault(entry.info.prefix, []).append(entry)
        self._entries, self._by_prefix = entries, by_prefix

    def _count(self, today: date) -> None:
        """Count the active keys; a change after the first count is logged. Auth fails
        closed: once the store holds a key, revoked and expired ones included, it stays on,
        so revoking the last (leaked) key shuts the server rather than opening it."""
        was = (self.enforced, self.active)
        self.active = sum(1 for e in self._entries if e.info.state(today) == "active")
        self.enforced = self._api_digest is not None or bool(self._entries)
        if not self._counted:
            self._counted = True  # the first count: serve's start-up line says it
        elif was[0] and self.enforced and self.active == 0 and self._api_digest is None:
            log.warning("no active API key is left: every request is refused until one is made")
        elif was != (self.enforced, self.active):
            log.info("%s", self.describe())

    def authenticate(self, key: bytes) -> Principal:
        """The principal `key` stands for; AuthError for an unknown or revoked key (the same
        answer for both) and for an expired one.

        Constant time: the presented key's hash is compared with hmac.compare_digest against
        each stored hash under its prefix (almost always one), or a zero hash when none has
        it; what a timing attacker could learn is whether a prefix exists, which is not secret.
        """
        digest = key_digest(key)
        if self._api_digest is not None and hmac.compare_digest(digest, self._api_digest):
            return API_KEY_PRINCIPAL
        found: _Entry | None = None
        candidates = self._by_prefix.get(key[:PREFIX_CHARS].decode("latin-1"), [])
        for entry in candidates:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        if not candidates:
            hmac.compare_digest(digest, _NO_DIGEST)
        state = found.info.state() if found is not None else None
        if found is None or state == "revoked":
            raise AuthError("the API key is not valid")
        if state == "expired":
            raise AuthError("the API key has expired", code="expired_api_key")
        return found.principal
