"""The load generator: fixed concurrency or Poisson arrivals, over any `/v1` endpoint."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from edgellm.bench.client import send
from edgellm.bench.stats import RequestRecord, Summary
from edgellm.bench.workloads import Conversation, Workload
from edgellm.errors import EdgeLLMError


@dataclass(slots=True, frozen=True)
class LoadConfig:
    """How to send a workload; one level of concurrency."""

    url: str  # the server's /v1 base
    model: str
    concurrency: int | None  # most requests (chat: conversations) in flight; None = no cap
    rate: float = math.inf  # arrivals per second, Poisson; inf = all at once
    warmup: int = 1  # requests sent first and not counted
    seed: int = 0
    body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    timeout: float = 600.0  # seconds per request
    api_key: str | None = None
    slo: dict[str, float] | None = None  # metric -> seconds


@dataclass(slots=True)
class LevelResult:
    concurrency: int | None
    rate: float
    summary: Summary
    records: list[RequestRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "rate": None if math.isinf(self.rate) else self.rate,
            "summary": self.summary.to_json(),
            "requests": [r.to_json() for r in self.records],
        }


class BenchError(EdgeLLMError):
    """The benchmark cannot go on (nothing reachable, every warm-up request failed)."""


def normalize_url(url: str) -> str:
    """`http://host:8000`, `.../v1` and `.../v1/` all mean the /v1 base."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"bad URL {url!r}: expected http://HOST:PORT[/v1]", param="url")
    return url if url.endswith("/v1") else url + "/v1"


def _client(cfg_timeout: float, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg_timeout, connect=10.0),
        headers=headers,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def discover_model(url: str, api_key: str | None) -> str:
    """The first model the server lists, for when the user names none."""
    async with _client(10.0, api_key) as client:
        try:
            response = await client.get(url + "/models")
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        raise BenchError(f"{url}/models answered HTTP {response.status_code}; pass --model")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url}/models lists no model; pass --model") from None


class _Level:
    """One run of a workload at one load level."""

    def __init__(
        self,
        workload: Workload,
        cfg: LoadConfig,
        client: httpx.AsyncClient,
        on_record: Callable[[RequestRecord], None],
    ):
        self.workload = workload
        self.cfg = cfg
        self.client = client
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self.started = time.perf_counter()
        self.run_id = secrets.token_hex(4)  # one run's conversations are not another's
        self._gate = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

    async def run(self, conversations: list[Conversation]) -> None:
        rng = random.Random(self.cfg.seed)
        due = 0.0
        tasks = []
        for cid, conversation in enumerate(conversations):
            if not math.isinf(self.cfg.rate):
                due += rng.expovariate(self.cfg.rate)
                await asyncio.sleep(max(0.0, due - (time.perf_counter() - self.started)))
            tasks.append(asyncio.create_task(self._conversation(cid, conversation)))
        await asyncio.gather(*tasks)

    async def _conversation(self, cid: int, conversation: Conversation) -> None:
        if self._gate is None:
            await self._turns(cid, conversation)
            return
        async with self._gate:
            await self._turns(cid, conversation)

    async def _turns(self, cid: int, conversation: Conversation) -> None:
        multi = len(conversation.max_tokens) > 1
        # a conversation names itself as chat clients do, so a load balancer with session
        # affinity (edgellm gateway haproxy) keeps it on one box, and a canary keeps it sticky
        session = {"X-Session-Id": f"bench-{self.run_id}-{cid}"} if multi else None
        messages: list[dict[str, str]] = []
        if conversation.system is not None:
            messages.append({"role": "system", "content": conversation.system})
        for turn, max_tokens in enumerate(conversation.max_tokens):
            record = self._new_record(cid if multi else None, turn if multi else None)
            if conversation.body is not None:
                body = {**self._base_body(max_tokens), **conversation.body}
            else:
                messages.append({"role": "user", "content": conversation.user_turns[turn]})
                body = {**self._base_body(max_tokens), "messages": list(messages)}
            reply = await send(
                self.client, f"{self.cfg.url}/{self.workload.endpoint}", body, record, session
            )
            self.on_record(record)
            if not record.ok:
                self._skip_rest(cid, turn + 1, len(conversation.max_tokens))
                return
            messages.append({"role": "assistant", "content": reply.text})

    def _skip_rest(self, cid: int, first: int, turns: int) -> None:
        for turn in range(first, turns):
            record = self._new_record(cid, turn)
            record.error, record.detail = "skipped", "an earlier turn of its conversation failed"
            self.on_record(record)

    def _new_record(self, cid: int | None, turn: int | None) -> RequestRecord:
        record = RequestRecord(
            index=len(self.records),
            start=time.perf_counter() - self.started,
            conversation=cid,
            turn=turn,
        )
        self.records.append(record)
        return record

    def _base_body(self, max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.cfg.body,
        }


async def run_level(
    workload: Workload,
    cfg: LoadConfig,
    on_record: Callable[[RequestRecord], None] = lambda _r: None,
) -> LevelResult:
    """Warm up, then send every conversation of `workload` at the load `cfg` describes."""
    async with _client(cfg.timeout, cfg.api_key) as client:
        if cfg.warmup:
            await _warm_up(workload, cfg, client)
        level = _Level(workload, cfg, client, on_record)
        await level.run(workload.conversations)
        duration = time.perf_counter() - level.started
    return LevelResult(
        cfg.concurrency, cfg.rate, Summary.of(level.records, duration, cfg.slo), level.records
    )


async def _warm_up(workload: Workload, cfg: LoadConfig, client: httpx.AsyncClient) -> None:
    """Send the first turns of the first conversations; stop the run if none succeeds."""
    # Same shapes, different words: a server with a prompt cache must not get the measured
    # prompts warm from here.
    firsts = [
        Conversation(
            c.system,
            [" ".join(reversed(t.split())) for t in c.user_turns[:1]],
            c.max_tokens[:1],
            c.body,
        )
        for c in workload.conversations[: cfg.warmup]
    ]
    level = _Level(workload, cfg, client, lambda _r: None)
    await level.run(firsts)
    if level.records and not any(r.ok for r in level.records):
        raise BenchError(f"every warm-up request failed: {describe_errors(level.records)}")


def describe_errors(records: list[RequestRecord]) -> str:
    """`http_404 x2 (The model 'x' does not exist)`, one entry per kind."""
    kinds = Counter(r.error for r in records if r.error)
    example = {r.error: r.detail for r in reversed(records) if r.error}
    return "; ".join(f"{kind} x{n} ({example[kind]})" for kind, n in kinds.most_common())
