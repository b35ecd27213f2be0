"""The SQLite database in the data directory (`home_dir() / "edgellm.db"`) that API keys, the
audit log and the model registry share, and the migrations that are the only way its schema
changes.

Migrations are named and append-only: `MIGRATIONS` lists them in the order they apply; a new
one goes at the end and an existing one never changes (a database that applied it keeps what it
did). `open_db` applies those a database lacks, each in its own transaction together with its
row in `schema_migrations`, so a migration that fails leaves nothing of itself behind. A
database holding a migration this code does not know was written by a newer edgellm: it is
refused, since this code cannot know what that migration changed.

The file is created 0600 before SQLite opens it; SQLite creates its `-wal` and `-shm` files with
the database file's own permissions (unix VFS, `findCreateFileMode`), so they are 0600 too,
whatever the umask. WAL lets the server read keys while `edgellm keys` writes them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.home import home_dir

DB_NAME = "edgellm.db"
BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another process's write lock


class StoreError(EdgeLLMError):
    """The database cannot be used: unreadable, from a newer edgellm, or a migration failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str  # "NNNN_what": unique, recorded in schema_migrations once applied
    sql: str  # one or more statements, run in one transaction


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_api_keys",
        """
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,      -- what the key is called; logs and audit use it
            prefix TEXT NOT NULL,           -- the key's first characters: not secret, an index
            key_sha256 BLOB NOT NULL UNIQUE,-- SHA-256 of the whole key; the key is not stored
            role TEXT NOT NULL CHECK (role IN ('admin', 'user', 'metrics')),
            models TEXT,                    -- JSON list of model names; NULL: every model
            rpm INTEGER,                    -- requests per minute; NULL: no limit
            tpm INTEGER,                    -- prompt + completion tokens per minute
            max_concurrent INTEGER,         -- requests in flight
            expires TEXT,                   -- YYYY-MM-DD: the last day (UTC) it works
            created_at TEXT NOT NULL,       -- ISO 8601 UTC
            revoked_at TEXT                 -- ISO 8601 UTC; NULL: not revoked
        );
        CREATE INDEX api_keys_prefix ON api_keys (prefix);
        """,
    ),
    Migration(
        "0002_audit_log",
        """
        -- one row per API request, HMAC-chained (edgellm.audit.chain documents each column)
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,        -- 1, 2, 3, ...: the order records were written in
            time TEXT NOT NULL,             -- when the request arrived: ISO 8601 UTC
            request_id TEXT NOT NULL,       -- the X-Request-Id its client got
            key_name TEXT,                  -- the API key's name (never the key); NULL: no auth
            role TEXT,
            client TEXT,                    -- the peer's host:port
            api TEXT,                       -- openai | ollama | NULL (/metrics, ...)
            route TEXT NOT NULL,
            method TEXT NOT NULL,
            model TEXT,
            version TEXT,                   -- the model file's SHA-256 prefix
            status INTEGER NOT NULL,        -- HTTP status; 499: the client went away
            finish_reason TEXT,
            error TEXT,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_s REAL,
            e2e_s REAL,
            input_sha256 TEXT,
            input_kind TEXT,                -- prompt (token ids) | body (the raw request body)
            output_sha256 TEXT,
            prompt_text TEXT,               -- only with --audit-text
            output_text TEXT,
            prev_mac TEXT NOT NULL,         -- the previous record's MAC (64 zeros for the first)
            mac TEXT NOT NULL               -- HMAC-SHA256 over prev_mac and this record
        );
        CREATE INDEX audit_log_time ON audit_log (time);
        """,
    ),
    Migration(
        "0003_model_registry",
        """
        -- the model registry (edgellm.registry): names, their versions, and tags on versions
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,      -- what clients send as `model` (before the colon)
            created_at TEXT NOT NULL
        );
        CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models (id),
            sha256 TEXT NOT NULL,           -- of the plain GGUF: the version's identity
            size INTEGER NOT NULL,          -- bytes of the plain GGUF
            format TEXT NOT NULL,           -- gguf
            architecture TEXT,              -- general.architecture
            parameters INTEGER,             -- weights, counted over the tensors
            file_type TEXT,                 -- quantization, e.g. Q4_K_M (general.file_type)
            context_length INTEGER,         -- trained context
            template_sha256 TEXT,           -- of tokenizer.chat_template
            parent_sha256 TEXT,             -- the file it was made from; NULL: unknown
            operation TEXT NOT NULL,        -- how it was made: quantize, convert, external, ...
            operation_params TEXT NOT NULL, -- JSON: that operation's parameters
            source TEXT,                    -- where it came from: a path, URL, hf://, ollama://
            evals TEXT NOT NULL,            -- JSON list: evaluations (edgellm eval), oldest first
            gates TEXT NOT NULL,            -- JSON list: gate verdicts on them
            params TEXT NOT NULL,           -- JSON: serving defaults (edgellm models set)
            encrypted INTEGER NOT NULL,     -- 1: the blob is AES-256-GCM encrypted
            blob TEXT NOT NULL,             -- file name in the blob directory, or an absolute
                                            -- path for a file registered in place
            created_at TEXT NOT NULL,
            removed_at TEXT,                -- set by gc: blob gone, the row stays for lineage
            UNIQUE (model_id, sha256)
        );
        CREATE INDEX versions_sha256 ON versions (sha256);
        CREATE TABLE tags (
            model_id INTEGER NOT NULL REFERENCES models (id),
            tag TEXT NOT NULL,
            version_id INTEGER NOT NULL REFERENCES versions (id),
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model_id, tag)
        );
        CREATE TABLE tag_history (         -- every move of a tag, oldest first
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models (id),
            tag TEXT NOT NULL,
            version_id INTEGER REFERENCES versions (id),  -- where it points now; NULL: removed
            previous_id INTEGER REFERENCES versions (id), -- where it pointed before; NULL: new
            operation TEXT NOT NULL,        -- add, pull, tag, rm, promote, rollback, ...
            at TEXT NOT NULL
        );
        """,
    ),
    Migration(
        "0004_deployments",
        """
        -- how a tag is served beyond where it points (edgellm.registry.deploy): its quality
        -- gate, a canary or mirror candidate, an SLO fallback. No row: none of these.
        CREATE TABLE deployments (
            model_id INTEGER NOT NULL REFERENCES models (id),
            tag TEXT NOT NULL,
            gate TEXT,                      -- a gate expression (edgellm.evaluate.gate)
            candidate_id INTEGER REFERENCES versions (id),  -- canary / mirror; NULL: none
            weight REAL NOT NULL DEFAULT 0, -- percent of conversations sent to the candidate
            mirror REAL NOT NULL DEFAULT 0, -- percent of requests copied to the candidate
            fallback_id INTEGER REFERENCES versions (id),   -- the SLO fallback; NULL: none
            ttft_p99_s REAL,                -- the fallback's objective: p99 TTFT, seconds
            window_s REAL NOT NULL DEFAULT 60, -- the window the p99 is taken over, seconds
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model_id, tag)
        );
        """,
    ),
)

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""


