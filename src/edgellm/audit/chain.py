"""The audit log's chain: what a record's MAC covers, and how a log is checked.

Each record (one row of `audit_log`, numbered by `seq` from 1) carries

    mac = HMAC-SHA256(key, prev_mac + "\\n" + canonical(record))

where `prev_mac` is the previous record's MAC (64 zeros before record 1) and `canonical` is
the record's fields (FIELDS, `seq` included) as one JSON object: keys sorted, no spaces, ASCII
only. The key is kept outside the database (`edgellm.audit.key`). So without the key nobody can
change a field of a record, delete one, insert one or reorder them without the check below
failing at that record: a change breaks its own MAC, a deletion leaves a gap in `seq` or a
chain that does not continue, an insertion or a move breaks the MAC that covers its place.
Deleting records at the end leaves a shorter chain that still checks: only an anchor kept
elsewhere (a record's seq and MAC, `--anchor`) shows that.

`verify` walks the rows in `seq` order in one pass. At the first row that fails it looks
around (the next row, rows with the same MAC, the same content at other places) to say what
happened there: changed, deleted, inserted or reordered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

TABLE = "audit_log"
# what a record says, in the order of its columns; its MAC covers all of them
FIELDS = (
    "seq",  # 1, 2, 3, ...: the order records were written in
    "time",  # when the request arrived: UTC, ISO 8601 with microseconds ("...T12:00:00.000000Z")
    "request_id",  # the X-Request-Id the client got
    "key_name",  # the name of its API key (never the key); None when auth is off
    "role",  # that key's role
    "client",  # the peer's "host:port"
    "api",  # "openai" (/v1), "ollama" (/api), or None (/metrics, /docs, ...)
    "route",  # the path, e.g. "/v1/chat/completions"
    "method",
    "model",  # the served model's name; None when the request named none or was refused first
    "version",  # the served model's version (its file's SHA-256 prefix)
    "status",  # the HTTP status; 499: the client went away before its answer was complete
    "finish_reason",  # stop | length | tool_calls | abort | error, for generation requests
    "error",  # the error's code (invalid_api_key, ...) or class, when it failed or was refused
    "prompt_tokens",
    "cached_tokens",  # prompt tokens reused from the prefix cache
    "completion_tokens",
    "ttft_s",  # seconds from arrival to the first output
    "e2e_s",  # seconds from arrival to the end of the answer
    "input_sha256",  # of the rendered prompt's token ids, or of the raw body (input_kind)
    "input_kind",  # "prompt": token ids, decimal, joined by ","; "body": the request's bytes
    "output_sha256",  # of the text the client got, in order (reasoning, then content), UTF-8
    "prompt_text",  # the prompt as given (JSON), only with --audit-text
    "output_text",  # the output text, only with --audit-text
)
COLUMNS = (*FIELDS, "prev_mac", "mac")
GENESIS = "0" * 64  # the `prev_mac` of record 1
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"  # constant names only
_NEARBY = 64  # how far from its place a moved record is looked for (beyond: via its chain)

Row = dict[str, Any]
Kind = Literal["changed", "deleted", "inserted", "reordered"]


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a record's MAC covers (without the previous MAC)."""
    fields = {name: row[name] for name in FIELDS}
    text = json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_foreign
    )
    return text.encode()


def _foreign(value: Any) -> str:
    """A value the writer never stores (a BLOB put in by hand): something its MAC cannot
    match, instead of an error."""
    return f"<{type(value).__name__} {value.hex() if isinstance(value, bytes) else value!r}>"


def mac_of(key: bytes, prev_mac: str, row: Mapping[str, Any]) -> str:
    message = prev_mac.encode("ascii", "replace") + b"\n" + canonical(row)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def authentic(key: bytes, row: Row) -> bool:
    """Whether `row`'s MAC is its own, following the MAC it names as the previous one."""
    mac, prev = row["mac"], row["prev_mac"]
    if not isinstance(mac, str) or not isinstance(prev, str):
        return False
    return hmac.compare_digest(mac_of(key, prev, row), mac)


@dataclass(slots=True, frozen=True)
class Problem:
    """The first record that does not check, and what seems to have happened to it."""

    seq: int  # the record named (for a deletion: the first one missing)
    kind: Kind
    detail: str  # one sentence, naming the record

    def __str__(self) -> str:
        return self.detail


@dataclass(slots=True, frozen=True)
class Verification:
    first: int | None  # the first and last seq checked; None: no records
    last: int | None
    count: int
    last_mac: str | None  # the last record's MAC: an anchor to keep elsewhere
    problem: Problem | None  # None: intact

    @property
    def intact(self) -> bool:
        return self.problem is None


def rows(conn: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = ()) -> Iterator[Row]:
    """The records matching `where` (an SQL condition over COLUMNS), in seq order."""
    condition = f" WHERE {where}" if where else ""
    for values in conn.execute(f"{_SELECT}{condition} ORDER BY seq", args):
        yield dict(zip(COLUMNS, values, strict=True))


