"""Every bound on a request (edgellm.server.limits, the guard's, the grammar's) and the request
deadline, in-process: a request past a bound is a 400 naming the field on both APIs, then a
normal request is served; a request at the bound is served; a request past the deadline ends
with its text so far and finish reason "length".

The table runs against a server whose bounds are set small (what an operator's settings do);
the 10,000-deep body and the exploding pattern run against the defaults.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, ScriptedServer, TextRunner, scripted_server

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
SMALL = ServerSettings(
    max_messages=3,
    max_message_chars=50,
    max_request_chars=80,
    max_content_parts=2,
    max_tools=2,
    max_tool_schema_chars=200,
    max_tool_calls=1,
    max_json_depth=8,
    max_json_objects=40,
    max_stop_strings=2,
    max_stop_chars=5,
    max_logit_bias=2,
    max_embed_inputs=3,
    max_prompt_token_ids=10,
    max_grammar_bytes=2048,
)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def ollama(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": HI,
        "stream": False,
        "options": {"num_predict": 2},
        **fields,
    }


def generate(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "stream": False, **fields}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def tool(name: str = "f", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = parameters or {"type": "object", "properties": {"a": {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


def nested(depth: int) -> Any:
    """Lists nested `depth` deep: [[...[]...]]."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


CALL = {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}] * 2}
BIG_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20)}}
SCHEMA = "response_format.json_schema.schema"
# a pattern repeated under a long property name: the grammar spells the name out per repeat
LONG_NAME = {
    "type": "object",
    "properties": {"x" * 100: {"type": "string", "pattern": "^(ab){0,50}$"}},
}

# (bound, path, body, param) on the SMALL server: each one a 400 naming `param`
PAST = [
    ("messages", CHAT, chat(messages=[user("a")] * 4), "messages"),
    ("messages", "/api/chat", ollama(messages=[user("a")] * 4), "messages"),
    ("message chars", CHAT, chat(messages=[user("a" * 51)]), "messages[0].content"),
    ("message chars", "/api/chat", ollama(messages=[user("a" * 51)]), "messages[0].content"),
    (
        "message chars in parts",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a" * 51}]}]),
        "messages[0].content",
    ),
    ("prompt chars", "/v1/completions", {"model": MODEL, "prompt": "a" * 51}, "prompt"),
    ("prompt chars", "/v1/completions", {"model": MODEL, "prompt": ["a" * 51]}, "prompt[0]"),
    ("prompt chars", "/api/generate", generate(prompt="a" * 51), "prompt"),
    ("system chars", "/api/generate", generate(system="a" * 51), "system"),
    ("request chars", CHAT, chat(messages=[user("a" * 41), user("a" * 40)]), "messages"),
    ("request chars", "/api/chat", ollama(messages=[user("a" * 41), user("a" * 40)]), "messages"),
    ("request chars", "/api/generate", generate(prompt="a" * 41, system="a" * 40), "prompt"),
    (
        "content parts",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 3}]),
        "messages[0].content",
    ),
    ("tools", CHAT, chat(tools=[tool("a"), tool("b"), tool("c")]), "tools"),
    ("tools", "/api/chat", ollama(tools=[tool("a"), tool("b"), tool("c")]), "tools"),
    ("tool schema", CHAT, chat(tools=[tool("a", BIG_SCHEMA)]), "tools[0].function.parameters"),
    (
        "tool schema",
        "/api/chat",
        ollama(tools=[tool(), tool("b", BIG_SCHEMA)]),
        "tools[1].function.parameters",
    ),
    ("tool calls", CHAT, chat(messages=[CALL, *HI]), "messages[0].tool_calls"),
    (
        "tool calls",
        "/api/chat",
        ollama(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}] * 2}]),
        "messages[0].tool_calls",
    ),
    ("body depth", CHAT, chat(extra=nested(8)), "extra" + "[0]" * 7),
    ("body depth", "/api/chat", ollama(extra={"a": nested(7)}), "extra.a" + "[0]" * 6),
    (
        "tool arguments depth",
        CHAT,
        chat(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "1", "function": {"name": "f", "arguments": json.dumps(nested(9))}}
                    ],
                },
                *HI,
            ]
        ),
        "messages[0].tool_calls[0].function.arguments",
    ),
    ("body objects", CHAT, chat(extra=[{}] * 41), None),
    ("body objects", "/api/generate", generate(extra=[{}] * 41), None),
    ("stop strings", CHAT, chat(stop=["a", "b", "c"]), "stop"),
    (
        "stop strings",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "stop": ["a"] * 3},
        "stop",
    ),
    ("stop strings", "/api/chat", ollama(stop=["a", "b", "c"]), "stop"),
    ("stop strings", "/api/generate", generate(options={"stop": ["a"] * 3}), "options.stop"),
    ("stop chars", CHAT, chat(stop="abcdef"), "stop"),
    ("stop chars", CHAT, chat(stop=["a", "abcdef"]), "stop[1]"),
    ("stop chars", "/api/chat", ollama(options={"stop": ["abcdef"]}), "options.stop[0]"),
    ("logit_bias", CHAT, chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias"),
    (
        "logit_bias",
        "/api/generate",
        generate(options={"logit_bias": {"1": 1, "2": 1, "3": 1}}),
        "options.logit_bias",
    ),
    ("logit_bias key", CHAT, chat(logit_bias={"a": 1}), "logit_bias"),
    ("logit_bias value", "/api/chat", ollama(logit_bias={"1": 101}), "logit_bias"),
    ("embed inputs", "/v1/embeddings", {"model": MODEL, "input": ["a"] * 4}, "input"),
    ("embed inputs", "/api/embed", {"model": MODEL, "input": ["a"] * 4}, "input"),
    ("embed chars", "/v1/embeddings", {"model": MODEL, "input": ["a", "a" * 51]}, "input[1]"),
    ("embed chars", "/api/embed", {"model": MODEL, "input": "a" * 51}, "input"),
    ("embed chars", "/api/embeddings", {"model": MODEL, "prompt": "a" * 51}, "prompt"),
    ("embed request chars", "/api/embed", {"model": MODEL, "input": ["a" * 41] * 2}, "input"),
    ("token ids", "/v1/completions", {"model": MODEL, "prompt": list(range(11))}, "prompt"),
    ("token ids", "/api/generate", generate(context=list(range(11))), "context"),
    (
        "grammar",
        CHAT,
        chat(response_format=schema_format(LONG_NAME)),
        "response_format.json_schema.schema",
    ),
    ("grammar", "/api/chat", ollama(format=LONG_NAME), "format"),
    (
        "grammar of a forced tool call",
        CHAT,
        chat(tools=[tool("f", LONG_NAME)], tool_choice="required"),
        "tools",
    ),
]


