"""The audit trail in-process (the real app, pipeline, writer and SQLite file around a scripted
runner): one record per API request, whatever its outcome, with the key, status, tokens and
hashes; text only with --audit-text; a database that cannot be written refuses new requests
with 503 until it can, and loses none of the records it took."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.audit.chain import Row, rows, verify
from edgellm.audit.key import KEY_FILE, AuditKeyError, read_key
from edgellm.audit.writer import AuditWriter
from edgellm.server.audit import AuditTrail, Exchange
from edgellm.server.keys import Principal
from edgellm.server.pipeline import Record
from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, VERSION, ScriptedServer, as_keys, scripted_server

pytestmark = pytest.mark.anyio

ALICE = Principal("alice", "user")
ADMIN = Principal("ops", "admin")
KEYS = {"sk-alice": ALICE, "sk-ops": ADMIN}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    return tmp_path


def audit_of(srv: ScriptedServer) -> AuditTrail:
    trail: AuditTrail = srv.app.state.audit
    return trail


def records(home: Path) -> list[Row]:
    conn = sqlite3.connect(home / "edgellm.db")
    try:
        return list(rows(conn))
    finally:
        conn.close()


def intact(home: Path) -> bool:
    conn = sqlite3.connect(home / "edgellm.db")
    try:
        return verify(conn, read_key(home / KEY_FILE)).intact
    finally:
        conn.close()


def sse_text(response: httpx.Response) -> str:
    """What a streaming client got: reasoning then content of each delta, in order."""
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                delta = choice.get("delta", {})
                text += (delta.get("reasoning_content") or "") + (delta.get("content") or "")
    return text


async def test_every_api_request_gets_one_record_with_its_fields(home: Path) -> None:
    async with scripted_server() as srv:
        as_keys(srv.app, KEYS)
        sent: dict[str, httpx.Response] = {}
        bad_body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}
        )

        async def call(
            ident: str, method: str, path: str, key: str | None = "sk-alice", **kw: Any
        ) -> None:
            headers = {"X-Request-Id": ident, **(bearer(key) if key else {})}
            sent[ident] = await srv.client.request(method, path, headers=headers, **kw)

        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        await call("served", "POST", "/v1/chat/completions", json=chat)
        await call("streamed", "POST", "/v1/chat/completions", json={**chat, "stream": True})
        await call(
            "ollama",
            "POST",
            "/api/chat",
            json={**chat, "stream": False, "options": {"num_predict": 3}},
        )
        await call("invalid", "POST", "/v1/chat/completions", content=bad_body)
        await call("no-model", "POST", "/api/generate", json={"model": "nope", "prompt": "x"})
        await call("listing", "GET", "/v1/models")
        await call("embedding", "POST", "/v1/embeddings", json={"model": MODEL, "input": "hi"})
        await call("metrics", "GET", "/metrics", key="sk-ops")
        await call("no-route", "GET", "/v1/nothing")
        for probe in ("/", "/health", "/ready"):
            assert (await srv.client.get(probe)).status_code == 200
        assert audit_of(srv).writer.flush()
        pipeline = {r.request_id: r for r in srv.records}
    by_id = {r["request_id"]: r for r in records(home)}
    assert sorted(by_id) == sorted(sent)  # one each, and none for the probes
    assert len(records(home)) == len(sent)
    expected = {
        "served": (200, "openai", "length"),
        "streamed": (200, "openai", "length"),
        "ollama": (200, "ollama", "length"),
        "invalid": (400, "openai", "error"),
        "no-model": (404, "ollama", "error"),
        "listing": (200, "openai", None),
        "embedding": (200, "openai", None),
        "metrics": (200, None, None),
        "no-route": (404, "openai", None),
    }
    for ident, (status, api, finish_reason) in expected.items():
        record = by_id[ident]
        assert (record["status"], record["api"], record["finish_reason"]) == (
            status,
            api,
            finish_reason,
        ), ident
        assert sent[ident].status_code == status
        assert record["key_name"] == ("ops" if ident == "metrics" else "alice")
        assert record["role"] == ("admin" if ident == "metrics" else "user")
        assert record["client"] == "127.0.0.1:123"
        assert record["time"].endswith("Z") and record["e2e_s"] >= 0
        assert record["prompt_text"] is None and record["output_text"] is None
    served, streamed = by_id["served"], by_id["streamed"]
    text = sent["served"].json()["choices"][0]["message"]["content"]
    assert served["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert (
        streamed["output_sha256"] == hashlib.sha256(sse_text(sent["streamed"]).encode()).hexdigest()
    )
    for ident in ("served", "streamed", "ollama"):
        record = by_id[ident]
        assert (record["model"], record["version"], record["method"]) == (MODEL, VERSION, "POST")
        assert record["input_kind"] == "prompt"
        assert record["input_sha256"] == pipeline[ident].input_sha256
        assert record["prompt_tokens"] == pipeline[ident].prompt_tokens > 0
        assert record["completion_tokens"] == pipeline[ident].completion_tokens > 0
        assert 0 <= record["ttft_s"] <= record["e2e_s"]
    ollama_text = sent["ollama"].json()["message"]["content"]
    assert by_id["ollama"]["output_sha256"] == hashlib.sha256(ollama_text.encode()).hexdigest()
    invalid = by_id["invalid"]  # refused before it was tokenized: the raw body's hash
    assert (invalid["input_kind"], invalid["error"]) == ("body", "invalid_value")
    assert invalid["input_sha256"] == hashlib.sha256(bad_body.encode()).hexdigest()
    assert invalid["output_sha256"] is None and invalid["model"] is None
    assert by_id["no-model"]["error"] == "model_not_found"
    listing = by_id["listing"]
    assert listing["input_sha256"] == hashlib.sha256(b"").hexdigest() and listing["method"] == "GET"
    assert listing["prompt_tokens"] is None and listing["finish_reason"] is None
    assert by_id["no-route"]["error"] == "RouteNotFound"
    assert intact(home)


async def test_requests_refused_by_the_key_check_are_recorded(home: Path) -> None:
    async with scripted_server(ServerSettings(api_key="sk-right")) as srv:
        for ident, path in (("chat", "/v1/chat/completions"), ("models", "/api/tags")):
            headers = {"X-Request-Id": ident, **bearer("sk-wrong")}
            method = "POST" if ident == "chat" else "GET"
            body = b'{"model": "x"}' if ident == "chat" else None
            answer = await srv.client.request(method, path, headers=headers, content=body)
            assert answer.status_code == 401
        ok = await srv.chat(headers={"X-Request-Id": "ok", **bearer("sk-right")})
        assert ok.status_code == 200
        assert audit_of(srv).writer.flush()
    by_id = {r["request_id"]: r for r in records(home)}
    assert len(by_id) == 3 == len(records(home))
    for ident in ("chat", "models"):
        record = by_id[ident]
        assert (record["status"], record["key_name"], record["error"]) == (
            401,
            None,
            "invalid_api_key",
        )
    assert by_id["chat"]["input_sha256"] == hashlib.sha256(b'{"model": "x"}').hexdigest()
    assert (by_id["ok"]["key_name"], by_id["ok"]["role"]) == ("api-key", "admin")


async def test_audit_text_keeps_the_prompt_and_output(home: Path) -> None:
    settings = ServerSettings(audit_text=True)
    async with scripted_server(settings) as srv:
        answer = await srv.chat(
            headers={"X-Request-Id": "t"}, messages=[{"role": "user", "content": "héllo"}]
        )
        await srv.client.post(
            "/v1/embeddings", json={"model": MODEL, "input": "émbed"}, headers={"X-Request-Id": "e"}
        )
        assert audit_of(srv).writer.flush()
    by_id = {r["request_id"]: r for r in records(home)}
    text = answer.json()["choices"][0]["message"]["content"]
    assert json.loads(by_id["t"]["prompt_text"]) == [{"role": "user", "content": "héllo"}]
    assert by_id["t"]["output_text"] == text
    assert "émbed" in by_id["e"]["prompt_text"]  # a non-generation request: its body


def locked(home: Path, trail: AuditTrail) -> sqlite3.Connection:
    """Another connection holding the write lock; the writer waits 50 ms for it, not 5 s."""

    def connect() -> sqlite3.Connection:  # the database is there: open_db's migrations done
        conn = sqlite3.connect(home / "edgellm.db", check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 50")
        return conn

    trail.writer.connect, trail.writer.retry_max_s = connect, 0.05
    blocker = sqlite3.connect(home / "edgellm.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


async def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    import anyio

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await anyio.sleep(0.01)


async def test_a_log_that_cannot_be_written_refuses_requests_until_it_can(home: Path) -> None:
    async with scripted_server() as srv:
        trail = audit_of(srv)
        blocker = locked(home, trail)
        first = await srv.chat(headers={"X-Request-Id": "before"})  # taken: the log looked fine
        assert first.status_code == 200
        await wait_until(lambda: not trail.available)
        refused = await srv.chat(headers={"X-Request-Id": "refused-openai"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "audit_unavailable"
        ollama = await srv.client.get("/api/tags", headers={"X-Request-Id": "refused-ollama"})
        assert ollama.status_code == 503 and "audit log" in ollama.json()["error"]
        assert (await srv.client.get("/metrics", headers={"X-Request-Id": "m"})).status_code == 200
        ready = await srv.client.get("/ready")
        assert ready.status_code == 503 and ready.json()["audit"] == "unavailable"
        blocker.execute("ROLLBACK")
        blocker.close()
        await wait_until(lambda: trail.available)
        after = await srv.chat(headers={"X-Request-Id": "after"})
        assert after.status_code == 200
        assert (await srv.client.get("/ready")).status_code == 200
        assert trail.writer.flush()
    ids = [r["request_id"] for r in records(home)]
    assert ids == ["before", "refused-openai", "refused-ollama", "m", "after"]
    statuses = {r["request_id"]: (r["status"], r["error"]) for r in records(home)}
    assert statuses["refused-openai"] == (503, "audit_unavailable")
    assert intact(home)


async def test_without_audit_required_requests_are_served_and_recorded_later(home: Path) -> None:
    async with scripted_server(ServerSettings(audit_required=False)) as srv:
        trail = audit_of(srv)
        blocker = locked(home, trail)
        assert (await srv.chat(headers={"X-Request-Id": "a"})).status_code == 200
        await wait_until(lambda: not trail.available)
        assert (await srv.chat(headers={"X-Request-Id": "b"})).status_code == 200
        assert (await srv.client.get("/ready")).status_code == 200
        blocker.execute("ROLLBACK")
        blocker.close()
        assert trail.writer.flush()
    assert [r["request_id"] for r in records(home)] == ["a", "b"]


async def test_no_audit_writes_nothing(home: Path) -> None:
    async with scripted_server(ServerSettings(audit=False)) as srv:
        assert srv.app.state.audit is None
        assert (await srv.chat()).status_code == 200
    assert not (home / KEY_FILE).exists()


async def test_a_log_whose_key_is_missing_or_another_is_refused(home: Path) -> None:
    async with scripted_server() as srv:
        assert (await srv.chat()).status_code == 200
    (home / KEY_FILE).unlink()
    with pytest.raises(AuditKeyError, match=r"missing but the audit log .* holds 1 records"):
        async with scripted_server():
            pass
    (home / KEY_FILE).write_bytes(b"x" * 32)
    with pytest.raises(AuditKeyError, match="does not match the last record"):
        async with scripted_server():
            pass


class Collected(AuditWriter):
    """A writer that keeps what it is given (for the pairing's own tests)."""

    def __init__(self) -> None:
        super().__init__(lambda: sqlite3.connect(":memory:"), b"k" * 32)
        self.entries: list[Any] = []

    def submit(self, entry: Any) -> None:
        self.entries.append(entry)


def _exchange(ident: str) -> Exchange:
    return Exchange(
        time.time(), time.monotonic(), ident, "1.2.3.4:5", "POST", "/v1/chat/completions"
    )


def _record(ident: str) -> Record:
    record = Record(ident, "openai", "/v1/chat/completions", MODEL, True, client="1.2.3.4:5")
    record.status, record.finish_reason, record.completion_tokens = 499, "abort", 3
    return record


def test_a_record_that_comes_after_its_exchange_still_pairs() -> None:
    writer = Collected()
    trail = AuditTrail(writer)
    exchange = _exchange("late")
    exchange.status = 200  # a stream whose client left: the answer began, never ended
    trail.answered(exchange, {"state": {}})
    assert writer.entries == []  # waiting for the record
    trail.record(_record("late"))
    (entry,) = writer.entries
    assert (entry.status, entry.finish_reason, entry.completion_tokens) == (499, "abort", 3)


def test_reused_request_ids_pair_in_order_and_halves_left_alone_are_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = Collected()
    trail = AuditTrail(writer)
    first, second = _record("same"), _record("same")
    first.completion_tokens, second.completion_tokens = 1, 2
    trail.record(first)
    trail.record(second)
    trail.answered(_exchange("same"), {"state": {}})
    trail.answered(_exchange("same"), {"state": {}})
    assert [e.completion_tokens for e in writer.entries] == [1, 2]
    alone = _exchange("lonely")
    trail.answered(alone, {"state": {}})
    now = time.monotonic() + 60
    monkeypatch.setattr(time, "monotonic", lambda: now)
    trail.answered(_exchange("other"), {"state": {}})  # a later call writes the one left waiting
    assert writer.entries[2].request_id == "lonely"
    trail.record(_record("lonely"))  # its record, too late: not a second entry for it
    assert [e.request_id for e in writer.entries] == ["same", "same", "lonely"]
    trail.close(0.1)
    assert [e.request_id for e in writer.entries][-1] == "other"
