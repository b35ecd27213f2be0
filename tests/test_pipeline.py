"""The request pipeline, in-process: one final record per generation request however it
ends, the model table changing while serving, queue-full answers, a broken record sink."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from edgellm.server.lifecycle import ModelTable
from edgellm.server.models import name_keys
from edgellm.server.pipeline import Record
from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, TextRunner, scripted_model, scripted_server

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


async def test_one_record_per_request_with_counts_and_timings() -> None:
    async with scripted_server() as srv:
        plain = await srv.chat(max_tokens=3)
        assert plain.status_code == 200
        streamed = await srv.chat(max_tokens=3, stream=True)
        assert streamed.status_code == 200
        ollama = await srv.client.post(
            "/api/generate", json={"model": f"{MODEL}:latest", "prompt": "hi", "stream": False}
        )
        assert ollama.status_code == 200
    first, second, third = srv.records
    assert (first.api, first.route, first.model, first.stream) == ("openai", CHAT, MODEL, False)
    assert first.request_id in plain.json()["id"]
    usage = plain.json()["usage"]
    assert (first.prompt_tokens, first.completion_tokens) == (usage["prompt_tokens"], 3)
    assert (first.status, first.finish_reason, first.error) == (200, "length", None)
    assert second.stream and second.cached_tokens > 0  # the same prompt again: prefix reused
    assert (third.api, third.route, third.model) == ("ollama", "/api/generate", MODEL)
    for record in srv.records:
        assert record.ttft_s is not None and record.e2e_s is not None
        assert 0 <= record.ttft_s <= record.e2e_s


async def test_failed_requests_are_recorded_with_their_status() -> None:
    async with scripted_server() as srv:
        assert (await srv.chat(model="nope")).status_code == 404  # refused by the route
        too_long = [{"role": "user", "content": "x" * 2000}]
        assert (await srv.chat(messages=too_long)).status_code == 400
        srv.runner.fail_with = RuntimeError("broken")
        assert (await srv.chat()).status_code == 500
        wire = await srv.client.post(CHAT, json={"model": MODEL})  # refused before the pipeline
        assert wire.status_code == 400
    unknown, overflow, broken, refused = srv.records
    # refused before the pipeline (by the route, by the wire model): recorded all the same,
    # with the model unknown and nothing submitted
    for record, status in ((unknown, 404), (refused, 400)):
        assert (record.status, record.model, record.submitted) == (status, "", None)
        assert record.api == "openai" and record.route == CHAT and record.request_id
    assert unknown.error_code == "model_not_found"
    assert (overflow.status, overflow.error_code) == (400, "context_length_exceeded")
    assert overflow.prompt_tokens > 512  # the prompt it refused, counted
    assert (broken.status, broken.error, broken.finish_reason) == (500, "EngineError", "error")


async def test_a_stream_that_fails_after_it_began_keeps_its_200() -> None:
    async with scripted_server() as srv:
        srv.runner.fail_with = RuntimeError("broken")
        response = await srv.chat(stream=True)
        assert response.status_code == 200 and "internal engine error" in response.text
    (record,) = srv.records
    assert (record.status, record.error, record.finish_reason) == (200, "EngineError", "error")


async def test_ollama_timings_start_when_the_request_is_queued() -> None:
    """prompt_eval_duration counts from submission, not from rendering (as before)."""
    async with scripted_server() as srv:
        body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        answer = (await srv.client.post("/api/generate", json=body)).json()
    (record,) = srv.records
    assert record.submitted is not None and record.e2e_s is not None
    assert answer["total_duration"] <= (record.ended - record.started) * 1e9  # type: ignore[operator]
    assert answer["total_duration"] >= (record.ended - record.submitted) * 1e9 - 1  # type: ignore[operator]


async def test_a_broken_sink_does_not_break_requests(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Record) -> None:
        raise ValueError("sink failed")

    async with scripted_server(sinks=[broken]) as srv:
        assert (await srv.chat()).status_code == 200
        assert (await srv.chat()).status_code == 200
    assert len(srv.records) == 2
    assert "a record sink failed" in caplog.text


async def test_queue_full_gets_503_with_retry_after() -> None:
    """(Moved from the real-server tests: one request running, one waiting, the third is
    refused, on both APIs.)"""
    runner = TextRunner(n_ctx=1024, seq_cells=1024, step_s=0.02)
    async with scripted_server(runner=runner, parallel=1, max_queue=1) as srv:
        first = [asyncio.create_task(srv.chat(max_tokens=100)) for _ in range(2)]
        await asyncio.to_thread(runner.stepping.wait, 10)  # one running, one waiting
        third = await srv.chat(max_tokens=100)
        ollama = await srv.client.post(
            "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert third.status_code == 503
        assert third.headers["retry-after"].isdigit()
        assert third.json()["error"]["code"] == "queue_full"
        assert [(await f).status_code for f in first] == [200, 200]
    assert ollama.status_code == 503 and ollama.headers["retry-after"].isdigit()
    assert set(ollama.json()) == {"error"} and "waiting" in ollama.json()["error"]


async def test_the_model_table_changes_while_serving() -> None:
    async with scripted_server() as srv:
        table: ModelTable = srv.app.state.models
        assert (await srv.chat(model=f"{MODEL}:latest")).status_code == 200
        assert (await srv.chat(model=f"{MODEL}:v2")).status_code == 404
        table.add(srv.model, tag="v2")
        assert (await srv.chat(model=f"{MODEL}:v2")).status_code == 200
        listed = [m["id"] for m in (await srv.client.get("/v1/models")).json()["data"]]
        assert listed == [MODEL, f"{MODEL}:v2"]  # each served name
        assert table.remove(MODEL) is srv.model
        assert (await srv.chat()).status_code == 404
        assert (await srv.chat(model=f"{MODEL}:v2")).status_code == 200
        table.remove(f"{MODEL}:v2")
        assert (await srv.client.get("/v1/models")).json()["data"] == []
        assert (await srv.client.get("/api/tags")).json()["models"] == []


def test_names_and_tags() -> None:
    assert name_keys("m") == [("m", "latest")]
    assert name_keys("m:latest") == [("m:latest", "latest"), ("m", "latest")]
    assert name_keys("m:q4") == [("m:q4", "latest"), ("m", "q4")]
    table = ModelTable([scripted_model(TextRunner())])
    assert table.lookup("scripted:latest") is table.lookup("scripted")
    with pytest.raises(Exception, match="does not exist"):
        table.lookup("scripted:other")


def test_settings_reach_the_in_process_app() -> None:
    """The seam takes the same settings as a served process (used by the envelope table)."""
    assert ServerSettings(api_key="k").api_key == "k"


async def test_every_answer_carries_a_request_id() -> None:
    """X-Request-Id: the client's own when sane (echoed, in OpenAI's `id` and the record), a
    new one otherwise; error answers from middleware and routes carry it too."""
    async with scripted_server(ServerSettings(max_body_bytes=2048)) as srv:
        mine = await srv.client.post(
            CHAT,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-request-id": "trace-42.a:b"},
        )
        again = await srv.chat(stream=True)
        bad = await srv.client.post(
            "/api/generate",
            json={"model": MODEL, "prompt": "hi", "stream": False},
            headers={"x-request-id": 'no spaces or "quotes" allowed'},
        )
        too_large = await srv.client.post(CHAT, content=b"x" * 4096)
        health = await srv.client.get("/health")
    assert mine.headers["x-request-id"] == "trace-42.a:b"
    assert mine.json()["id"] == "chatcmpl-trace-42.a:b"
    assert srv.records[0].request_id == "trace-42.a:b"
    assert again.headers["x-request-id"] == srv.records[1].request_id
    assert f"chatcmpl-{srv.records[1].request_id}" in again.text
    generated = bad.headers["x-request-id"]
    assert len(generated) == 32 and generated == srv.records[2].request_id
    assert too_large.status_code == 413 and len(too_large.headers["x-request-id"]) == 32
    assert len(health.headers["x-request-id"]) == 32


async def test_clients_may_reuse_a_request_id() -> None:
    """The engine's own ids stay unique: two requests under one X-Request-Id both succeed."""
    async with scripted_server() as srv:
        same = {"x-request-id": "same"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        answers = await asyncio.gather(
            *(srv.client.post(CHAT, json=body, headers=same) for _ in range(3))
        )
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [r.request_id for r in srv.records] == ["same"] * 3


async def test_a_dead_engine_fails_everyone_fast_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend step that raises kills the engine: every request in flight ends with an
    error at once, /health and /ready answer 503 with the reason, and later requests on
    either API are refused at once (503, engine_down) instead of hanging."""
    runner = TextRunner(n_ctx=2048, seq_cells=512, step_s=0.01)
    async with scripted_server(runner=runner) as srv:
        streams = [asyncio.create_task(srv.chat(stream=True, max_tokens=200)) for _ in range(3)]
        plain = asyncio.create_task(srv.chat(max_tokens=200))
        await asyncio.to_thread(runner.stepping.wait, 10)
        await asyncio.sleep(0.1)  # all four are decoding
        runner.fail_with = RuntimeError("the backend broke")
        started = time.monotonic()
        answers = await asyncio.gather(*streams, plain)
        assert time.monotonic() - started < 1.0
        for streamed in answers[:3]:
            assert streamed.status_code == 200 and "internal engine error" in streamed.text
        assert answers[3].status_code == 500
        health, ready = await srv.client.get("/health"), await srv.client.get("/ready")
        assert health.status_code == 503 and "RuntimeError" in health.text
        assert ready.status_code == 503 and ready.json()["status"] == "error"
        started = time.monotonic()
        later = await srv.chat()
        ollama = await srv.client.post(
            "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert time.monotonic() - started < 1.0
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_down"
    assert ollama.status_code == 503 and "engine stopped" in ollama.json()["error"]
    assert "the backend broke" not in health.text + later.text  # the log has it, not clients
    assert [r.error for r in srv.records].count("EngineError") == 4
    # the server's log has the cause once, with its traceback
    tracebacks = [r for r in caplog.records if r.exc_info and "backend broke" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]


async def test_records_name_the_key_and_hash_input_and_output() -> None:
    async with scripted_server(ServerSettings(api_key="sk-one")) as srv:
        headers = {"Authorization": "Bearer sk-one"}
        answer = await srv.chat(headers=headers)
        streamed = await srv.chat(headers=headers, stream=True)
        refused = await srv.chat(headers=headers, temperature=7)
    assert (answer.status_code, streamed.status_code, refused.status_code) == (200, 200, 400)
    plain, stream, wire = srv.records
    text = answer.json()["choices"][0]["message"]["content"]
    assert plain.output_sha256 == hashlib.sha256(text.encode()).hexdigest()
    pieces = [
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert stream.output_sha256 == hashlib.sha256("".join(pieces).encode()).hexdigest()
    assert plain.input_sha256 == stream.input_sha256 and len(plain.input_sha256 or "") == 64
    for record in (plain, stream, wire):
        assert (record.key, record.role) == ("api-key", "admin")
    assert wire.input_sha256 is None and wire.output_sha256 is None
