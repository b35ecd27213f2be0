"""Defaults for what a client omits, on the real default model (llama.cpp), in-process: a
version's parameters give the same text as a client sending the same values, and the README's
own example request, which sends no temperature and no max_tokens, now ends by itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from edgellm.server import create_app
from edgellm.server.models import ServedModel
from edgellm.serving import prepare_model
from edgellm.settings import EngineSettings, ServerSettings

pytestmark = [pytest.mark.model, pytest.mark.slow]

CHAT = "/v1/chat/completions"
README = [{"role": "user", "content": "What is the capital of France?"}]  # the Quickstart's
# Seeds whose answers, measured one request at a time at llama.cpp's defaults on this model,
# were 23 to 60 tokens (over 20 seeds: 18 stopped, 6 to 362 tokens; 2 ran to the limit).
README_SEEDS = (0, 1, 2, 3, 4)
README_BOUND = 256  # tokens: over 4x the longest of those answers (60)


@asynccontextmanager
async def serving(**engine: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ServedModel]]:
    """The real app around the default model, and a client on it."""
    server = ServerSettings.load()
    model = prepare_model(server, EngineSettings.load(**engine))
    app = create_app(server, [model])
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(model.engine.wait_loaded)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", timeout=300
        ) as client:
            yield client, model


async def _chat(client: httpx.AsyncClient, model: ServedModel, **fields: Any) -> dict[str, Any]:
    body = {"model": model.model_id, "messages": README, **fields}
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_versions_parameters_sample_as_the_client_sending_them() -> None:
    sampling = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02}

    async def main() -> tuple[str, str, str]:
        # sequences of 256 cells and no prefix cache: every request computes the same numbers
        # (docs/engine.md, Determinism), so one seed draws the same tokens
        async with serving(ctx=512, parallel=2, prefix_cache=False) as (client, model):
            model.params = {**sampling, "repeat_penalty": 1.1, "max_tokens": 24}
            by_version = await _chat(client, model, seed=11)
            model.params = {}
            by_client = await _chat(
                client, model, seed=11, repeat_penalty=1.1, max_tokens=24, **sampling
            )
            plain = await _chat(client, model, seed=11, max_tokens=24)  # llama.cpp's defaults
        texts = [a["choices"][0]["message"]["content"] for a in (by_version, by_client, plain)]
        return texts[0], texts[1], texts[2]

    by_version, by_client, plain = asyncio.run(main())
    assert by_version and by_version == by_client
    assert plain != by_version  # the parameters were what changed the draw


def test_the_readme_example_ends_with_stop_at_the_defaults() -> None:
    async def main() -> list[tuple[str, int]]:
        # each request as the Quickstart's server gives it: a stream of 2,048 cells
        async with serving(ctx=4096, parallel=2) as (client, model):
            ends = []
            for seed in README_SEEDS:
                answer = await _chat(client, model, seed=seed)
                usage = answer["usage"]["completion_tokens"]
                ends.append((answer["choices"][0]["finish_reason"], usage))
            return ends

    for finish_reason, tokens in asyncio.run(main()):
        assert finish_reason == "stop"
        assert 1 <= tokens <= README_BOUND