def utc_now() -> str:
    """Now, as the database stores times: ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def db_path() -> Path:
    return home_dir() / DB_NAME


def _create_private(path: Path) -> None:
    """Create the database file 0600 if it is missing. Never open an existing one here: closing
    any descriptor of a file drops every POSIX lock this process holds on it, the locks of its
    open SQLite connections included; another process could then take this one's WAL for
    abandoned and delete it under the connections still using it ("disk I/O error")."""
    if path.exists():
        return
    with contextlib.suppress(FileExistsError):  # made meanwhile by another process
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))


def open_db(
    path: Path | None = None,
    *,
    check_same_thread: bool = True,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> sqlite3.Connection:
    """A connection to the database at `path` (default: the data directory's), created 0600
    when missing, in WAL mode, migrated to `migrations`. It is in Python's default transaction
    mode (`with conn:` commits or rolls back). StoreError when it cannot be used."""
    path = path or db_path()
    try:
        _create_private(path)
        conn = sqlite3.connect(path, check_same_thread=check_same_thread, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the database {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _wal(conn)
        if mode != "wal":
            raise StoreError(f"the database {path} cannot use WAL mode (it is in {mode} mode)")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, migrations, str(path))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot use the database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    conn.isolation_level = "DEFERRED"  # the default: DML opens a transaction, `with conn` ends it
    return conn


def _wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL mode; the journal mode it ends in. Changing the mode of a new database
    needs its exclusive lock and SQLite's busy handler does not wait for that one: when another
    process is switching it at the same moment this one gets SQLITE_BUSY at once, so it retries
    for up to the busy timeout (seen: four openers of a new file on a loaded 2-core box)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations applied to `conn`'s database, in the order applied."""
    rows = conn.execute("SELECT name FROM schema_migrations ORDER BY rowid").fetchall()
    return [str(name) for (name,) in rows]


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration], where: str) -> None:
    """Apply the `migrations` the database lacks, in order. `conn` is in autocommit mode.

    Each one runs in a BEGIN IMMEDIATE transaction that first re-reads the ledger: two processes
    opening a new database at once (serve and `edgellm keys create`) apply each migration once.
    """
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):  # pragma: no cover - a programming error, caught in tests
        raise StoreError("two migrations have the same name")
    conn.execute(_LEDGER)
    unknown = [name for name in applied_migrations(conn) if name not in names]
    if unknown:
        raise StoreError(
            f"the database {where} was changed by a newer edgellm (migration "
            f"{', '.join(unknown)} is unknown to this version): upgrade edgellm to use it"
        )
    for migration in migrations:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not _applied(conn, migration.name):
                _apply(conn, migration)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _applied(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone()
    return row is not None


def _apply(conn: sqlite3.Connection, migration: Migration) -> None:
    """Run one migration's statements inside the open transaction."""
    try:
        for statement in _statements(migration.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
            (migration.name, utc_now()),
        )
    except sqlite3.Error as exc:
        raise StoreError(f"migration {migration.name} failed: {exc}") from exc


def _statements(sql: str) -> list[str]:
    """`sql` split into complete statements, at the semicolons SQLite itself would end them at
    (not those in strings or comments). executescript would commit the open transaction."""
    statements, pending = [], ""
    for piece in sql.split(";"):
        pending += piece + ";"  # the last piece gets a ";" `sql` may lack: harmless
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\n;"):
        statements.append(pending)  # unterminated (an open string): SQLite says what is wrong
    return [s for s in statements if s.strip(" \t\n;")]
