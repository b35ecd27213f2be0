"""The data directory, the database's migrations, and the key store, on real SQLite files
(without the server package: `edgellm keys` does not load it)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from edgellm.errors import ValidationError
from edgellm.home import home_dir
from edgellm.keystore import KeySpec, KeyStore
from edgellm.store import MIGRATIONS, Migration, StoreError, applied_migrations, open_db


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def test_home_is_the_variable_else_the_default_and_created_0700(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "a" / "home"))
    old = os.umask(0o022)
    try:
        assert home_dir() == tmp_path / "a" / "home"
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "home") == 0o700
    monkeypatch.delenv("EDGELLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert home_dir() == tmp_path / "user" / ".local" / "share" / "edgellm"
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o750)
    monkeypatch.setenv("EDGELLM_HOME", str(existing))
    assert home_dir() == existing and mode(existing) == 0o750  # an operator's choice stays


def test_a_fresh_database_is_0600_in_wal_mode_with_every_migration(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    old = os.umask(0o022)  # a umask that would leave new files world-readable
    try:
        conn = open_db(path)
        with conn:
            conn.execute("INSERT INTO schema_migrations VALUES ('x', 'now')")  # write: -wal exists
            conn.execute("DELETE FROM schema_migrations WHERE name = 'x'")
    finally:
        os.umask(old)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert applied_migrations(conn) == [m.name for m in MIGRATIONS]
        assert {"schema_migrations", "api_keys"} <= tables(conn)
        for name in ("edgellm.db", "edgellm.db-wal", "edgellm.db-shm"):
            assert mode(tmp_path / name) == 0o600, name
    finally:
        conn.close()


def test_reopening_applies_nothing_twice_and_only_what_is_new(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    open_db(path).close()
    conn = open_db(path)  # the same migrations: nothing to do
    assert applied_migrations(conn) == [m.name for m in MIGRATIONS]
    conn.close()
    later = (*MIGRATIONS, Migration("0002_notes", "CREATE TABLE notes (text TEXT NOT NULL);"))
    conn = open_db(path, migrations=later)
    try:
        assert applied_migrations(conn) == [*(m.name for m in MIGRATIONS), "0002_notes"]
        assert "notes" in tables(conn)
    finally:
        conn.close()


def test_a_database_with_a_migration_this_code_does_not_know_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    newer = (*MIGRATIONS, Migration("0099_future", "CREATE TABLE future (x);"))
    open_db(path, migrations=newer).close()
    with pytest.raises(StoreError) as raised:
        open_db(path)
    assert "0099_future" in raised.value.message and "newer edgellm" in raised.value.message
    assert "\n" not in raised.value.message


def test_a_failed_migration_leaves_nothing_half_applied(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    open_db(path).close()
    broken = Migration(
        "0002_broken",
        "CREATE TABLE half (x); INSERT INTO half VALUES (1); INSERT INTO nowhere VALUES (1);",
    )
    with pytest.raises(StoreError, match=r"migration 0002_broken failed.*nowhere"):
        open_db(path, migrations=(*MIGRATIONS, broken))
    conn = open_db(path)
    try:
        assert "half" not in tables(conn)
        assert applied_migrations(conn) == [m.name for m in MIGRATIONS]
    finally:
        conn.close()


def test_statements_split_where_sqlite_ends_them(tmp_path: Path) -> None:
    tricky = Migration(
        "0002_tricky",
        "CREATE TABLE t (x TEXT); -- a comment; with a semicolon\n"
        "INSERT INTO t VALUES ('a;b'); INSERT INTO t VALUES ('c')",
    )
    conn = open_db(tmp_path / "edgellm.db", migrations=(*MIGRATIONS, tricky))
    try:
        assert conn.execute("SELECT x FROM t ORDER BY rowid").fetchall() == [("a;b",), ("c",)]
    finally:
        conn.close()


def test_two_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    path, errors = tmp_path / "edgellm.db", []

    def open_and_close() -> None:
        try:
            open_db(path).close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = open_db(path)
    try:
        assert applied_migrations(conn) == [m.name for m in MIGRATIONS]
    finally:
        conn.close()


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    path.write_bytes(b"not a database, just some bytes" * 100)
    with pytest.raises(StoreError, match="cannot use the database"):
        open_db(path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    keys = KeyStore.open(tmp_path / "edgellm.db")
    yield keys
    keys.close()


def spec(name: str, role: str = "user", **fields: object) -> KeySpec:
    return KeySpec.model_validate({"name": name, "role": role, **fields})


def test_keys_are_random_shown_once_and_stored_as_a_hash(store: KeyStore, tmp_path: Path) -> None:
    key, info = store.create(spec("alice", models="a, b,a", rpm="60", expires="2999-01-31"))
    other, _ = store.create(spec("bob", "admin"))
    assert key.startswith("edg-") and len(key) == 47 and key != other
    assert info.prefix == key[:12] and info.state() == "active"
    assert info.models == ("a", "b") and info.rpm == 60 and info.expires == date(2999, 1, 31)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("edgellm.db*"))
    for secret in (key, other):
        assert secret.encode() not in raw and secret[12:].encode() not in raw


def test_names_are_unique_and_never_reused(store: KeyStore) -> None:
    store.create(spec("alice"))
    store.revoke("alice")
    with pytest.raises(ValidationError, match="exists already"):
        store.create(spec("alice"))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": "", "role": "user"}, "name"),
        ({"name": "a b", "role": "user"}, "name"),
        ({"name": "api-key", "role": "user"}, "--api-key"),
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "x", "role": "admin", "models": "a"}, "models limit a user key"),
        ({"name": "x", "role": "user", "models": "a,,b"}, "none of them empty"),
        ({"name": "x", "role": "user", "rpm": "0"}, "rpm"),
        ({"name": "x", "role": "user", "tpm": "many"}, "tpm"),
        ({"name": "x", "role": "user", "expires": "31/12/2030"}, "YYYY-MM-DD"),
        ({"name": "x", "role": "user", "expires": "2030-02-30"}, "expires"),
    ],
)
def test_bad_specs_are_refused(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(Exception, match="validation error") as raised:
        KeySpec.model_validate(fields)
    assert problem in str(raised.value)


def test_revoke_and_list(store: KeyStore) -> None:
    store.create(spec("a"))
    store.create(spec("old", expires="2000-01-01"))
    revoked = store.revoke("a")
    assert revoked.state() == "revoked" and revoked.revoked_at is not None
    assert store.revoke("a").revoked_at == revoked.revoked_at  # a second revoke changes nothing
    assert [(k.name, k.state()) for k in store.all_keys()] == [("a", "revoked"), ("old", "expired")]
    with pytest.raises(ValidationError, match="no key named 'nobody'"):
        store.revoke("nobody")


def test_a_key_works_through_its_last_day(store: KeyStore) -> None:
    _, info = store.create(spec("a", expires="2030-06-30"))
    assert info.state(date(2030, 6, 30)) == "active"
    assert info.state(date(2030, 7, 1)) == "expired"
