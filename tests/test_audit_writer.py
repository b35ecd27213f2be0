"""The audit writer on a real SQLite file: records stored in the order submitted, batched into
transactions, one chain when two writers share the database; a database that cannot be
written (locked past the busy timeout, full) makes the log unavailable until it can be, and
loses nothing it had taken."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgellm.audit.chain import rows, verify
from edgellm.audit.writer import AuditEntry, AuditWriter, as_row
from edgellm.store import open_db

KEY = b"k" * 32


def entry(i: int, **fields: object) -> AuditEntry:
    made = AuditEntry(
        time=1_750_000_000.0 + i, request_id=f"r{i}", route="/v1/models", method="GET", status=200
    )
    for name, value in fields.items():
        setattr(made, name, value)
    return made


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "edgellm.db"
    open_db(path).close()
    return path


def commits_counted(
    path: Path, commits: list[str], busy_ms: int = 5000
) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        conn = open_db(path)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        return conn

    return connect


@pytest.fixture
def reader(db: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db)
    yield conn
    conn.close()


def stored(conn: sqlite3.Connection) -> list[str]:
    return [r["request_id"] for r in rows(conn)]


def test_records_are_stored_in_order_in_batches(db: Path, reader: sqlite3.Connection) -> None:
    commits: list[str] = []
    writer = AuditWriter(commits_counted(db, commits), KEY, batch_max=100)
    for i in range(250):  # queued before the thread starts: batches of 100, 100, 50
        writer.submit(entry(i))
    writer.start()
    assert writer.flush(10)
    assert len(commits) == 3
    for i in range(250, 260):
        writer.submit(entry(i))
    assert writer.close() == 0
    assert stored(reader) == [f"r{i}" for i in range(260)]
    assert verify(reader, KEY).count == 260
    assert writer.written == 260 and writer.dropped == 0


def test_records_from_many_threads_keep_each_threads_order(
    db: Path, reader: sqlite3.Connection
) -> None:
    writer = AuditWriter(lambda: open_db(db), KEY)
    writer.start()

    def send(t: int) -> None:
        for i in range(200):
            writer.submit(entry(i, request_id=f"t{t}-{i}"))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.close() == 0
    ids = stored(reader)
    assert len(ids) == 800
    for t in range(4):
        assert [i for i in ids if i.startswith(f"t{t}-")] == [f"t{t}-{i}" for i in range(200)]
    assert verify(reader, KEY).intact


def test_two_writers_on_one_database_make_one_chain(db: Path, reader: sqlite3.Connection) -> None:
    writers = [AuditWriter(lambda: open_db(db), KEY, batch_max=7) for _ in range(2)]
    for writer in writers:
        writer.start()
    for i in range(300):
        writers[i % 2].submit(entry(i))
    assert [w.close() for w in writers] == [0, 0]
    result = verify(reader, KEY)
    assert result.intact and result.count == 300


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_locked_database_makes_the_log_unavailable_until_it_is_free(
    db: Path, reader: sqlite3.Connection
) -> None:
    writer = AuditWriter(commits_counted(db, [], busy_ms=50), KEY, retry_max_s=0.05)
    writer.start()
    writer.submit(entry(0))
    assert writer.flush(5) and writer.available
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    for i in range(1, 51):
        writer.submit(entry(i))
    wait_until(lambda: not writer.available)
    assert writer.failure is not None and "locked" in writer.failure
    for i in range(51, 101):  # taken while it fails: they wait, in order
        writer.submit(entry(i))
    assert not writer.flush(0.2)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.flush(10)
    assert writer.available and writer.failure is None
    assert writer.close() == 0
    assert stored(reader) == [f"r{i}" for i in range(101)]
    assert verify(reader, KEY).intact


def test_a_full_disk_makes_the_log_unavailable_until_there_is_room(
    db: Path, reader: sqlite3.Connection
) -> None:
    pages = {"max": 1_000_000}

    def connect() -> sqlite3.Connection:
        conn = open_db(db)
        conn.execute(f"PRAGMA max_page_count = {pages['max']}")  # SQLite's own "disk full"
        return conn

    pages["max"] = reader.execute("PRAGMA page_count").fetchone()[0] + 1
    writer = AuditWriter(connect, KEY, retry_max_s=0.05)
    writer.start()
    writer.submit(entry(0, output_text="x" * 100_000))  # needs pages the "disk" lacks
    writer.submit(entry(1))
    wait_until(lambda: not writer.available)
    assert writer.failure is not None and "full" in writer.failure
    pages["max"] = 1_000_000  # room again
    assert writer.flush(10) and writer.available
    assert writer.close() == 0
    assert stored(reader) == ["r0", "r1"]
    assert verify(reader, KEY).intact


def test_a_failure_before_the_first_write_is_retried(db: Path, reader: sqlite3.Connection) -> None:
    fail = threading.Event()
    fail.set()

    def connect() -> sqlite3.Connection:
        if fail.is_set():
            raise sqlite3.OperationalError("unable to open database file")
        return open_db(db)

    writer = AuditWriter(connect, KEY, retry_max_s=0.05)
    writer.start()
    writer.submit(entry(0))
    wait_until(lambda: writer.failure is not None)
    assert not writer.available
    fail.clear()
    assert writer.close() == 0
    assert stored(reader) == ["r0"]


def test_closing_while_the_database_fails_says_what_was_lost(db: Path) -> None:
    def connect() -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    writer = AuditWriter(connect, KEY, retry_max_s=0.05)
    writer.start()
    for i in range(3):
        writer.submit(entry(i))
    assert writer.close(timeout_s=0.3) == 3


def test_a_long_backlog_makes_the_log_unavailable_and_refusals_are_capped(db: Path) -> None:
    writer = AuditWriter(lambda: open_db(db), KEY, backlog_max=5, backlog_cap=8)
    for i in range(5):  # not started: they wait
        writer.submit(entry(i))
    assert writer.backlog == 5 and not writer.available
    for i in range(5, 10):
        writer.submit(entry(i, refused=True))
    assert writer.backlog == 8 and writer.dropped == 2  # refusals past the cap are counted
    writer.submit(entry(10))  # an accepted request's record is never dropped
    assert writer.backlog == 9
    writer.start()
    assert writer.close() == 0 and writer.written == 9


def test_rows_hash_the_body_when_there_is_no_prompt_hash() -> None:
    row = as_row(entry(0, body=[b'{"a":', b"1}"]))
    assert row["input_kind"] == "body"
    assert row["input_sha256"] == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    tokens = as_row(entry(0, input_sha256="ab" * 32, input_kind="prompt", body=[b"ignored"]))
    assert (tokens["input_sha256"], tokens["input_kind"]) == ("ab" * 32, "prompt")
    text = as_row(entry(0, body=["é".encode()], body_text=True))
    assert text["prompt_text"] == "é" and as_row(entry(0, body=[b"x"]))["prompt_text"] is None
    odd = as_row(entry(0, ttft_s=float("nan"), prompt_tokens=1 << 70, e2e_s=0.1234567891))
    assert (odd["ttft_s"], odd["prompt_tokens"], odd["e2e_s"]) == (None, str(1 << 70), 0.123457)
