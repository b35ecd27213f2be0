"""The audit trail: one audit record per API request, whatever its outcome.

Two halves of a request meet here. `AuditMiddleware`, just inside RequestIds, sees the HTTP
exchange: when it arrived, its method and path, the raw body as received, the status the
client got and whether the answer was sent in full. For a generation request the pipeline's
`Record` (through the record sink `AuditTrail.record`) adds what the exchange cannot see: the
model, tokens, finish reason, time to first output, and the hashes of the rendered prompt and of
the text the client got. A generation request's record is nearly always emitted before its
exchange ends (a stream's last event follows it); one whose generator is closed late (after a
client went away) comes just after. Either way, the second half to come, matched on request
id and client address, makes the entry, and the writer (`edgellm.audit.writer`) stores it
off the hot path. Other routes' entries are the exchange alone.

With `--audit-required` (the default), while the log cannot be written every audited request
is refused with 503 `audit_unavailable` (the refusals are recorded too, once the log is back),
except `/metrics`, which shows the operator what is wrong.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.audit.chain import authentic, last_row
from edgellm.audit.key import KEY_FILE, AuditKeyError, key_is_private, load_or_create_key
from edgellm.audit.writer import AuditEntry, AuditWriter, json_text
from edgellm.errors import AuditUnavailable, EdgeLLMError
from edgellm.home import home_dir
from edgellm.server.errors import send_error
from edgellm.server.keys import principal_of
from edgellm.server.pipeline import GENERATION_ROUTES, Record
from edgellm.server.request_id import client_of, request_id_of
from edgellm.store import db_path, open_db

log = logging.getLogger("edgellm.audit")

UNAUDITED = frozenset({"/", "/health", "/ready"})  # the open probes: not API requests
ALWAYS_SERVED = frozenset({"/metrics"})  # even while the log is down: it shows why
_ERROR = "audit_error"  # scope state key: the error a request was answered with
EXCHANGE_GRACE_S = 10.0  # how long an exchange waits for its record before it is written alone
RECORD_GRACE_S = 3600.0  # how long a record waits for its exchange (a slow reader's answer)

Key = tuple[str, str | None]  # (request id, client address)
T = TypeVar("T")


@dataclass(slots=True)
class Exchange:
    """One HTTP request and its answer, as the middleware saw them."""

    arrived: float  # wall clock seconds
    started: float  # monotonic seconds
    request_id: str
    client: str | None
    method: str
    route: str
    body: list[bytes] = field(default_factory=list)  # the raw body's chunks, as received
    status: int | None = None  # of the answer's start; None: no answer began
    complete: bool = False  # the answer's last byte was sent
    gone: bool = False  # the client disconnected
    refused: bool = False  # refused here: the log was unavailable
    ended: float = 0.0  # monotonic seconds
    key_name: str | None = None  # of the principal in scope once it ended; None: no auth
    role: str | None = None
    error: str | None = None  # the code (else class) of the error it was answered with

    @property
    def key(self) -> Key:
        return self.request_id, self.client

    @property
    def final_status(self) -> int:
        """What the client got: the status sent once the answer was complete, 499 when it
        went away first (or the answer broke off), 500 when no answer began."""
        if self.complete and self.status is not None:
            return self.status
        return 499 if self.gone or self.status is not None else 500


class _Waiting(dict[Key, deque[tuple[float, T]]]):
    """Halves waiting for their other half, by key, oldest first (FIFO per key: clients may
    reuse a request id)."""

    def put(self, key: Key, item: T, now: float) -> None:
        self.setdefault(key, deque()).append((now, item))

    def take(self, key: Key) -> T | None:
        items = self.get(key)
        if not items:
            return None
        _, item = items.popleft()
        if not items:
            del self[key]
        return item

    def expired(self, now: float, grace_s: float) -> list[T]:
        """Remove and return what has waited longer than `grace_s`, from the oldest keys."""
        out: list[T] = []
        while self:
            key = next(iter(self))
            items = self[key]
            while items and now - items[0][0] > grace_s:
                out.append(items.popleft()[1])
            if items:
                break
            del self[key]
        return out


class AuditTrail:
    """The server's side of the audit log: pairs exchanges with records, refuses requests
    while the log cannot be written (when required), hands entries to the writer."""

    def __init__(
        self,
        writer: AuditWriter,
        *,
        required: bool = True,
        with_text: bool = False,
        where: str = "",
    ):
        self.writer = writer
        self.where = where  # what the start-up line says about the log
        self.required = required
        self.with_text = with_text
        self._records: _Waiting[Record] = _Waiting()
        self._exchanges: _Waiting[Exchange] = _Waiting()
        self._written_alone: _Waiting[bool] = _Waiting()  # exchanges whose record came too late

    @classmethod
    def open(cls, *, required: bool = True, with_text: bool = False) -> AuditTrail:
        """The trail of the data directory's database and key (the key made on first use).
        Refuses a log whose key is missing or is not the one that wrote it."""
        key_path, db = home_dir() / KEY_FILE, db_path()
        conn = open_db(db)
        try:
            last = last_row(conn)
        finally:
            conn.close()
        if last is not None and not key_path.exists():
            raise AuditKeyError(
                f"the audit key {key_path} is missing but the audit log in {db} holds "
                f"{last['seq']} records: restore the key, or move the database aside"
            )
        key, _ = load_or_create_key(key_path)
        if last is not None and not authentic(key, last):
            raise AuditKeyError(
                f"the audit key {key_path} does not match the last record of the audit log in "
                f"{db}: another key, or the record was changed (run `edgellm audit verify`)"
            )
        if not key_is_private(key_path):
            log.warning("the audit key %s is readable by others: chmod 600 it", key_path)
        writer = AuditWriter(lambda: open_db(db), key)
        records = last["seq"] if last is not None else 0
        where = f"{db} ({records} records so far{', with text' if with_text else ''})"
        return cls(writer, required=required, with_text=with_text, where=where)

    def start(self) -> None:
        self.writer.start()
        if self.where:
            log.info("audit log: %s", self.where)

    def close(self, timeout_s: float = 10.0) -> int:
        """Write every half still waiting as it is, then the queue; returns the records lost."""
        for record in self._records.expired(float("inf"), -1.0):
            self._write_record_alone(record)
        for exchange in self._exchanges.expired(float("inf"), -1.0):
            self.writer.submit(self._entry(exchange))
        return self.writer.close(timeout_s)

    @property
    def available(self) -> bool:
        return self.writer.available

    @property
    def accepting(self) -> bool:
        """Whether requests are taken (the log is written, or it need not be)."""
        return not self.required or self.writer.available

    def refusing(self, path: str) -> bool:
        return self.required and path not in ALWAYS_SERVED and not self.writer.available

    def begin(self, scope: Scope) -> Exchange:
        return Exchange(
            time.time(),
            time.monotonic(),
            request_id_of(scope),
            client_of(scope),
            str(scope.get("method", "")),
            str(scope.get("path", "")),
        )

    def on_error(self, scope: Scope, exc: EdgeLLMError, recorded: bool) -> None:
        """The error observer: note what a request was answered with, for its entry."""
        state = scope.get("state")
        if isinstance(state, dict):
            state[_ERROR] = exc.code or type(exc).__name__

    def record(self, record: Record) -> None:
        """The record sink: a generation request's record, to pair with its exchange."""
        if record.route not in GENERATION_ROUTES:
            return  # not an HTTP request (the in-process chat)
        now = time.monotonic()
        self._expire(now)
        key = (record.request_id, record.client)
        exchange = self._exchanges.take(key)
        if exchange is not None:
            self.writer.submit(self._entry(exchange, record))
        elif self._written_alone.take(key):
            log.warning("audit: the record of request %s came too late", record.request_id)
        else:
            self._records.put(key, record, now)

    def answered(self, exchange: Exchange, scope: Scope) -> None:
        """The middleware's half, once the answer ended (however it ended)."""
        now = exchange.ended = time.monotonic()
        self._expire(now)
        principal = principal_of(scope)
        if principal is not None:
            exchange.key_name, exchange.role = principal.name, principal.role
        error = (scope.get("state") or {}).get(_ERROR)
        exchange.error = error if isinstance(error, str) else None
        record = None
        if exchange.route in GENERATION_ROUTES:
            record = self._records.take(exchange.key)
            if record is None:  # its generator is closed later: wait for the record
                self._exchanges.put(exchange.key, exchange, now)
                return
        self.writer.submit(self._entry(exchange, record))

    def _expire(self, now: float) -> None:
        for record in self._records.expired(now, RECORD_GRACE_S):
            self._write_record_alone(record)
        for exchange in self._exchanges.expired(now, EXCHANGE_GRACE_S):
            self._written_alone.put(exchange.key, True, now)
            self.writer.submit(self._entry(exchange))
        self._written_alone.expired(now, RECORD_GRACE_S)

    def _entry(self, exchange: Exchange, record: Record | None = None) -> AuditEntry:
        entry = AuditEntry(
            time=exchange.arrived,
            request_id=exchange.request_id,
            route=exchange.route,
            method=exchange.method,
            status=exchange.final_status,
            key_name=exchange.key_name,
            role=exchange.role,
            client=exchange.client,
            api=_api(exchange.route),
            error=exchange.error,
            e2e_s=exchange.ended - exchange.started,
            body=exchange.body,
            body_text=self.with_text,
            refused=exchange.refused,
        )
        if record is not None:
            _add_record(entry, record, exchange.started, with_text=self.with_text)
        return entry

    def _write_record_alone(self, record: Record) -> None:
        """A record whose exchange never came (should not happen): what it says, alone."""
        exchange = Exchange(
            record.created, record.started, record.request_id, record.client, "POST", record.route
        )
        exchange.status, exchange.complete = record.status, True
        exchange.ended = record.ended or record.started
        self.writer.submit(self._entry(exchange, record))


