"""Quotas per API key: requests per minute, tokens per minute, requests in flight.

A key's limits come from its principal (edgellm.server.keys). Over one of them, an inference
request gets 429 with `Retry-After` (the seconds until it would be admitted) in its API's
envelope, before any work. Every answer to a limited key carries OpenAI's rate-limit headers
for the limits it has: `x-ratelimit-{limit,remaining,reset}-requests` and `-tokens`.

- Requests per minute: the requests admitted in the last 60 s (a sliding window: refused
  ones do not count, so a client that retries too fast is not locked out for good).
- Tokens per minute: prompt + completion tokens of the key's generation requests that ended in
  the last 60 s, their real counts from the pipeline's records (a stream its client cut short
  counts the tokens it produced). A request is admitted while the key is under its limit; its
  own tokens are counted when it ends, so one long request may take a key past the limit once.
- Requests in flight: inference requests admitted and not yet answered in full.

The counts live in the server's memory: a restart starts them afresh; each box of a fleet
counts its own.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.errors import RateLimited
from edgellm.server.errors import send_error
from edgellm.server.keys import Principal, principal_of
from edgellm.server.pipeline import Record

WINDOW_S = 60.0
# the routes whose requests count: they start work on a model
LIMITED_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    }
)


@dataclass(slots=True)
class _Usage:
    admitted: deque[float] = field(default_factory=deque)  # when, within the window
    ended: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens)
    tokens: int = 0  # sum of `ended`'s tokens
    in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - WINDOW_S:
            self.admitted.popleft()
        while self.ended and self.ended[0][0] <= now - WINDOW_S:
            self.tokens -= self.ended.popleft()[1]


def limited(principal: Principal | None) -> bool:
    return principal is not None and (
        principal.rpm is not None
        or principal.tpm is not None
        or principal.max_concurrent is not None
    )


class Quotas:
    """Each limited key's usage, and the checks against its limits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._usage: dict[str, _Usage] = {}

    def _of(self, principal: Principal) -> _Usage:
        usage = self._usage.setdefault(principal.name, _Usage())
        usage.expire(self.clock())
        return usage

    def observe(self, record: Record) -> None:
        """The record sink: a finished generation request's tokens count for its key."""
        if record.key is None or record.key not in self._usage:
            return
        tokens = record.prompt_tokens + record.completion_tokens if record.submitted else 0
        if tokens:
            usage = self._usage[record.key]
            usage.ended.append((self.clock(), tokens))
            usage.tokens += tokens

    def admit(self, principal: Principal) -> RateLimited | None:
        """Count a request in (None), or the error that refuses it."""
        usage, now = self._of(principal), self.clock()
        if principal.max_concurrent is not None and usage.in_flight >= principal.max_concurrent:
            return RateLimited(
                f"this key may have {principal.max_concurrent} requests in flight; wait for one "
                "to finish",
                retry_after_s=1,
                code="concurrency_limit_exceeded",
            )
        if principal.rpm is not None and len(usage.admitted) >= principal.rpm:
            wait = usage.admitted[0] + WINDOW_S - now
            return RateLimited(
                f"this key may make {principal.rpm} requests per minute; try again in "
                f"{math.ceil(wait)} s",
                retry_after_s=max(1, math.ceil(wait)),
                code="rate_limit_exceeded",
            )
        if principal.tpm is not None and usage.tokens >= principal.tpm:
            wait = self._tokens_free_in(usage, principal.tpm, now)
            return RateLimited(
                f"this key may use {principal.tpm} tokens per minute; try again in "
                f"{math.ceil(wait)} s",
                retry_after_s=max(1, math.ceil(wait)),
                code="rate_limit_exceeded",
            )
        usage.admitted.append(now)
        usage.in_flight += 1
        return None

    def leave(self, principal: Principal) -> None:
        self._usage[principal.name].in_flight -= 1

    @staticmethod
    def _tokens_free_in(usage: _Usage, tpm: int, now: float) -> float:
        """Seconds until the key's tokens in the window fall under `tpm`."""
        over = usage.tokens - tpm + 1
        for when, tokens in usage.ended:
            over -= tokens
            if over <= 0:
                return when + WINDOW_S - now
        return WINDOW_S  # pragma: no cover - tokens >= tpm implies entries that sum past it

    def headers(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        """OpenAI's rate-limit headers for the limits `principal` has."""
        usage, now = self._of(principal), self.clock()
        out: list[tuple[bytes, bytes]] = []
        if principal.rpm is not None:
            reset = usage.admitted[0] + WINDOW_S - now if usage.admitted else 0.0
            out += _triple("requests", principal.rpm, principal.rpm - len(usage.admitted), reset)
        if principal.tpm is not None:
            reset = usage.ended[0][0] + WINDOW_S - now if usage.ended else 0.0
            out += _triple("tokens", principal.tpm, principal.tpm - usage.tokens, reset)
        return out


def _triple(what: str, limit: int, remaining: int, reset_s: float) -> list[tuple[bytes, bytes]]:
    return [
        (f"x-ratelimit-limit-{what}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{what}".encode(), str(max(0, remaining)).encode()),
        (f"x-ratelimit-reset-{what}".encode(), duration(reset_s).encode()),
    ]


def duration(seconds: float) -> str:
    """How OpenAI writes a reset time: "250ms", "12s", "1m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


class QuotaGate:
    """ASGI middleware, inside the key check: refuses a limited key's inference requests over
    its limits, counts those in flight, and adds the rate-limit headers to its answers."""

    def __init__(self, app: ASGIApp, quotas: Quotas):
        self.app = app
        self.quotas = quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope) if scope["type"] == "http" else None
        if principal is None or not limited(principal):
            await self.app(scope, receive, send)
            return
        quotas = self.quotas
        counted = scope["path"] in LIMITED_PATHS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *quotas.headers(principal)]
            await send(message)

        if counted:
            refusal = quotas.admit(principal)
            if refusal is not None:
                await send_error(scope, refusal, with_headers)
                return
        try:
            await self.app(scope, receive, with_headers)
        finally:
            if counted:
                quotas.leave(principal)
