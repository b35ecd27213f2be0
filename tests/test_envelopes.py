"""Error envelopes, in-process: one table over (route family x error class) checks the exact
shape each API's clients parse, for errors raised by routes, by middleware (body limit, API
key) and in the middle of a stream."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, ScriptedServer, scripted_server

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Family:
    name: str
    path: str
    body: dict[str, Any]  # a valid request
    ollama: bool
    streams: bool = True

    def with_(self, **changes: Any) -> dict[str, Any]:
        return {**self.body, **changes}


FAMILIES = [
    Family("openai chat", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, False),
    Family("openai completions", "/v1/completions", {"model": MODEL, "prompt": "hi"}, False),
    Family("openai embeddings", "/v1/embeddings", {"model": MODEL, "input": "hi"}, False, False),
    Family("ollama chat", "/api/chat", {"model": MODEL, "messages": MESSAGES}, True),
    Family("ollama generate", "/api/generate", {"model": MODEL, "prompt": "hi"}, True),
    Family("ollama embed", "/api/embed", {"model": MODEL, "input": "hi"}, True, False),
]


@dataclass(frozen=True)
class Case:
    """An error: how to cause it on a family, and what its envelope must say."""

    name: str
    body: Callable[[Family], bytes]
    status: int
    type: str
    param: str | None
    code: str | None
    message: str  # a part of the message
    settings: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


def _json(f: Family, **changes: Any) -> bytes:
    return json.dumps(f.with_(**changes)).encode()


def _bad_field(f: Family) -> bytes:
    if f.ollama:
        return _json(f, keep_alive=[1])
    return _json(f, encoding_format="hex") if f.streams is False else _json(f, temperature=7)


def _bad_field_param(f: Family) -> str:
    if f.ollama:
        return "keep_alive"
    return "encoding_format" if f.streams is False else "temperature"


CASES = [
    Case("invalid json", lambda f: b'{"model": ', 400, "invalid_request_error", None,
         "invalid_json", "not valid JSON"),
    Case("unknown model", lambda f: _json(f, model="nope"), 404, "invalid_request_error",
         "model", "model_not_found", "The model 'nope' does not exist"),
    Case("missing model", lambda f: json.dumps({k: v for k, v in f.body.items()
                                                 if k != "model"}).encode(),
         400, "invalid_request_error", "model", "invalid_value", "this field is required"),
    Case("body over the limit (middleware)", lambda f: _json(f, pad="x" * 4096), 413,
         "invalid_request_error", None, "body_too_large", "request body exceeds 2048 bytes",
         settings={"max_body_bytes": 2048}),
    Case("no API key (middleware)", lambda f: _json(f), 401, "authentication_error", None,
         "invalid_api_key", "no API key", settings={"api_key": "sesame"}),
    Case("wrong API key (middleware)", lambda f: _json(f), 401, "authentication_error", None,
         "invalid_api_key", "the API key is not valid", settings={"api_key": "sesame"},
         headers={"authorization": "Bearer nope"}),
]  # fmt: skip


def _check(f: Family, case: Case, status: int, body: Any, param: str | None) -> None:
    assert status == case.status, body
    if f.ollama:
        assert set(body) == {"error"}, body
        assert isinstance(body["error"], str)
        assert case.message in body["error"], body
        if param:
            assert body["error"].startswith(f"{param}: "), body
        return
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert case.message in error["message"], body
    assert (error["type"], error["param"], error["code"]) == (case.type, param, case.code), body


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
async def test_error_envelope(family: Family, case: Case) -> None:
    settings = ServerSettings(**(case.settings or {}))
    async with scripted_server(settings) as srv:
        response = await srv.client.post(
            family.path,
            content=case.body(family),
            headers={"content-type": "application/json", **(case.headers or {})},
        )
        _check(family, case, response.status_code, response.json(), case.param)
        if case.status == 401:
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
async def test_bad_field_names_the_field(family: Family) -> None:
    case = Case("bad field", _bad_field, 400, "invalid_request_error", None, "invalid_value", "")
    async with scripted_server() as srv:
        response = await srv.client.post(family.path, content=_bad_field(family))
        _check(family, case, response.status_code, response.json(), _bad_field_param(family))


GENERATING = [f for f in FAMILIES if f.streams]


@pytest.mark.parametrize("family", GENERATING, ids=lambda f: f.name)
async def test_context_overflow(family: Family) -> None:
    long = "word " * 200  # 1,000 scripted tokens; a sequence holds 512
    if "messages" in family.body:
        body, param = family.with_(messages=[{"role": "user", "content": long}]), "messages"
    else:
        body, param = family.with_(prompt=long), "prompt"
    case = Case("overflow", _json, 400, "invalid_request_error", None,
                "context_length_exceeded", "the context is 512 tokens")  # fmt: skip
    async with scripted_server() as srv:
        response = await srv.client.post(family.path, json=body)
        _check(family, case, response.status_code, response.json(), param)


@pytest.mark.parametrize("family", GENERATING, ids=lambda f: f.name)
async def test_engine_failure_before_the_answer(family: Family) -> None:
    """A backend that raises: a non-streaming request gets a 500 that says nothing more."""
    case = Case("engine", _json, 500, "server_error", None, None, "internal server error")
    async with scripted_server() as srv:
        srv.runner.fail_with = RuntimeError("the backend broke")
        response = await srv.client.post(family.path, json=family.with_(stream=False))
        _check(family, case, response.status_code, response.json(), None)
        assert "the backend broke" not in response.text  # a library's text is never shown
        later = await srv.client.post(family.path, json=family.with_(stream=False))
        down = Case("down", _json, 503, "server_error", None, "engine_down", "engine stopped")
        _check(family, down, later.status_code, later.json(), None)


def _last_event(family: Family, text: str) -> Any:
    if family.ollama:
        return json.loads(text.strip().splitlines()[-1])
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    return json.loads(events[-2])


@pytest.mark.parametrize("family", GENERATING, ids=lambda f: f.name)
async def test_engine_failure_mid_stream(family: Family) -> None:
    """After the stream began (200 sent), the error is an event in the API's own shape."""
    case = Case("engine", _json, 200, "server_error", None, None, "internal engine error")
    async with scripted_server() as srv:
        response, _ = await _fail_after_first_token(srv, family)
        _check(family, case, response.status_code, _last_event(family, response.text), None)
        assert srv.records[-1].error == "EngineError"


