"""The audit log's writer: a thread that numbers, chains and stores records, off the hot path.

The request path only calls `submit` (a queue put). The thread waits for a record, lets
`linger_s` (20 ms) pass so that those of the same moment join it, and writes what has queued,
up to `batch_max` records, in one transaction: BEGIN IMMEDIATE (the write lock), read the last
record's seq and MAC, chain the batch onto it, insert, commit. A commit's cost is mostly fixed
(~0.45 ms of CPU on the dev box, the WAL's fsync included, vs ~45 us a record in a batch), so
a busy server pays it once per batch, not per request. Reading the tail inside the lock keeps
one chain when several processes share the database.

When a write fails (disk full, the database locked past its busy timeout, an I/O error) the
batch stays at the head, `failure` says why, and the thread retries with a growing pause
(up to `retry_max_s`) until it succeeds; records submitted meanwhile wait in the queue, in
order. While `available` is False the server refuses new requests (`--audit-required`), so
what waits is bounded by the requests already accepted, plus the refusals themselves: those
are dropped, and counted, once more than `backlog_cap` records wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from edgellm.audit.chain import COLUMNS, FIELDS, GENESIS, TABLE, mac_of
from edgellm.errors import EdgeLLMError

log = logging.getLogger("edgellm.audit")

_INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_TAIL = f"SELECT seq, mac FROM {TABLE} ORDER BY seq DESC LIMIT 1"


@dataclass(slots=True)
class AuditEntry:
    """One API request as the server saw it; the writer numbers, hashes and chains it.
    Fields are those of `edgellm.audit.chain.FIELDS` (which documents them), but `seq` and
    `time`, which are given here as wall-clock seconds."""

    time: float  # wall clock seconds: when the request arrived
    request_id: str
    route: str
    method: str
    status: int
    key_name: str | None = None
    role: str | None = None
    client: str | None = None
    api: str | None = None
    model: str | None = None
    version: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    input_sha256: str | None = None  # None: the writer hashes `body` (input_kind "body")
    input_kind: str = "body"
    output_sha256: str | None = None
    prompt_text: str | None = None
    output_text: str | None = None
    body: list[bytes] = field(default_factory=list)  # the raw body's chunks, as received
    body_text: bool = False  # the prompt text is the body's (--audit-text, no prompt record)
    refused: bool = False  # refused because the log was unavailable: dropped past the cap


def utc_time(seconds: float) -> str:
    """Wall-clock seconds as records store them: ISO 8601, UTC, microseconds, "Z"."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


_ENTRY_FIELDS = tuple(f.name for f in fields(AuditEntry) if f.name in FIELDS)


def _plain(value: Any) -> Any:
    """A value SQLite stores and returns as it is (so the MAC checks again when read back)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if -(1 << 63) <= value < 1 << 63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # SQLite would store NaN as NULL
    return str(value)


def as_row(entry: AuditEntry) -> dict[str, Any]:
    """The record's fields but `seq` (blocking work: the body's hash; in the writer thread)."""
    row = {name: _plain(getattr(entry, name)) for name in _ENTRY_FIELDS}
    body = b"".join(entry.body)
    if entry.input_sha256 is None:
        row["input_sha256"], row["input_kind"] = hashlib.sha256(body).hexdigest(), "body"
    if entry.body_text and body:
        row["prompt_text"] = body.decode("utf-8", "replace")
    row["time"] = utc_time(entry.time)
    row["ttft_s"], row["e2e_s"] = _rounded(row["ttft_s"]), _rounded(row["e2e_s"])
    return row


def json_text(value: Any) -> str:
    """A prompt as records store it (--audit-text): JSON, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