def _one(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> Row | None:
    return next(rows(conn, where, args), None)


def last_row(conn: sqlite3.Connection) -> Row | None:
    """The last record written; None in an empty log."""
    values = conn.execute(f"{_SELECT} ORDER BY seq DESC LIMIT 1").fetchone()
    return None if values is None else dict(zip(COLUMNS, values, strict=True))


def _named(row: Row) -> str:
    return f"record {row['seq']} (request {row['request_id']}, {row['time']})"


def verify(
    conn: sqlite3.Connection,
    key: bytes,
    *,
    since_seq: int | None = None,
    anchor: tuple[int, str] | None = None,
) -> Verification:
    """Check the chain from record 1 (or from `since_seq`, trusting where it starts), and that
    the record of `anchor` (seq, MAC), kept elsewhere, is still there unchanged."""
    first: Row | None = None
    last: Row | None = None
    count = 0
    problem: Problem | None = None
    expected, prev = 1, GENESIS
    selected = rows(conn) if since_seq is None else rows(conn, "seq >= ?", (since_seq,))
    for row in selected:
        if first is None:
            first = row
            if since_seq is not None:  # where a partial check starts is taken on trust
                expected, prev = row["seq"], row["prev_mac"]
        if row["seq"] != expected or row["prev_mac"] != prev or not authentic(key, row):
            problem = _diagnose(conn, key, row, expected, prev)
            break
        last, count = row, count + 1
        expected, prev = row["seq"] + 1, row["mac"]
    if problem is None and anchor is not None:
        problem = _check_anchor(conn, anchor, last)
    return Verification(
        first["seq"] if first is not None else None,
        last["seq"] if last is not None else None,
        count,
        last["mac"] if last is not None else None,
        problem,
    )


def _diagnose(conn: sqlite3.Connection, key: bytes, row: Row, expected: int, prev: str) -> Problem:
    """What happened at `row`, the first that fails: it stands where record `expected`, which
    follows the MAC `prev`, should."""
    seq = row["seq"]
    if authentic(key, row):
        if seq > expected:
            missing = (
                f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
            )
            where = f"goes from record {expected - 1} to" if expected > 1 else "starts at"
            detail = f"{missing} deleted: the chain {where} {_named(row)}"
            return Problem(expected, "deleted", detail)
        if _one(conn, "mac = ?", (row["prev_mac"],)) is None:
            return Problem(
                seq,
                "deleted",
                f"the record before {_named(row)} was deleted: the record it follows is gone",
            )
        return Problem(
            seq, "reordered", f"{_named(row)} does not follow record {seq - 1}: reordered"
        )
    copies = [r["seq"] for r in rows(conn, "mac = ? AND seq != ?", (row["mac"], seq))]
    if copies:
        return Problem(seq, "inserted", f"{_named(row)} was inserted: a copy of record {copies[0]}")
    moved_from = _original_place(conn, key, row)
    if moved_from is not None:
        if _one(conn, "mac = ?", (row["prev_mac"],)) is None:
            return Problem(
                seq,
                "deleted",
                f"a record before {_named(row)} was deleted and the later ones renumbered: it "
                f"was record {moved_from}",
            )
        return Problem(
            seq, "reordered", f"{_named(row)} is record {moved_from} moved here: reordered"
        )
    return _changed_or_inserted(conn, key, row, prev)


def _original_place(conn: sqlite3.Connection, key: bytes, row: Row) -> int | None:
    """The seq under which `row`'s MAC is its own, when it is not its stored one: near its
    place, or just after the record its chain follows."""
    candidates: list[int] = [
        s for d in range(1, _NEARBY + 1) for s in (row["seq"] + d, row["seq"] - d)
    ]
    before = _one(conn, "mac = ?", (row["prev_mac"],))
    if before is not None:
        candidates.insert(0, before["seq"] + 1)
    for seq in candidates:
        if seq >= 1 and authentic(key, {**row, "seq": seq}):
            return seq
    return None


def _changed_or_inserted(conn: sqlite3.Connection, key: bytes, row: Row, prev: str) -> Problem:
    """`row` is not authentic anywhere: an edited record or a forged one. The record after it
    says which: it continues from the original MAC (an edited field), from the MAC this one
    should have (an edited MAC), or from the record before (nothing was there: inserted)."""
    seq = row["seq"]
    after = _one(conn, "seq > ?", (seq,))
    if after is not None:
        if after["prev_mac"] == row["mac"]:
            return Problem(seq, "changed", f"{_named(row)} was changed: it does not match its MAC")
        if row["prev_mac"] == prev and after["prev_mac"] == mac_of(key, prev, row):
            return Problem(seq, "changed", f"{_named(row)} was changed: its MAC was replaced")
        if after["prev_mac"] == prev:
            return Problem(
                seq,
                "inserted",
                f"{_named(row)} was inserted: the next record follows the one before it",
            )
    if after is None:
        return Problem(
            seq,
            "changed",
            f"{_named(row)}, the last record, was changed or inserted: it does not match its MAC",
        )
    return Problem(
        seq, "changed", f"{_named(row)} was changed or replaced: it does not match its MAC"
    )


def _check_anchor(
    conn: sqlite3.Connection, anchor: tuple[int, str], last: Row | None
) -> Problem | None:
    seq, mac = anchor
    row = _one(conn, "seq = ?", (seq,))
    if row is None:
        end = f"ends at record {last['seq']}" if last is not None else "is empty"
        return Problem(seq, "deleted", f"record {seq}, the anchor, was deleted: the log {end}")
    if not hmac.compare_digest(str(row["mac"]), mac):
        return Problem(seq, "changed", f"{_named(row)} is not the anchor: its MAC differs")
    return None
