"""Operations in the audit log: one record for an operator's act that bypassed a safeguard
(`models promote --force` past a failing quality gate), written at once through the same HMAC
chain as the server's request records.

The record is chained inside a BEGIN IMMEDIATE transaction that reads the log's tail under the
write lock, exactly as the server's writer does (`AuditWriter._write`), so a running server
and this CLI append to one chain. Given the caller's connection inside its own open write
transaction (the registry's), the record and the change it records commit together or not at
all: a forced promote the log cannot record does not happen.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from edgellm.audit.chain import COLUMNS, FIELDS, GENESIS, TABLE, authentic, last_row, mac_of
from edgellm.audit.key import KEY_FILE, AuditKeyError, load_or_create_key
from edgellm.audit.writer import AuditEntry, as_row
from edgellm.home import home_dir
from edgellm.store import DB_NAME, open_db

_INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def record_operation(
    route: str,
    *,
    model: str,
    version: str | None,
    actor: str | None = None,
    method: str = "CLI",
    status: int = 200,
    finish_reason: str | None = "forced",
    error: str | None = None,
    arguments: dict[str, Any] | None = None,
    request_id: str | None = None,
    role: str | None = None,
    client: str | None = None,
    home: Path | None = None,
    conn: sqlite3.Connection | None = None,
) -> int:
    """Append one record for an operation (route e.g. "models promote", model the ref, version
    the new short version, `actor` the key name or None from the CLI, `error` why a safeguard
    objected) and return its seq. `arguments` (the operation's parameters) are hashed as its
    input. `conn`: a connection inside an open write transaction, which the caller commits;
    without it the record is written in its own transaction on the data directory's database.
    AuditKeyError when the key is missing but the log has records, or is not the log's key."""
    home = home or home_dir()
    body = json.dumps(arguments or {}, sort_keys=True).encode()
    entry = AuditEntry(
        time=time.time(), request_id=request_id or f"op-{uuid.uuid4().hex}", route=route,
        method=method, status=status, key_name=actor, role=role, client=client, model=model,
        version=version, finish_reason=finish_reason, error=error, body=[body],
    )  # fmt: skip
    own = conn is None
    db = conn if conn is not None else open_db(home / DB_NAME)
    try:
        if own:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
        seq = _append(db, home / KEY_FILE, as_row(entry))
        if own:
            db.execute("COMMIT")
    except BaseException:
        if own and db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        if own:
            db.close()
    return seq


def _append(conn: sqlite3.Connection, key_path: Path, row: dict[str, Any]) -> int:
    """Chain `row` onto the log's last record (read now, under the caller's write lock)."""
    tail = last_row(conn)
    if tail is not None and not key_path.exists():
        raise AuditKeyError(
            f"the audit key {key_path} is missing but the audit log holds {tail['seq']} "
            "records: restore the key to record this operation"
        )
    key, _ = load_or_create_key(key_path)
    if tail is not None and not authentic(key, tail):
        raise AuditKeyError(
            f"the audit key {key_path} does not match the audit log's last record (run "
            "`edgellm audit verify`): this operation cannot be recorded"
        )
    seq, prev = (int(tail["seq"]), str(tail["mac"])) if tail is not None else (0, GENESIS)
    row["seq"] = seq + 1
    conn.execute(_INSERT, (*(row[name] for name in FIELDS), prev, mac_of(key, prev, row)))
    return seq + 1
