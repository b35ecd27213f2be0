"""Reading the audit log, for `edgellm audit`: opened read-only (a check must not change what
it checks, and works on a copy), records by time, times as a user gives them."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from edgellm.audit.chain import TABLE, Row, rows
from edgellm.audit.writer import utc_time
from edgellm.errors import EdgeLLMError, ValidationError

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAC = re.compile(r"[0-9a-f]{64}")


class NoAuditLog(EdgeLLMError):
    """There is no audit log to read at the place given."""


def open_log(path: Path) -> sqlite3.Connection:
    """The database at `path`, read-only, holding an audit log."""
    if not path.is_file():
        raise NoAuditLog(f"no audit log: {path} does not exist")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise NoAuditLog(f"no audit log in {path}: {exc}") from None
    return conn


def parse_when(text: str, param: str, now: float | None = None) -> str:
    """A time as records store it, from an ISO 8601 date or time (UTC unless it names its
    offset) or an age ("30m", "12h", "7d": that long ago)."""
    text = text.strip()
    age = _AGE.fullmatch(text)
    if age is not None:
        seconds = float(age.group(1)) * _UNITS[age.group(2)]
        return utc_time((time.time() if now is None else now) - seconds)
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValidationError(
            f"{param}: {text!r} is not a time: give an ISO 8601 date or time (2025-01-31, "
            "2025-01-31T12:00Z) or an age (30m, 12h, 7d)",
            param=param,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return utc_time(when.timestamp())


def parse_anchor(text: str) -> tuple[int, str]:
    """ "SEQ:MAC" as `verify` prints it."""
    seq, _, mac = text.strip().partition(":")
    if not seq.isdigit() or int(seq) < 1 or not _MAC.fullmatch(mac.lower()):
        raise ValidationError(
            f"--anchor: {text!r} is not SEQ:MAC (a record number and its 64 hex digit MAC, as "
            "`edgellm audit verify` prints them)",
            param="anchor",
        )
    return int(seq), mac.lower()


def first_seq_since(conn: sqlite3.Connection, since: str) -> int | None:
    """The first record (by seq) of a request that arrived at or after `since`."""
    value = conn.execute(f"SELECT MIN(seq) FROM {TABLE} WHERE time >= ?", (since,)).fetchone()[0]
    return None if value is None else int(value)


def between(conn: sqlite3.Connection, since: str | None, until: str | None) -> Iterator[Row]:
    """Records of requests that arrived in [since, until), in seq order."""
    conditions, args = [], []
    if since is not None:
        conditions.append("time >= ?")
        args.append(since)
    if until is not None:
        conditions.append("time < ?")
        args.append(until)
    return rows(conn, " AND ".join(conditions), tuple(args))


def last(conn: sqlite3.Connection, n: int) -> list[Row]:
    """The last `n` records, oldest first."""
    value = conn.execute(f"SELECT MAX(seq) FROM {TABLE}").fetchone()[0]
    if value is None:
        return []
    return list(rows(conn, "seq > ?", (int(value) - n,)))


def after(conn: sqlite3.Connection, seq: int) -> Iterator[Row]:
    return rows(conn, "seq > ?", (seq,))
