"""The SIGTERM / SIGINT drain: in-process through the app's drain object (a scripted runner, no
model), then real `edgellm serve` processes and real signals with the default model."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from edgellm.server.drain import INFERENCE_PATHS, Drain, cut_off
from tests.conftest import MODEL_ID, ServerProcess, openai_client
from tests.inprocess import MODEL, ScriptedServer, TextRunner, scripted_server

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": MESSAGES},
    "/v1/completions": {"model": MODEL, "prompt": "hi"},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
    "/api/chat": {"model": MODEL, "messages": MESSAGES},
    "/api/generate": {"model": MODEL, "prompt": "hi"},
    "/api/embed": {"model": MODEL, "input": "hi"},
    "/api/embeddings": {"model": MODEL, "prompt": "hi"},
}


def drain_of(srv: ScriptedServer) -> Drain:
    drain: Drain = srv.app.state.drain
    return drain


def slow_runner() -> TextRunner:
    return TextRunner(n_ctx=2048, seq_cells=512, eos_at=None, step_s=0.01)


def in_flight(srv: ScriptedServer, max_tokens: int) -> list[asyncio.Task[httpx.Response]]:
    """An OpenAI stream, an Ollama stream and a whole OpenAI answer, started."""
    ollama = {"model": MODEL, "messages": MESSAGES, "options": {"num_predict": max_tokens}}
    return [
        asyncio.create_task(srv.chat(stream=True, max_tokens=max_tokens)),
        asyncio.create_task(srv.client.post("/api/chat", json=ollama)),
        asyncio.create_task(srv.chat(max_tokens=max_tokens)),
    ]


async def decoding(srv: ScriptedServer, n: int) -> None:
    """Return once `n` requests are in flight and the engine is stepping."""
    await asyncio.to_thread(srv.runner.stepping.wait, 10)
    deadline = time.monotonic() + 10
    while drain_of(srv).in_flight < n:
        assert time.monotonic() < deadline, f"{drain_of(srv).in_flight} in flight, not {n}"
        await asyncio.sleep(0.005)


def sse_events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line]
    return [json.loads(line) for line in lines if line != "[DONE]"]


pytestmark = pytest.mark.anyio


async def test_draining_refuses_inference_on_both_apis_and_turns_ready_503() -> None:
    assert set(BODIES) == INFERENCE_PATHS
    async with scripted_server() as srv:
        assert (await srv.client.get("/ready")).status_code == 200
        drain_of(srv).begin()
        ready = await srv.client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "draining" and ready.json()["in_flight"] == 0
        assert (await srv.client.get("/health")).status_code == 200  # alive
        assert (await srv.client.get("/v1/models")).status_code == 200  # not inference
        for path, body in BODIES.items():
            answer = await srv.client.post(path, json=body)
            assert answer.status_code == 503, path
            assert answer.headers["retry-after"].isdigit()
            assert "x-request-id" in answer.headers
            if path.startswith("/api/"):
                assert set(answer.json()) == {"error"} and "shutting down" in answer.json()["error"]
            else:
                error = answer.json()["error"]
                assert (error["code"], error["type"]) == ("draining", "server_unavailable")
        metrics = (await srv.client.get("/metrics")).text
        assert f'edgellm_requests_rejected_total{{reason="draining"}} {len(BODIES)}.0' in metrics
    assert srv.runner.batches == []  # refused before any work


async def test_requests_in_flight_run_to_completion() -> None:
    async with scripted_server(runner=slow_runner()) as srv:
        tasks = in_flight(srv, max_tokens=40)
        await decoding(srv, 3)
        drain = drain_of(srv)
        started = time.monotonic()
        draining = asyncio.create_task(drain.run(10))
        await asyncio.sleep(0)
        assert (await srv.chat()).status_code == 503  # a new one, meanwhile
        assert (await srv.client.get("/ready")).json()["in_flight"] == 3
        openai_stream, ollama_stream, whole = await asyncio.gather(*tasks)
        assert await draining == 0
        assert time.monotonic() - started < 5
    events = sse_events(openai_stream.text)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in e for e in events)
    lines = [json.loads(line) for line in ollama_stream.text.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "length"
    served = [r.finish_reason for r in srv.records if r.error_code != "draining"]
    assert served == ["length"] * 3


async def test_the_drain_timeout_ends_what_is_left_with_an_error() -> None:
    async with scripted_server(runner=slow_runner()) as srv:
        tasks = in_flight(srv, max_tokens=300)  # 300 steps of 10 ms: far beyond the timeout
        await decoding(srv, 3)
        started = time.monotonic()
        assert await drain_of(srv).run(0.3) == 3
        elapsed = time.monotonic() - started
        openai_stream, ollama_stream, whole = await asyncio.gather(*tasks)
        metrics = (await srv.client.get("/metrics")).text
    assert 0.3 <= elapsed < 1.5
    assert 'reason="draining"' not in metrics  # failures, not refusals
    assert openai_stream.status_code == 200 and openai_stream.text.endswith("data: [DONE]\n\n")
    events = sse_events(openai_stream.text)
    assert events[-1]["error"]["code"] == "draining"  # the last event
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    last = json.loads(ollama_stream.text.splitlines()[-1])
    assert set(last) == {"error"} and "shut down" in last["error"]
    assert whole.status_code == 503 and whole.headers["retry-after"].isdigit()
    assert whole.json()["error"]["code"] == "draining"
    assert sorted(r.status for r in srv.records) == [200, 200, 503]
    for record in srv.records:
        assert (record.error, record.finish_reason) == ("DrainTimeout", "error")
        assert record.completion_tokens > 0 and record.prompt_tokens > 0  # counts kept


async def test_a_request_submitted_after_the_cut_off_is_refused() -> None:
    """One that passed the gate and was still being prepared when the drain timed out."""
    async with scripted_server() as srv:
        srv.app.state.pipeline.interrupt(cut_off)
        answer = await srv.chat()
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "draining"
    assert [r.error for r in srv.records] == ["DrainTimeout"]


async def test_an_idle_drain_ends_at_once() -> None:
    async with scripted_server() as srv:
        assert (await srv.chat()).status_code == 200
        started = time.monotonic()
        assert await drain_of(srv).run(30) == 0
        assert time.monotonic() - started < 0.1


# -- real processes, real signals --------------------------------------------------------------

# a prompt the model answers at length; ignore_eos keeps every stream going to max_tokens
TALK = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def sse_stream(base: str, max_tokens: int, opened: threading.Barrier) -> list[dict[str, Any]]:
    """One chat stream's events, read with httpx; waits at `opened` after the first text."""
    body = {
        "model": MODEL_ID,
        "messages": TALK,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", base + "/v1" + "/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == 2:
                    opened.wait(30)
    return events


def first_503(base: str, deadline_s: float) -> float:
    """When /ready first answers 503 (monotonic), polling over one kept-alive connection."""
    with httpx.Client(base_url=base, timeout=5) as client:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if client.get("/ready").status_code == 503:
                return time.monotonic()
    raise AssertionError("/ready never answered 503")


@pytest.fixture
def drained() -> Iterator[list[ServerProcess]]:
    """Servers a test starts, killed at its end if a test failed before they exited."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.log.close()


def serve(servers: list[ServerProcess], *args: str) -> ServerProcess:
    # one llama.cpp thread: on a busy 2-core box two threads wait at every barrier for a
    # descheduled sibling (a step took seconds, measured); one keeps streams flowing
    server = ServerProcess("--ctx", "4096", "--threads", "1", *args)
    servers.append(server)
    return server


def exit_code(server: ServerProcess, within_s: float) -> tuple[int, float]:
    """The process's exit status and how long it took to exit from now."""
    started = time.monotonic()
    try:
        code = server.proc.wait(within_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {within_s} s: {server.output()}") from None
    return code, time.monotonic() - started


@pytest.mark.model
def test_sigterm_drains_four_streams_then_exits_0(drained: list[ServerProcess]) -> None:
    server = serve(drained, "--parallel", "4", "--drain-timeout", "60")
    opened = threading.Barrier(5)
    results: list[Any] = [None] * 4

    def stream(i: int) -> None:
        with openai_client(server) as client:
            chunks = client.chat.completions.create(
                model=MODEL_ID,
                messages=TALK,  # type: ignore[arg-type]
                max_tokens=200,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            got = []
            for chunk in chunks:
                got.append(chunk)
                if len(got) == 2:
                    opened.wait(30)
            results[i] = got

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    opened.wait(60)  # all four are streaming
    poller = httpx.Client(base_url=server.base, timeout=5)
    assert poller.get("/ready").status_code == 200  # connection open before the signal
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    while (ready := poller.get("/ready")).status_code == 200:
        assert time.monotonic() - signalled < 5
    ready_after = time.monotonic() - signalled
    poller.close()
    assert ready.json()["status"] == "draining"
    refused = httpx.post(server.base + "/v1/chat/completions", json={"model": MODEL_ID})
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
    assert refused.json()["error"]["code"] == "draining"
    assert httpx.get(server.base + "/health").status_code == 200
    code, took = exit_code(server, 60)
    for t in threads:
        t.join(5)
    assert code == 0, server.output()
    assert ready_after < 0.1, ready_after
    for got in results:
        assert got is not None and got[-1].choices[0].finish_reason == "length"
        assert sum(len(c.choices[0].delta.content or "") for c in got) > 0
    log = server.output()
    assert "draining: 4 requests in flight, up to 60 s" in log
    assert "every request finished" in log
    print(f"/ready 503 after {ready_after * 1000:.0f} ms; exit {took:.1f} s after the drain began")


@pytest.mark.model
def test_a_short_drain_timeout_ends_streams_with_an_error_event(
    drained: list[ServerProcess],
) -> None:
    server = serve(drained, "--parallel", "2", "--drain-timeout", "1")
    opened = threading.Barrier(3)
    results: list[list[dict[str, Any]]] = [[], []]

    def stream(i: int) -> None:
        results[i] = sse_stream(server.base, 1500, opened)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    opened.wait(60)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code, _ = exit_code(server, 10)
    took = time.monotonic() - signalled
    for t in threads:
        t.join(5)
    assert code == 0, server.output()
    assert 1 <= took < 5, took
    for events in results:
        assert events[-1]["error"]["code"] == "draining", events[-1]
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert "2 requests ended with an error" in server.output()
    print(f"exit {took:.1f} s after the signal (drain timeout 1 s)")


@pytest.mark.model
def test_a_second_signal_exits_at_once(drained: list[ServerProcess]) -> None:
    server = serve(drained, "--parallel", "1")
    opened = threading.Barrier(2)
    cut: list[BaseException] = []

    def stream() -> None:
        try:
            sse_stream(server.base, 1500, opened)
        except httpx.HTTPError as exc:  # the process died under it, as it should
            cut.append(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    opened.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    first_503(server.base, 5)  # draining
    server.proc.send_signal(signal.SIGINT)
    code, took = exit_code(server, 5)
    assert code == 128 + signal.SIGINT, server.output()
    assert took < 1, took
    assert "second SIGINT: exiting now" in server.output()
    thread.join(5)
    assert cut, "the stream was not cut off"
    print(f"exit {took * 1000:.0f} ms after the second signal")


@pytest.mark.model
def test_nothing_in_flight_exits_promptly(drained: list[ServerProcess]) -> None:
    server = serve(drained)
    assert httpx.get(server.base + "/v1/models").status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    code, took = exit_code(server, 10)
    assert code == 0, server.output()
    assert took < 1, took
    assert "draining: 0 requests in flight" in server.output()
    print(f"exit {took * 1000:.0f} ms after the signal")
