"""The prefix cache on the real server (llama.cpp + the default model, official `openai` client):
greedy output with the cache is the same as without it, under eviction, copies and aborts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, ServerProcess
from tests.test_server_real import run_async

SYSTEM = (
    "You are the help desk of a small hardware store. Answer in one or two short sentences, "
    "name the aisle when you can, and never invent prices. The store sells tools, paint, "
    "garden supplies, plumbing parts, electrical parts, screws, nails and glue. Paint is in "
    "aisle 4, garden supplies in aisle 7, plumbing in aisle 9 and electrical in aisle 11. "
    "Opening hours are eight to six on weekdays and nine to four on Saturdays. "
)
CONVERSATIONS = [
    ["Where is the paint?", "Do you sell brushes too?", "And when do you close on Saturday?"],
    ["I need a new tap washer.", "Which aisle was that?", "Thanks. Do you have glue?"],
    ["Can I buy seeds here?", "What about a watering can?", "Are you open on Sunday?"],
]
# Two sequences for three conversations: each turn some slot's cache must be evicted. Batches
# under 64 rows and sequences of at most 256 cells (llama.cpp pads the attention view to 256
# cells; at 512 a lone decode takes another kernel) keep llama.cpp's CPU kernels on one code
# path, so equal tokens give bit-equal numbers however a prompt is cut or batched
# (docs/engine.md, Determinism). The longest conversation here stays near 230 cells.
SMALL = ("--ctx", "2048", "--parallel", "2", "--batch", "63")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    cached = ServerProcess(*SMALL)
    try:
        uncached = ServerProcess(*SMALL, "--no-prefix-cache")
    except BaseException:
        cached.stop()
        raise
    yield cached, uncached
    cached.stop()
    uncached.stop()


async def _conversations(aclient: openai.AsyncOpenAI) -> list[list[tuple[str, int]]]:
    """All conversations turn by turn, concurrently; (reply, cached prompt tokens) per turn."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in CONVERSATIONS]
    results: list[list[tuple[str, int]]] = [[] for _ in CONVERSATIONS]

    async def turn(i: int, question: str) -> None:
        histories[i].append({"role": "user", "content": question})
        reply = await aclient.chat.completions.create(
            model=MODEL_ID,
            messages=histories[i],
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        text = reply.choices[0].message.content or ""
        histories[i].append({"role": "assistant", "content": text})
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        results[i].append((text, reply.usage.prompt_tokens_details.cached_tokens or 0))

    for t in range(len(CONVERSATIONS[0])):
        await asyncio.gather(*(turn(i, conv[t]) for i, conv in enumerate(CONVERSATIONS)))
    return results


def _system_tokens(server: ServerProcess) -> int:
    body = {"model": MODEL_ID, "messages": [{"role": "system", "content": SYSTEM}]}
    reply = httpx.post(server.base + "/v1/chat/completions", json={**body, "max_tokens": 1})
    return int(reply.json()["usage"]["prompt_tokens"])


def test_multi_turn_conversations_match_the_uncached_server(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    cached, uncached = servers
    with_cache = run_async(cached, _conversations)
    without = run_async(uncached, _conversations)
    assert [[text for text, _ in c] for c in with_cache] == [
        [text for text, _ in c] for c in without
    ]
    assert all(text for c in with_cache for text, _ in c)
    # from the second turn on, at least the shared system prompt is always reused
    system = _system_tokens(uncached) - 10  # minus the empty user turn's template tokens
    assert all(n >= system for c in with_cache for _, n in c[1:]), with_cache
    assert all(n == 0 for c in without for _, n in c)
    stats, off = cached.stats(), uncached.stats()
    assert stats["prompt_tokens_reused"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert off["prompt_tokens_reused"] == 0 and off["prefix_cache_hit_rate"] == 0.0
    assert stats["kv_cells_used"] == 0 and 0 < stats["kv_cells_cached"] <= stats["kv_cells_total"]
    assert stats["kv_cells_evicted"] > 0  # three conversations through two sequences


def test_prompts_cut_at_arbitrary_positions_match(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    """Raw completions of one text cut at random characters: the cache's matches end at
    arbitrary token positions, including tokens that the cut splits differently."""
    text = SYSTEM + " ".join(CONVERSATIONS[0] + CONVERSATIONS[1])
    cuts = random.Random(7).sample(range(40, len(text)), 6)
    cuts.insert(3, cuts[1])  # the same prompt again: all but its last two tokens are reused
    results = []
    for server in servers:
        with openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0) as client:
            before = server.stats()["prompt_tokens_reused"]
            texts = [
                client.completions.create(
                    model=MODEL_ID, prompt=text[:cut], max_tokens=12, temperature=0
                )
                .choices[0]
                .text
                for cut in cuts
            ]
            results.append((texts, server.stats()["prompt_tokens_reused"] - before))
    (with_cache, reused), (without, _) = results
    assert with_cache == without
    assert reused > 0


def _stream(server: ServerProcess, question: str, max_tokens: int, leave_after: int = 0) -> str:
    """Stream a chat; with `leave_after`, drop the connection after that many chunks."""
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    with openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(**body)  # type: ignore[call-overload]
        text = ""
        for i, chunk in enumerate(stream):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if leave_after and i + 1 >= leave_after:
                stream.close()
                break
        return text


def test_aborting_a_request_that_shares_a_prefix_leaves_the_others_correct(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    cached, uncached = servers

    async def scenario(server: ServerProcess) -> list[str]:
        left = asyncio.to_thread(_stream, server, "Tell me everything about paint.", 200, 3)
        stays = asyncio.to_thread(_stream, server, "Where are the screws?", 40)
        out = list(await asyncio.gather(left, stays))
        # reuses what the aborted request computed
        out.append(await asyncio.to_thread(_stream, server, "Tell me everything about paint.", 16))
        return out

    with_cache = asyncio.run(scenario(cached))
    without = asyncio.run(scenario(uncached))
    assert with_cache[1:] == without[1:]
    assert with_cache[1] and with_cache[2]
    assert cached.stats()["running"] == 0


def test_shared_pool_evicts_cached_cells_and_keeps_serving() -> None:
    """The shared layout counts cached cells against one small pool: serving three
    conversations through it needs evictions; every turn still completes."""
    shared = ServerProcess("--ctx", "512", "--parallel", "2", "--kv-layout", "shared")
    try:
        results = run_async(shared, _conversations)
        assert all(text for c in results for text, _ in c)
        assert any(n > 0 for c in results for _, n in c[1:])
        stats = shared.stats()
        assert stats["running"] == 0 and stats["kv_cells_used"] == 0
        assert stats["kv_cells_cached"] <= stats["kv_cells_total"]
        assert stats["kv_cells_evicted"] > 0
    finally:
        shared.stop()