def assert_refused(response: httpx.Response, param: str | None) -> str:
    """A 400 naming `param` in its API's envelope; returns the message."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if isinstance(error, str):  # Ollama's: "param: message"
        assert param is None or error.startswith(param + ":"), error
        return error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return str(error["message"])


async def assert_serving(srv: ScriptedServer, path: str) -> None:
    if path.startswith("/api/"):
        response = await srv.client.post("/api/chat", json=ollama())
    else:
        response = await srv.client.post(CHAT, json=chat())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("bound", "path", "body", "param"), PAST, ids=[f"{c[0]} {c[1]}" for c in PAST]
)
async def test_past_a_bound_is_a_400_naming_the_field(
    bound: str, path: str, body: Any, param: str | None
) -> None:
    async with scripted_server(SMALL) as srv:
        message = assert_refused(await srv.client.post(path, json=body), param)
        if bound.startswith("grammar"):  # refused before a grammar exists
            assert "max_grammar_bytes" in message, message
        await assert_serving(srv, path)


AT = [
    (CHAT, chat(messages=[user("a" * 40), user("a" * 40), user("")])),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 2}])),
    ("/api/chat", ollama(messages=[user("a" * 50)], tools=[tool("a"), tool("b")])),
    (CHAT, chat(stop=["abcde", "b"], logit_bias={"1": 1, "2": -1}, extra=nested(7))),
    ("/api/generate", generate(options={"stop": ["abcde", "b"]}, context=list(range(1, 9)))),
    ("/v1/embeddings", {"model": MODEL, "input": ["a" * 40, "a" * 40]}),
    ("/api/embed", {"model": MODEL, "input": ["a"] * 3}),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(1, 11)), "max_tokens": 2}),
]


@pytest.mark.parametrize(("path", "body"), AT, ids=[f"{i} {c[0]}" for i, c in enumerate(AT)])
async def test_at_the_bounds_is_served(path: str, body: Any) -> None:
    runner = TextRunner(n_ctx=4096, seq_cells=2048, eos_at=None)  # room for two tools' text
    async with scripted_server(SMALL, runner=runner) as srv:
        response = await srv.client.post(path, json=body)
        assert response.status_code == 200, response.text


async def test_a_raised_bound_admits_more() -> None:
    """The defaults refuse 17 stop strings; an operator's max_stop_strings=20 takes them."""
    stops = [f"s{i}" for i in range(17)]
    async with scripted_server() as srv:
        assert_refused(await srv.chat(stop=stops), "stop")
    async with scripted_server(ServerSettings(max_stop_strings=20)) as srv:
        assert (await srv.chat(stop=stops)).status_code == 200


@pytest.mark.parametrize("path", [CHAT, "/api/chat"])
async def test_a_body_nested_10000_deep(path: str) -> None:
    """Too deep for Python's own parser (it gives up at ~1000 without saying where): the body
    is scanned for the field; 64 levels is the default."""
    body = (
        b'{"model": "scripted", "stream": false, "messages": '
        + b"[" * 10_000
        + b"]" * 10_000
        + b"}"
    )
    async with scripted_server() as srv:
        started = time.monotonic()
        response = await srv.client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert time.monotonic() - started < 1
        message = assert_refused(response, "messages" + "[0]" * 63)
        assert "64 levels" in message
        await assert_serving(srv, path)


