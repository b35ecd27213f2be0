"""`edgellm chat`: a streaming terminal chat against a server or an in-process engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from edgellm.errors import EdgeLLMError

Reply = Callable[[list[dict[str, str]]], AsyncIterator[str]]


def run_chat(
    *,
    url: str | None,
    model: str | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    api_key: str | None,
) -> None:
    """`temperature` and `max_tokens` None: the model's defaults (edgellm.server.defaults)."""
    asyncio.run(_chat(url, model, system, temperature, max_tokens, api_key))


async def _chat(
    url: str | None,
    model: str | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    api_key: str | None,
) -> None:
    given = {"temperature": temperature, "max_tokens": max_tokens}
    options = {name: value for name, value in given.items() if value is not None}
    if url:
        async with httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=None, headers=_auth(api_key)
        ) as client:
            name = model or await _first_model(client)
            await _loop(_http_reply(client, name, options), system, name)
        return
    from edgellm.serving import prepare_model
    from edgellm.settings import EngineSettings, ServerSettings

    served = prepare_model(
        ServerSettings.load(model=Path(model) if model else None), EngineSettings.load()
    )
    served.engine.start(asyncio.get_running_loop())
    try:
        await asyncio.to_thread(served.engine.wait_loaded)
        if served.engine.load_error is not None:
            raise EdgeLLMError(f"model failed to load: {served.engine.load_error}")
        await _loop(_local_reply(served, options), system, served.model_id)
    finally:
        await asyncio.to_thread(served.engine.shutdown)


async def _loop(reply: Reply, system: str | None, name: str) -> None:
    print(f"Chatting with {name}. Empty line or Ctrl-D quits.")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = await asyncio.to_thread(input, "> ")
        except EOFError:
            print()
            return
        if not line.strip():
            return
        history.append({"role": "user", "content": line})
        parts = []
        async for text in reply(history):
            print(text, end="", flush=True)
            parts.append(text)
        print()
        history.append({"role": "assistant", "content": "".join(parts)})


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _first_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/models")
    except httpx.HTTPError as exc:
        raise EdgeLLMError(f"cannot reach {client.base_url}: {exc}") from exc
    _raise_for_error(response)
    data = response.json().get("data") or []
    if not data:
        raise EdgeLLMError(f"{client.base_url} serves no models")
    return str(data[0]["id"])


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise EdgeLLMError(f"server answered {response.status_code}: {message}")


def _http_reply(client: httpx.AsyncClient, name: str, options: dict[str, Any]) -> Reply:
    async def reply(history: list[dict[str, str]]) -> AsyncIterator[str]:
        body = {"model": name, "messages": history, "stream": True, **options}
        try:
            async with client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise EdgeLLMError(event["error"]["message"])
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise EdgeLLMError(f"connection to {client.base_url} failed: {exc}") from exc

    return reply


def _local_reply(served: Any, options: dict[str, Any]) -> Reply:
    """Replies from an in-process engine, through the same pipeline as the server's routes."""
    from edgellm.server.lifecycle import ModelTable
    from edgellm.server.pipeline import (
        ChatInput,
        GenerationRequest,
        Piece,
        Pipeline,
        sampling_params,
    )

    pipeline = Pipeline(ModelTable([served]))

    async def reply(history: list[dict[str, str]]) -> AsyncIterator[str]:
        request = GenerationRequest(
            "cli",
            "chat",
            served.model_id,
            ChatInput(list(history), include_reasoning=False),
            sampling_params(temperature=options.get("temperature")),
            options.get("max_tokens"),
        )
        run = await pipeline.start(request)
        try:
            async for event in run.events():
                if isinstance(event, Piece) and event.content:
                    yield event.content
        finally:
            run.close()

    return reply
