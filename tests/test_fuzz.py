"""Fuzz the two chat endpoints in-process (the real app, engine and model): random bytes,
random JSON and mutated valid bodies. Zero 5xx, and the server serves afterwards.

Longer runs against a real process: `python bench/fuzz.py --cases 50000` (docs/security.md).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from edgellm.server import create_app
from edgellm.serving import prepare_model
from edgellm.settings import EngineSettings, ServerSettings
from tests.fuzzing import MODEL, cases

pytestmark = [pytest.mark.model, pytest.mark.slow]

CASES = 2400


async def _client() -> AsyncIterator[httpx.AsyncClient]:
    server = ServerSettings.load(max_tokens_default=8)
    model = prepare_model(server, EngineSettings.load(ctx=1024, parallel=4, max_queue=256))
    app = create_app(server, [model])
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(model.engine.wait_loaded)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client


async def _run(n: int) -> tuple[Counter[str], list[str]]:
    statuses: Counter[str] = Counter()
    server_errors: list[str] = []
    gen = _client()
    client = await anext(gen)
    try:
        sem = asyncio.Semaphore(8)

        async def one(i: int, path: str, body: bytes, content_type: str, kind: str) -> None:
            async with sem:
                response = await client.post(
                    path, content=body, headers={"content-type": content_type}, timeout=120
                )
            statuses[f"{kind} {response.status_code}"] += 1
            if response.status_code >= 500 or "Traceback" in response.text:
                server_errors.append(f"case {i} {path} {body[:300]!r} -> {response.text[:300]}")
            # an error inside a stream must be a client error, never an internal one
            internal = "server_error" in response.text or "internal" in response.text
            if response.status_code == 200 and '"error"' in response.text and internal:
                server_errors.append(f"case {i} stream error: {response.text[-300:]}")

        await asyncio.gather(
            *(one(i, c.path, c.body, c.content_type, c.kind) for i, c in enumerate(cases(7, n)))
        )
        after = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert after.status_code == 200, after.text
    finally:
        await gen.aclose()
    return statuses, server_errors


def test_fuzzed_chat_bodies_never_get_a_5xx() -> None:
    statuses, server_errors = asyncio.run(_run(CASES))
    assert not server_errors, "\n".join(server_errors[:20])
    assert sum(statuses.values()) == CASES
    # the mutations reach the engine too, not only the validators
    assert sum(v for k, v in statuses.items() if k.endswith(" 200")) > CASES // 20, statuses