class AuditWriter:
    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        key: bytes,
        *,
        batch_max: int = 512,
        linger_s: float = 0.02,
        retry_max_s: float = 2.0,
        backlog_max: int = 10_000,
        backlog_cap: int = 100_000,
    ):
        """`connect` opens the database (in the writer thread); a batch is written `linger_s`
        after its first record came (one commit, whose fsync costs ~0.5 ms of CPU here, for
        all that came meanwhile); `backlog_max` records waiting make the log unavailable too
        (the disk is too slow); past `backlog_cap` refusals are dropped."""
        self.connect = connect  # a seam: tests give one that fails
        self._key = key
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.retry_max_s = retry_max_s
        self.backlog_max = backlog_max
        self.backlog_cap = backlog_cap
        self.failure: str | None = None  # why the last write failed; None: writing works
        self._queue: queue.SimpleQueue[AuditEntry | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._submitted = 0
        self._done = 0  # written or dropped
        self.dropped = 0
        self.written = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """Records submitted and neither written nor dropped yet."""
        return self._submitted - self._done

    @property
    def available(self) -> bool:
        """Whether records are being written (new requests may be accepted)."""
        return self.failure is None and self.backlog < self.backlog_max

    def submit(self, entry: AuditEntry) -> None:
        """Queue a record (any thread; never blocks on the database)."""
        with self._lock:
            if entry.refused and self.backlog >= self.backlog_cap:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.error(
                        "audit log unavailable: %d refused requests not recorded", self.dropped
                    )
                return
            self._submitted += 1
        self._queue.put(entry)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgellm-audit", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written; False if `timeout_s` passed."""
        with self._lock:
            target = self._submitted
            return self._lock.wait_for(lambda: self._done >= target, timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        """Write what is queued (retrying for up to `timeout_s`) and stop. Returns how many
        records could not be written (logged as an error)."""
        thread = self._thread
        if thread is None:
            return self.backlog
        self._queue.put(None)
        thread.join(timeout_s)
        self._stop.set()  # stop retrying: the time is up
        thread.join(1.0)
        lost = self.backlog
        if lost:
            log.error("audit log: %d records could not be written (%s)", lost, self.failure)
        return lost

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        batch: list[dict[str, Any]] = []
        stopping = False
        pause = 0.01
        try:
            while not (stopping and not batch) and not self._stop.is_set():
                if batch or stopping:  # retrying, or writing the last ones: take no pause
                    stopping = self._take(batch, wait=False) or stopping
                else:
                    stopping = self._gather(batch)
                if not batch:
                    continue
                try:
                    conn = conn or self._open()
                    self._write(conn, batch)
                except Exception as exc:  # the disk, the lock, a reconnect's StoreError: retry
                    self._failed(conn, exc)
                    conn = None
                    self._stop.wait(pause)
                    pause = min(pause * 2, self.retry_max_s)
                    continue
                self._wrote(len(batch))
                batch.clear()
                pause = 0.01
        finally:
            if conn is not None:
                conn.close()

    def _gather(self, batch: list[dict[str, Any]]) -> bool:
        """Wait for a record, then `linger_s` for those of the same moment; returns whether
        the stop marker came."""
        if self._take(batch, wait=True):
            return True
        if self.linger_s > 0:
            self._stop.wait(self.linger_s)
        return self._take(batch, wait=False)

    def _take(self, batch: list[dict[str, Any]], *, wait: bool) -> bool:
        """Move queued records into `batch` (blocking for the first when `wait`), up to
        batch_max. Returns whether the stop marker came."""
        while len(batch) < self.batch_max:
            try:
                entry = self._queue.get() if wait else self._queue.get_nowait()
            except queue.Empty:
                return False
            wait = False
            if entry is None:
                return True
            try:
                batch.append(as_row(entry))
            except Exception:  # a bug must not stop the log: this one record is lost, said so
                log.exception("audit log: a record could not be prepared")
                self._wrote(1, dropped=True)
        return False

    def _open(self) -> sqlite3.Connection:
        conn = self.connect()
        conn.isolation_level = None  # transactions are this writer's own BEGIN / COMMIT
        return conn

    def _write(self, conn: sqlite3.Connection, batch: list[dict[str, Any]]) -> None:
        """Chain `batch` onto the last stored record and insert it, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            tail = conn.execute(_TAIL).fetchone()
            seq, prev = (int(tail[0]), str(tail[1])) if tail is not None else (0, GENESIS)
            values = []
            for row in batch:
                seq += 1
                row["seq"] = seq
                mac = mac_of(self._key, prev, row)
                values.append((*(row[name] for name in FIELDS), prev, mac))
                prev = mac
            conn.executemany(_INSERT, values)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _failed(self, conn: sqlite3.Connection | None, exc: Exception) -> None:
        """Note a failed write; the connection is dropped (the next try opens a new one)."""
        reason = (exc.message if isinstance(exc, EdgeLLMError) else str(exc)) or type(exc).__name__
        if self.failure is None:
            expected = isinstance(exc, sqlite3.Error | OSError | EdgeLLMError)
            log.error(
                "audit log cannot be written: %s; retrying (%d waiting)",
                reason,
                self.backlog,
                exc_info=None if expected else exc,
            )
        self.failure = reason
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _wrote(self, count: int, *, dropped: bool = False) -> None:
        if self.failure is not None and not dropped:
            log.warning("audit log written again after: %s", self.failure)
            self.failure = None
        with self._lock:
            if dropped:
                self.dropped += count
            else:
                self.written += count
            self._done += count
            self._lock.notify_all()
