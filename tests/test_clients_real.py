"""Every client unchanged, against a real server with the default model: the official `ollama`
client on the Ollama API, the official `openai` client on structured output, tools and
embeddings, request bodies shaped as Cherry Studio sends them, and API keys."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.conftest import MODEL_ID, ServerProcess, ollama_client, openai_client

# -- Ollama API, official client -------------------------------------------------------------


def test_ollama_list_show_ps_version(server: ServerProcess) -> None:
    with ollama_client(server) as client:
        listed = client.list().models
        assert [m.model for m in listed] == [f"{MODEL_ID}:latest"]
        assert listed[0].size and listed[0].digest and len(listed[0].digest) == 64
        assert listed[0].details is not None and listed[0].details.format == "gguf"
        assert listed[0].details.quantization_level == "Q4_1"
        shown = client.show(MODEL_ID)
        assert shown.template and "im_start" in shown.template
        assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"
        assert shown.capabilities == ["completion", "tools"]  # no thinking: not a reasoner
        running = client.ps().models
        assert [m.model for m in running] == [f"{MODEL_ID}:latest"]
    assert httpx.get(server.base + "/api/version").json()["version"]


def test_ollama_chat_whole_and_streamed(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    options = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}
    with ollama_client(server) as client:
        whole = client.chat(model=MODEL_ID, messages=messages, options=options)
        parts = list(client.chat(model=MODEL_ID, messages=messages, options=options, stream=True))
    assert whole.done and whole.done_reason == "length" and whole.message.content
    assert whole.eval_count == 12 and whole.prompt_eval_count
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_duration is not None
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 12


def test_ollama_generate_options_at_top_level_and_stop(server: ServerProcess) -> None:
    with ollama_client(server) as client:
        first = client.generate(
            model=f"{MODEL_ID}:latest",
            prompt="Count: one, two,",
            options={"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0},
        )
    assert first.done and first.response
    # the same fields at the top level, as some clients send them
    body = {
        "model": MODEL_ID,
        "prompt": "Count: one, two,",
        "stream": False,
        "temperature": 0,
        "num_predict": 16,
        "repeat_penalty": 1.0,
    }
    top = httpx.post(server.base + "/api/generate", json=body, timeout=60).json()
    assert top["response"] == first.response
    word = first.response.split()[1] if len(first.response.split()) > 1 else first.response[-2:]
    stopped = httpx.post(
        server.base + "/api/generate", json={**body, "options": {"stop": [word]}}, timeout=60
    ).json()
    assert word not in stopped["response"] and stopped["done_reason"] == "stop"
    loaded = httpx.post(server.base + "/api/generate", json={"model": MODEL_ID}).json()
    assert loaded["done"] and loaded["done_reason"] == "load"


def test_ollama_embed_and_embeddings(server: ServerProcess) -> None:
    with ollama_client(server) as client:
        embedded = client.embed(model=MODEL_ID, input=["a red apple", "a green pear"])
        legacy = client.embeddings(model=MODEL_ID, prompt="a red apple")
    first, second = embedded.embeddings
    assert len(first) == len(second) == len(legacy.embedding) == 576
    assert math.isclose(math.hypot(*first), 1.0, rel_tol=1e-5)
    norm = math.hypot(*legacy.embedding)
    assert all(
        math.isclose(a, b / norm, abs_tol=1e-5)
        for a, b in zip(first, legacy.embedding, strict=True)
    )
    assert embedded.prompt_eval_count and embedded.prompt_eval_count > 4


def test_ollama_errors_are_ollama_shaped_and_name_the_field(server: ServerProcess) -> None:
    with ollama_client(server) as client:
        with pytest.raises(ollama.ResponseError) as missing:
            client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as think:
            client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], think=True)
        assert think.value.status_code == 400 and "think" in think.value.error
    # the client refuses an unknown format itself; sent raw, the server names the field
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
    bad_format = httpx.post(server.base + "/api/chat", json={**chat, "format": "yaml"})
    assert bad_format.status_code == 400 and bad_format.json()["error"].startswith("format")
    small = httpx.post(
        server.base + "/api/chat",
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "hi " * 40}],
            "options": {"num_ctx": 16},
        },
    )
    assert small.status_code == 400 and "context" in small.json()["error"]


# -- structured output: 20 seeds x 3 schemas ---------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "string", "maxLength": 16},
                "minItems": 1,
                "maxItems": 4,
            },
            "count": {"type": "integer"},
        },
        "required": ["items", "count"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "mood": {"enum": ["happy", "sad", "calm"]},
            "level": {"type": "string", "enum": ["low", "mid", "high"]},
            "ok": {"type": "boolean"},
        },
        "required": ["mood", "level", "ok"],
    },
}


def test_json_schema_output_always_parses_and_validates(server: ServerProcess) -> None:
    async def one(client: openai.AsyncOpenAI, schema: dict[str, Any], seed: int) -> str:
        reply = await client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Describe something as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": schema, "strict": True},
            },
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content or ""

    async def main() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(
            base_url=server.base + "/v1", api_key="x", max_retries=0
        ) as client:
            jobs = [(n, s, seed) for n, s in SCHEMAS.items() for seed in range(20)]
            texts = await asyncio.gather(*(one(client, s, seed) for _, s, seed in jobs))
            return [(n, t) for (n, _, _), t in zip(jobs, texts, strict=True)]

    results = asyncio.run(main())
    assert len(results) == 60
    for name, text in results:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert len({t for _, t in results}) > 10  # seeds really sample different documents


def test_json_object_and_ollama_schema_format(server: ServerProcess) -> None:
    with openai_client(server) as client:
        reply = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "A JSON object about cats."}],
            response_format={"type": "json_object"},
            max_tokens=300,
            seed=3,
        )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    with ollama_client(server) as oc:
        out = oc.chat(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "How do you feel?"}],
            format=SCHEMAS["enum"],
            options={"seed": 5},
        )
    jsonschema.validate(json.loads(out.message.content or ""), SCHEMAS["enum"])


# -- tools -----------------------------------------------------------------------------------

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
                "required": ["zone"],
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_two_tools_give_a_well_formed_call_whole_and_streamed(server: ServerProcess) -> None:
    with openai_client(server) as client:
        whole = client.chat.completions.create(
            model=MODEL_ID,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=80,  # type: ignore[arg-type]
        )
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])

        stream = client.chat.completions.create(
            model=MODEL_ID,
            messages=ASK,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=80,
            stream=True,
        )
        deltas = [c.choices[0] for c in stream if c.choices]
        calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].function is not None
        assert calls[0].function.name == "get_time"
        jsonschema.validate(json.loads(calls[0].function.arguments or ""), PARAMS["get_time"])
        assert deltas[-1].finish_reason == "tool_calls"

        # the tool's result goes back as a `tool` message and the model answers in text
        follow = client.chat.completions.create(
            model=MODEL_ID,
            messages=[
                *ASK,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'},
            ],  # type: ignore[list-item]
            tools=TOOLS,  # type: ignore[arg-type]
            max_tokens=20,
        )
        assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_ollama_chat_accepts_tools_and_tool_results(server: ServerProcess) -> None:
    with ollama_client(server) as client:
        reply = client.chat(
            model=MODEL_ID,
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "content": '{"temp_c": 18}', "tool_name": "get_weather"},
            ],
            tools=TOOLS,
            options={"num_predict": 16},
        )
    assert reply.done


# -- embeddings on /v1 -----------------------------------------------------------------------


def test_openai_embeddings_float_and_base64_agree(server: ServerProcess) -> None:
    with openai_client(server) as client:
        floats = client.embeddings.create(
            model=MODEL_ID, input=["hello world", "goodbye"], encoding_format="float"
        )
        # the SDK asks for base64 by default and decodes it
        decoded = client.embeddings.create(model=MODEL_ID, input=["hello world", "goodbye"])
    raw = httpx.post(
        server.base + "/v1/embeddings",
        json={"model": MODEL_ID, "input": "hello world", "encoding_format": "base64"},
    ).json()
    unpacked = struct.unpack("<576f", base64.b64decode(raw["data"][0]["embedding"]))
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 2
    for a, b, c in zip(floats.data[0].embedding, decoded.data[0].embedding, unpacked, strict=True):
        assert math.isclose(a, b, abs_tol=1e-6) and math.isclose(a, c, abs_tol=1e-6)
    assert math.isclose(math.hypot(*floats.data[1].embedding), 1.0, rel_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding


# -- Cherry Studio request shapes -------------------------------------------------------------


def test_cherry_studio_openai_provider_body(server: ServerProcess) -> None:
    """Cherry Studio's OpenAI-compatible provider: a streaming chat with usage in the stream,
    content as text parts, its tool list, and fields of its own at the top level."""
    body = {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "top_p": 1,
        "max_tokens": 16,
        "tools": TOOLS,
        "keep_alive": "5m",
        "enable_thinking": False,
        "thinking": {"type": "disabled"},
    }
    headers = {"Authorization": "Bearer cherry", "Content-Type": "application/json"}
    with httpx.stream(
        "POST", server.base + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as reply:
        assert reply.status_code == 200
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_cherry_studio_ollama_provider_bodies(server: ServerProcess) -> None:
    """Cherry Studio's Ollama provider: model list, NDJSON chat with options and keep_alive,
    and the embed call its knowledge base makes."""
    assert httpx.get(server.base + "/api/tags").json()["models"]
    body = {
        "model": f"{MODEL_ID}:latest",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        "stream": True,
        "keep_alive": "5m",
        "options": {"temperature": 0.7, "top_p": 1, "num_ctx": 1024, "num_predict": 16},
    }
    with httpx.stream("POST", server.base + "/api/chat", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert lines[-1]["done"] and lines[-1]["eval_count"] > 0
    embed = httpx.post(
        server.base + "/api/embed",
        json={"model": f"{MODEL_ID}:latest", "input": ["chunk one", "chunk two"]},
    ).json()
    assert len(embed["embeddings"]) == 2
