"""Bad input over HTTP: a 4xx in the OpenAI envelope naming the field; the server keeps serving.

In-process (tests/inprocess.py): none of these needs the model's real tokens."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL_ID
from tests.inprocess import scripted_server

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


CASES = [
    # (name, raw body or JSON, status, param)
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("non-utf8 bytes", b'{"model": "\xff\xfe", "messages": []}', 400, None),
    ("wrong type max_tokens", _with(max_tokens="ten"), 400, "max_tokens"),
    ("negative max_tokens", _with(max_tokens=-5), 400, "max_tokens"),
    ("huge max_tokens", _with(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens beyond context", _with(max_tokens=5000), 400, "max_tokens"),
    ("n > 1", _with(n=2), 400, "n"),
    ("empty messages", _with(messages=[]), 400, "messages"),
    ("unknown role", _with(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("messages not a list", _with(messages="hello"), 400, "messages"),
    ("temperature out of range", _with(temperature=7), 400, "temperature"),
    (
        "image part",
        _with(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        "messages[0].content",
    ),
    ("too many stops", _with(stop=["a"] * 40), 400, "stop"),
    ("missing model", {"messages": GOOD["messages"]}, 400, "model"),
    (
        "prompt beyond context",
        _with(messages=[{"role": "user", "content": "word " * 5000}]),
        400,
        "messages",
    ),
    (
        "invalid json schema",
        _with(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}),
        400,
        "response_format.json_schema.schema",
    ),
    (
        "schema keyword grammars cannot enforce",
        _with(
            response_format={
                "type": "json_schema",
                "json_schema": {"schema": {"type": "integer", "minimum": 3}},
            }
        ),
        400,
        "response_format.json_schema.schema",
    ),
    (
        "json_schema without a schema",
        _with(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "response_format.json_schema.schema",
    ),
    (
        "unknown response_format",
        _with(response_format={"type": "yaml"}),
        400,
        "response_format.type",
    ),
    (
        "tool without a name",
        _with(tools=[{"type": "function", "function": {"parameters": {"type": "object"}}}]),
        400,
        "tools[0].function.name",
    ),
    (
        "tool_choice names no tool",
        _with(
            tools=[{"type": "function", "function": {"name": "a"}}],
            tool_choice={"type": "function", "function": {"name": "b"}},
        ),
        400,
        "tool_choice",
    ),
    (
        "tool arguments not an object",
        _with(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "function": {"name": "a", "arguments": "[1]"}}],
                },
                {"role": "user", "content": "hi"},
            ]
        ),
        400,
        "messages[0].tool_calls[0].function.arguments",
    ),
    ("think on a model that does not reason", _with(think=True), 400, "think"),
    ("logit_bias key not a token id", _with(logit_bias={"hello": 1}), 400, "logit_bias"),
    ("logit_bias token outside vocab", _with(logit_bias={"999999": 1}), 400, "logit_bias"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_chat_request(name: str, body: object, status: int, param: str | None) -> None:
    async with scripted_server(model_id=MODEL_ID) as srv:
        http = srv.client
        if isinstance(body, bytes):
            response = await http.post(
                CHAT, content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await http.post(CHAT, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
        assert "Traceback" not in response.text
        assert (await http.post(CHAT, json=GOOD)).status_code == 200  # still serving


async def test_unknown_model_is_404() -> None:
    async with scripted_server(model_id=MODEL_ID) as srv:
        response = await srv.client.post(CHAT, json=_with(model="gpt-9"))
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


async def test_ten_megabyte_body_is_413() -> None:
    huge = (
        b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
    )
    async with scripted_server(model_id=MODEL_ID) as srv:
        response = await srv.client.post(
            CHAT, content=huge, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        assert (await srv.client.post(CHAT, json=GOOD)).status_code == 200


async def test_unknown_extra_fields_are_accepted() -> None:
    body = _with(user="u1", logit_bias={}, parallel_tool_calls=False, some_new_field={"a": 1})
    async with scripted_server(model_id=MODEL_ID) as srv:
        assert (await srv.client.post(CHAT, json=body)).status_code == 200


async def test_bad_completion_prompt() -> None:
    url = "/v1/completions"
    cases = [
        ({"model": MODEL_ID, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL_ID, "prompt": [10**9]}, "prompt"),
        ({"model": MODEL_ID, "prompt": ""}, "prompt"),
    ]
    async with scripted_server(model_id=MODEL_ID) as srv:
        for body, param in cases:
            response = await srv.client.post(url, json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param


OTHER_CASES = [
    # (name, path, body, status, field named in the error)
    ("embedding of nothing", "/v1/embeddings", {"model": MODEL_ID, "input": ""}, 400, "input"),
    ("token id inputs", "/v1/embeddings", {"model": MODEL_ID, "input": [1, 2]}, 400, "input"),
    (
        "embedding input too long",
        "/v1/embeddings",
        {"model": MODEL_ID, "input": ["ok", "word " * 3000]},
        400,
        "input[1]",
    ),
    (
        "unknown encoding",
        "/v1/embeddings",
        {"model": MODEL_ID, "input": "x", "encoding_format": "hex"},
        400,
        "encoding_format",
    ),
    (
        "ollama unknown format",
        "/api/chat",
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "format": "yaml"},
        400,
        "format",
    ),
    (
        "ollama invalid schema",
        "/api/generate",
        {"model": MODEL_ID, "prompt": "hi", "format": {"type": "nope"}},
        400,
        "format",
    ),
    (
        "ollama think without reasoning",
        "/api/generate",
        {"model": MODEL_ID, "prompt": "hi", "think": True},
        400,
        "think",
    ),
    (
        "ollama images",
        "/api/chat",
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
        400,
        "messages[0].images",
    ),
    (
        "ollama tool without a name",
        "/api/chat",
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"description": "x"}}],
        },
        400,
        "tools[0].function.name",
    ),
    (
        "ollama bad option",
        "/api/generate",
        {"model": MODEL_ID, "prompt": "hi", "options": {"top_p": 5}},
        400,
        "options.top_p",
    ),
    ("ollama unknown model", "/api/show", {"model": "nope"}, 404, None),
]


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "field"), OTHER_CASES, ids=[c[0] for c in OTHER_CASES]
)
async def test_bad_input_on_other_endpoints(
    name: str, path: str, body: object, status: int, field: str | None
) -> None:
    async with scripted_server(model_id=MODEL_ID) as srv:
        http = srv.client
        response = await http.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        if path.startswith("/api/"):
            assert isinstance(error, str) and (field is None or error.startswith(field)), error
        else:
            assert error["param"] == field and error["type"] == "invalid_request_error"
        # and the server still serves
        assert (await http.post(CHAT, json=GOOD)).status_code == 200