def _api(path: str) -> str | None:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    return None


def _add_record(entry: AuditEntry, record: Record, started: float, *, with_text: bool) -> None:
    """What the pipeline's record says about a generation request, into its entry."""
    entry.status = record.status
    if record.key is not None:
        entry.key_name, entry.role = record.key, record.role
    entry.model, entry.version = record.model or None, record.version or None
    entry.finish_reason = record.finish_reason
    entry.error = record.error_code or record.error or entry.error
    entry.prompt_tokens = record.prompt_tokens
    entry.cached_tokens = record.cached_tokens
    entry.completion_tokens = record.completion_tokens
    if record.first_output is not None:
        entry.ttft_s = record.first_output - started
    entry.output_sha256 = record.output_sha256
    if record.input_sha256 is not None:  # tokenized: the prompt's hash, not the body's
        entry.input_sha256, entry.input_kind, entry.body = record.input_sha256, "prompt", []
    if with_text and record.prompt is not None:
        entry.prompt_text, entry.body_text = json_text(record.prompt), False
    if with_text:
        entry.output_text = record.output


class AuditMiddleware:
    """Pure ASGI, just inside RequestIds: every audited request's exchange, to the trail."""

    def __init__(self, app: ASGIApp, trail: AuditTrail):
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUDITED:
            await self.app(scope, receive, send)
            return
        exchange = self.trail.begin(scope)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    exchange.body.append(chunk)
            elif message["type"] == "http.disconnect":
                exchange.gone = True
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                exchange.complete = True
            await send(message)

        try:
            if self.trail.refusing(scope["path"]):
                exchange.refused = True
                await send_error(scope, refused(), sending)
            else:
                await self.app(scope, receiving, sending)
        finally:
            self.trail.answered(exchange, scope)


def refused() -> AuditUnavailable:
    return AuditUnavailable(
        "the audit log cannot be written, so this server takes no requests until it can "
        "(--audit-required); retry later"
    )
