"""The audit key: 32 random bytes in `$EDGELLM_HOME/audit.key`, outside the database, so a
person who can edit the database cannot forge MACs without also holding this file."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from edgellm.errors import EdgeLLMError

KEY_FILE = "audit.key"
KEY_BYTES = 32


class AuditKeyError(EdgeLLMError):
    """The audit key is missing, unreadable or malformed."""


def read_key(path: Path) -> bytes:
    """The key in `path`; AuditKeyError when it is missing or not a key."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise AuditKeyError(f"the audit key {path} is missing") from None
    except OSError as exc:
        raise AuditKeyError(f"the audit key {path} cannot be read: {exc.strerror}") from None
    if len(key) != KEY_BYTES:
        raise AuditKeyError(f"the audit key {path} is not {KEY_BYTES} bytes long")
    return key


def key_is_private(path: Path) -> bool:
    """Whether only its owner may read or write the key file."""
    return not stat.S_IMODE(path.stat().st_mode) & 0o077


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """The key in `path`, made first when there is none: (key, whether it was just made).

    The new key is written to a private temporary file (0600 from its creation: it is never
    readable by others, not even for a moment) and linked into place, which fails when another
    process made the key first; then that key is the one used."""
    if path.exists():
        return read_key(path), False
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
            made = True
        except FileExistsError:
            made = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return read_key(path), made
