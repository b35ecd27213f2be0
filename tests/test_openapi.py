"""The OpenAPI document describes requests and responses, and what the routes answer is what
it describes (checked on real answers from the in-process app)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgellm.server.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    EmbeddingList,
    ModelList,
    OllamaChatResponse,
    OllamaEmbed,
    OllamaGenerateResponse,
    OllamaTags,
)
from tests.inprocess import MODEL, scripted_server

pytestmark = pytest.mark.anyio

DOCUMENTED = {
    ("post", "/v1/chat/completions"): "ChatCompletion",
    ("post", "/v1/completions"): "Completion",
    ("post", "/v1/embeddings"): "EmbeddingList",
    ("get", "/v1/models"): "ModelList",
    ("post", "/api/chat"): "OllamaChatResponse",
    ("post", "/api/generate"): "OllamaGenerateResponse",
    ("get", "/api/tags"): "OllamaTags",
    ("post", "/api/embed"): "OllamaEmbed",
}


async def test_openapi_lists_response_schemas() -> None:
    async with scripted_server() as srv:
        doc = (await srv.client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for (method, path), name in DOCUMENTED.items():
        op = doc["paths"][path][method]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{name}"}, (path, ok)
        assert schemas[name]["properties"], name
        if method == "post":
            assert "requestBody" in op, path
        errors = op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
        assert errors.endswith("OllamaError" if path.startswith("/api/") else "OpenAIError")
        assert "422" not in op["responses"], path  # edgellm answers 400, never 422
    chat = schemas["ChatCompletion"]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(chat["required"])
    streamed = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in streamed
    assert (
        "application/x-ndjson" in doc["paths"]["/api/chat"]["post"]["responses"]["200"]["content"]
    )


def _sse(text: str) -> list[dict[str, Any]]:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events.pop() == "[DONE]"
    return [json.loads(e) for e in events]


async def test_answers_match_their_models() -> None:
    """Every JSON answer and stream event validates against its declared model (extra keys
    are refused by the models, so nothing undocumented slips out)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with scripted_server() as srv:
        c = srv.client
        ChatCompletion.model_validate((await c.post("/v1/chat/completions", json=chat)).json())
        stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        for event in _sse((await c.post("/v1/chat/completions", json=stream)).text):
            ChatCompletionChunk.model_validate(event)
        text = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
        Completion.model_validate((await c.post("/v1/completions", json=text)).json())
        for event in _sse((await c.post("/v1/completions", json={**text, "stream": True})).text):
            Completion.model_validate(event)
        embed = {"model": MODEL, "input": ["a", "b"]}
        EmbeddingList.model_validate((await c.post("/v1/embeddings", json=embed)).json())
        ModelList.model_validate((await c.get("/v1/models")).json())
        OllamaTags.model_validate((await c.get("/api/tags")).json())
        OllamaEmbed.model_validate((await c.post("/api/embed", json=embed)).json())
        ollama = {**chat, "options": {"num_predict": 3}}
        for line in (await c.post("/api/chat", json=ollama)).text.splitlines():
            OllamaChatResponse.model_validate(json.loads(line))
        generate = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 3}}
        for line in (await c.post("/api/generate", json=generate)).text.splitlines():
            OllamaGenerateResponse.model_validate(json.loads(line))
        once = {**generate, "stream": False}
        OllamaGenerateResponse.model_validate((await c.post("/api/generate", json=once)).json())
