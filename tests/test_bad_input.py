"""Bad input over HTTP: a 4xx in the OpenAI envelope naming the field; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL_ID, ServerProcess

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
def test_bad_chat_request(
    server: ServerProcess, name: str, body: object, status: int, param: str | None
) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as http:
        if isinstance(body, bytes):
            response = http.post(CHAT, content=body, headers={"content-type": "application/json"})
        else:
            response = http.post(CHAT, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
        assert "Traceback" not in response.text
        assert http.post(CHAT, json=GOOD).status_code == 200  # still serving


def test_unknown_model_is_404(server: ServerProcess) -> None:
    response = httpx.post(server.base + CHAT, json=_with(model="gpt-9"))
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_ten_megabyte_body_is_413(server: ServerProcess) -> None:
    huge = (
        b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
    )
    response = httpx.post(
        server.base + CHAT, content=huge, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert httpx.post(server.base + CHAT, json=GOOD, timeout=30).status_code == 200


def test_unknown_extra_fields_are_accepted(server: ServerProcess) -> None:
    body = _with(user="u1", logit_bias={}, parallel_tool_calls=False, some_new_field={"a": 1})
    assert httpx.post(server.base + CHAT, json=body, timeout=30).status_code == 200


def test_bad_completion_prompt(server: ServerProcess) -> None:
    url = server.base + "/v1/completions"
    cases = [
        ({"model": MODEL_ID, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL_ID, "prompt": [10**9]}, "prompt"),
        ({"model": MODEL_ID, "prompt": ""}, "prompt"),
    ]
    for body, param in cases:
        response = httpx.post(url, json=body, timeout=30)
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
def test_bad_input_on_other_endpoints(
    server: ServerProcess, name: str, path: str, body: object, status: int, field: str | None
) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as http:
        response = http.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        if path.startswith("/api/"):
            assert isinstance(error, str) and (field is None or error.startswith(field)), error
        else:
            assert error["param"] == field and error["type"] == "invalid_request_error"
        # and the server still serves
        assert http.post(CHAT, json=GOOD).status_code == 200
