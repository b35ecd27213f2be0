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
