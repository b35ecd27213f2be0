"""`edgellm bench`'s client on hand-written server responses (an httpx transport as the seam)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx

from edgellm.bench.client import Reply, send
from edgellm.bench.stats import RequestRecord


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + "\n\n"


USAGE = "data: " + json.dumps(
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
)


class Body(httpx.AsyncByteStream):
    def __init__(self, parts: list[str], fail_after: bool = False):
        self.parts = parts
        self.fail_after = fail_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            await asyncio.sleep(0.01)
            yield part.encode()
        if self.fail_after:
            raise httpx.ReadError("connection reset by peer")


def run(handler: Callable[[httpx.Request], httpx.Response]) -> Reply:
    async def go() -> Reply:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, "http://x/v1/chat/completions", {}, RequestRecord(0, 0.0))

    return asyncio.run(go())


def sse(parts: list[str], fail_after: bool = False) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _req: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Body(parts, fail_after)
    )


def test_times_each_text_chunk_and_reads_usage() -> None:
    reply = run(
        sse(
            [
                ": ping\n\n",
                chunk("a"),
                chunk(""),
                chunk("b"),
                chunk("c"),
                USAGE + "\n\n",
                "data: [DONE]\n\n",
            ]
        )
    )
    r = reply.record
    assert r.ok and reply.text == "abc"
    assert (r.input_tokens, r.output_tokens) == (7, 3)
    assert r.ttft is not None and r.e2e is not None and 0 < r.ttft < r.e2e
    assert len(r.itls) == 2 and all(gap > 0.005 for gap in r.itls)
    assert r.tpot is not None and r.tpot > 0


def test_counts_chunks_when_the_server_sends_no_usage() -> None:
    r = run(sse([chunk("a"), chunk("b"), "data: [DONE]\n\n"])).record
    assert r.ok and r.output_tokens == 2 and r.input_tokens is None


def test_http_errors_keep_the_status_and_the_message() -> None:
    envelope = {"error": {"message": "The model 'nope' does not exist", "type": "x"}}
    r = run(lambda _req: httpx.Response(404, json=envelope)).record
    assert (r.error, r.detail) == ("http_404", "The model 'nope' does not exist")
    assert r.e2e is None and r.ttft is None
    r = run(lambda _req: httpx.Response(503, text="busy")).record
    assert (r.error, r.detail) == ("http_503", "busy")


def test_an_error_event_mid_stream_is_a_server_error() -> None:
    event = "data: " + json.dumps({"error": {"message": "out of memory"}}) + "\n\n"
    r = run(sse([chunk("a"), event])).record
    assert (r.error, r.detail) == ("server_error", "out of memory")
    assert r.e2e is None and r.ttft is not None  # the first token did arrive


def test_broken_and_garbled_streams() -> None:
    r = run(sse([chunk("a")], fail_after=True)).record
    assert r.error == "stream" and "reset" in (r.detail or "")
    r = run(sse(["data: {not json\n\n"])).record
    assert r.error == "stream" and "not JSON" in (r.detail or "")
    r = run(sse(["data: [DONE]\n\n"])).record
    assert r.error == "empty"


def test_connection_refused_and_timeout() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=req)

    assert run(refuse).record.error == "connect"
    assert run(slow).record.error == "timeout"