async def _fail_after_first_token(srv: ScriptedServer, family: Family) -> tuple[Any, int]:
    """Stream a request whose backend raises once its first token was written."""
    runner = srv.runner
    calls = 0
    execute = runner.execute

    def failing_later(work: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # prefill + first token, then a decode step raises
            raise RuntimeError("the backend broke")
        return execute(work)

    runner.execute = failing_later  # type: ignore[method-assign]
    try:
        body = family.with_(stream=True)
        body |= {"options": {"num_predict": 8}} if family.ollama else {"max_tokens": 8}
        response = await srv.client.post(family.path, json=body)
    finally:
        runner.execute = execute  # type: ignore[method-assign]
    return response, calls


ROUTING = [
    ("GET", "/nope", 404, "not_found_error", "Not Found"),
    ("GET", "/v1/chat/completions", 405, "invalid_request_error", "Method Not Allowed"),
    ("GET", "/api/chat", 405, "invalid_request_error", "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "status", "type_", "message"), ROUTING)
async def test_routing_errors(
    method: str, path: str, status: int, type_: str, message: str
) -> None:
    async with scripted_server() as srv:
        response = await srv.client.request(method, path)
    assert response.status_code == status
    family = Family("routing", path, {}, path.startswith("/api/"))
    case = Case("routing", _json, status, type_, None, None, message)
    _check(family, case, status, response.json(), None)
    if status == 405:
        assert response.headers["allow"] == "POST"
