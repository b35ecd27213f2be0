"""Quotas per API key (edgellm.server.quotas), in-process: requests per minute, tokens per
minute on the real counts of the pipeline's records, requests in flight, OpenAI's rate-limit
headers, and other keys unaffected. The keys are principals put in the scope as the key check
does (tests/inprocess.py `as_keys`); the real key store is tested in the keys tests."""

from __future__ import annotations

import asyncio

import pytest

from edgellm.server.keys import Principal
from edgellm.server.pipeline import Record
from edgellm.server.quotas import Quotas, duration
from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, TextRunner, as_keys, scripted_server

pytestmark = pytest.mark.anyio

LIMITED = Principal("limited", "user", rpm=5)
OTHER = Principal("other", "user")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(key: str, prompt: int, completion: int) -> Record:
    record = Record("r", "openai", "/v1/chat/completions", MODEL, False, key=key)
    record.submitted, record.prompt_tokens, record.completion_tokens = 1.0, prompt, completion
    return record


def test_requests_per_minute_slide_with_the_window() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    for _ in range(5):
        assert quotas.admit(LIMITED) is None
        quotas.leave(LIMITED)
        clock.now += 1
    refused = quotas.admit(LIMITED)
    assert refused is not None and refused.status_code == 429
    assert refused.headers["Retry-After"] == "55"  # the first one leaves the window in 55 s
    clock.now += 55
    assert quotas.admit(LIMITED) is None


def test_tokens_per_minute_count_what_requests_used() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    key = Principal("t", "user", tpm=100)
    assert quotas.admit(key) is None
    quotas.leave(key)
    quotas.observe(_record("t", 60, 30))
    assert quotas.admit(key) is None  # 90 < 100
    quotas.leave(key)
    clock.now += 10
    quotas.observe(_record("t", 5, 5))
    refused = quotas.admit(key)
    assert refused is not None and refused.headers["Retry-After"] == "50"
    headers = dict(quotas.headers(key))
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"x-ratelimit-limit-tokens"] == b"100"
    clock.now += 50  # the first 90 tokens leave the window
    assert quotas.admit(key) is None


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.25, 1.0, 12.2, 60, 61.5)] == [
        "250ms",
        "1s",
        "13s",
        "1m0s",
        "1m2s",
    ]


async def test_a_limited_key_gets_429_and_headers_others_do_not() -> None:
    async with scripted_server() as srv:
        as_keys(srv.app, {"sk-limited": LIMITED, "sk-other": OTHER})
        limited = {"Authorization": "Bearer sk-limited"}
        answers = [await srv.chat(headers=limited) for _ in range(6)]
        other = await srv.chat(headers={"Authorization": "Bearer sk-other"})
        listing = await srv.client.get("/v1/models", headers=limited)
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "5"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "4"
    assert answers[4].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[5]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 59
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
    assert listing.status_code == 200 and listing.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_per_minute_use_the_real_counts_of_answers() -> None:
    key = Principal("tokens", "user", tpm=250)
    async with scripted_server() as srv:
        as_keys(srv.app, {"sk-t": key})
        headers = {"Authorization": "Bearer sk-t"}
        used = 0
        answers = []
        while len(answers) < 10:
            answer = await srv.chat(headers=headers, max_tokens=5)
            answers.append(answer)
            if answer.status_code != 200:
                break
            usage = answer.json()["usage"]
            used += usage["prompt_tokens"] + usage["completion_tokens"]
    assert answers[-1].status_code == 429, "never limited"
    # admitted while under the limit; refused once what the answers used reached it
    assert (
        used >= 250 and used - sum(a.json()["usage"]["total_tokens"] for a in answers[-2:-1]) < 250
    )
    assert answers[-1].headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_third_concurrent_stream_is_refused() -> None:
    key = Principal("two", "user", max_concurrent=2)
    runner = TextRunner(n_ctx=2048, seq_cells=512, step_s=0.01)
    async with scripted_server(runner=runner) as srv:
        as_keys(srv.app, {"sk-2": key, "sk-other": OTHER})
        headers = {"Authorization": "Bearer sk-2"}
        streams = [
            asyncio.create_task(srv.chat(headers=headers, stream=True, max_tokens=60))
            for _ in range(2)
        ]
        await asyncio.to_thread(runner.stepping.wait, 10)
        await asyncio.sleep(0.05)
        third = await srv.chat(headers=headers, stream=True)
        other = await srv.chat(headers={"Authorization": "Bearer sk-other"}, stream=True)
        done = await asyncio.gather(*streams)
        after = await srv.chat(headers=headers)
    assert (
        third.status_code == 429 and third.json()["error"]["code"] == "concurrency_limit_exceeded"
    )
    assert other.status_code == 200
    assert [d.status_code for d in done] == [200, 200]
    assert after.status_code == 200  # the two ended: in flight is back to 0


async def test_a_key_cannot_read_another_keys_prompt_from_the_cache() -> None:
    system = {"role": "system", "content": "private instructions " * 20}
    for scope, hit in (("key", False), ("global", True)):
        async with scripted_server(ServerSettings(prefix_cache_scope=scope)) as srv:
            as_keys(srv.app, {"sk-a": Principal("a", "user"), "sk-b": OTHER})
            asked = [system, {"role": "user", "content": "hi"}]
            first = await srv.chat(headers={"Authorization": "Bearer sk-a"}, messages=asked)
            again = await srv.chat(headers={"Authorization": "Bearer sk-b"}, messages=asked)
            own = await srv.chat(headers={"Authorization": "Bearer sk-a"}, messages=asked)
        cached = [
            r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, own)
        ]
        assert cached[0] == 0 and cached[2] > 0, (scope, cached)
        assert (cached[1] > 0) is hit, (scope, cached)


async def test_one_keys_burst_does_not_shut_another_key_out() -> None:
    """Key a opens 80 streams at once (8 sequences, a queue of 64); key b's request is still
    queued, not refused, and takes the first sequence that frees, ahead of a's queue."""
    runner = TextRunner(n_ctx=8192, seq_cells=1024, step_s=0.002)
    async with scripted_server(runner=runner, parallel=8, max_queue=64) as srv:
        as_keys(srv.app, {"sk-a": Principal("a", "user"), "sk-b": OTHER})
        burst = [
            asyncio.create_task(
                srv.chat(headers={"Authorization": "Bearer sk-a"}, stream=True, max_tokens=20)
            )
            for _ in range(80)
        ]
        while len(srv.model.engine.engine.scheduler.waiting) < 40:
            await asyncio.sleep(0.005)
        b = await srv.chat(headers={"Authorization": "Bearer sk-b"}, max_tokens=4)
        answers = await asyncio.gather(*burst)
    assert b.status_code == 200, b.text
    statuses = [a.status_code for a in answers]
    assert statuses.count(503) > 0  # a's own burst overflowed its share of the queue
    records = {r.request_id: r for r in srv.records}
    mine = next(r for r in srv.records if r.key == OTHER.name)
    assert mine.queued_s is not None and mine.submitted is not None
    admitted_b = mine.submitted + mine.queued_s
    before = [
        r
        for r in records.values()
        if r.key == "a" and r.queued_s is not None and r.submitted + r.queued_s < admitted_b  # type: ignore[operator]
    ]
    print(
        f"[burst] a: {statuses.count(200)} served, {statuses.count(503)} refused; b queued "
        f"{1000 * mine.queued_s:.0f} ms behind {len(before)} of a's requests"
    )
    # the 8 running when b arrived, and those admitted in the same step as the first to free
    assert len(before) <= 8 + 1, len(before)