def exploding_pattern_schema(name_chars: int = 10_000) -> dict[str, Any]:
    """A 10 kB schema whose grammar is 10 MB: the converter writes `(ab){0,1000}` as 1000
    references to a rule named after the property (measured: 0.06 s, 10,066,119 bytes)."""
    pattern = {"type": "string", "pattern": "^(ab){0,1000}$"}
    return {"type": "object", "properties": {"x" * name_chars: pattern}}


async def test_a_pattern_that_explodes_a_grammar_is_refused_before_it_is_built() -> None:
    schema = exploding_pattern_schema()
    cases = [
        (CHAT, chat(response_format=schema_format(schema)), "response_format.json_schema.schema"),
        ("/api/generate", generate(format=schema), "format"),
        (CHAT, chat(tools=[tool("f", schema)], tool_choice="required"), "tools"),
    ]
    settings = ServerSettings(max_tool_schema_chars=1 << 20)
    async with scripted_server(settings) as srv:
        for path, body, param in cases:
            started = time.monotonic()
            message = assert_refused(await srv.client.post(path, json=body), param)
            assert time.monotonic() - started < 0.5
            assert f"over {256 << 10} bytes (max_grammar_bytes" in message, message
            assert "(10000 characters)" in message  # the 10 kB name is not echoed back
        await assert_serving(srv, CHAT)


async def test_the_grammar_bound_is_a_setting() -> None:
    """A small schema passes the default bound (reaching the grammar compiler, which the
    scripted runner lacks) and is refused under a tighter one."""
    schema = exploding_pattern_schema(name_chars=10)
    body = chat(response_format=schema_format(schema))
    async with scripted_server() as srv:
        message = assert_refused(await srv.client.post(CHAT, json=body), SCHEMA)
        assert "no grammars" in message
    async with scripted_server(ServerSettings(max_grammar_bytes=4096)) as srv:
        message = assert_refused(await srv.client.post(CHAT, json=body), SCHEMA)
        assert "max_grammar_bytes" in message


# -- the request deadline -----------------------------------------------------------------

DEADLINE_S = 0.5
STEP_S = 0.02  # one token per step: ~25 tokens fit in the deadline


def slow_runner() -> TextRunner:
    return TextRunner(n_ctx=2048, seq_cells=512, eos_at=None, step_s=STEP_S)


def _events(text: str) -> list[dict[str, Any]]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines.pop() == "[DONE]"
    return [json.loads(line) for line in lines]


async def test_past_the_deadline_a_request_ends_with_its_text_and_length() -> None:
    settings = ServerSettings(request_timeout=DEADLINE_S)
    async with scripted_server(settings, runner=slow_runner()) as srv:
        started = time.monotonic()
        whole = await srv.chat(max_tokens=300)
        took = time.monotonic() - started
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["choices"][0]["finish_reason"] == "length"
        text = body["choices"][0]["message"]["content"]
        assert 0 < body["usage"]["completion_tokens"] < 300
        assert len(text) == body["usage"]["completion_tokens"]  # one letter per token
        assert DEADLINE_S <= took < DEADLINE_S + 1.5

        streamed = await srv.chat(max_tokens=300, stream=True)
        events = _events(streamed.text)
        assert not [e for e in events if "error" in e]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        pieces = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert 0 < len(pieces) < 300

        for stream in (False, True):
            reply = await srv.client.post(
                "/api/chat", json={**ollama(options={"num_predict": 300}), "stream": stream}
            )
            last = json.loads(reply.text.splitlines()[-1])
            assert last["done"] and last["done_reason"] == "length", reply.text
            assert 0 < last["eval_count"] < 300

        normal = await srv.chat(max_tokens=3)  # within the deadline: all its tokens
        assert normal.json()["usage"]["completion_tokens"] == 3
        reasons = [(r.status, r.finish_reason, r.completion_tokens < 300) for r in srv.records]
        assert reasons[:4] == [(200, "length", True)] * 4


async def test_the_deadline_counts_from_arrival_including_the_queue() -> None:
    """With one sequence, the second request waits behind the first; both end at the
    deadline (the second perhaps with no token at all), neither with an error."""
    settings = ServerSettings(request_timeout=DEADLINE_S)
    async with scripted_server(settings, runner=slow_runner(), parallel=1) as srv:
        started = time.monotonic()
        first, second = await asyncio.gather(srv.chat(max_tokens=300), srv.chat(max_tokens=300))
        assert time.monotonic() - started < DEADLINE_S + 1.5
        for reply in (first, second):
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["finish_reason"] == "length"
        assert (await srv.chat(max_tokens=2)).status_code == 200
