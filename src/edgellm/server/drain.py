"""The drain: how a server stops without cutting off the requests it took.

Once `Drain.begin()` is called (the first SIGTERM or SIGINT, edgellm.server.process), `/ready`
answers 503 "draining" so load balancers stop sending, and `DrainGate` answers each new
inference request 503 `draining` with Retry-After, in its API's envelope, while the listening
socket stays open. Requests already in flight, streams included, run on. `Drain.run` waits for
them for up to the drain timeout, then ends those left with a `Draining` error (a stream's last
event) and waits a moment for them to write it. Only then is uvicorn told to exit.

In flight means: an inference request that passed the gate and whose answer is not yet all
sent (embeddings and requests still being tokenized included).

A maintenance drain (`Drain.maintenance`, set through POST /admin/drain while `edgellm fleet`
swaps a worker's model) is the gentle kind: only the HAProxy agent says `drain`, so no new
sessions arrive; whatever still comes (a session HAProxy keeps on this box, a client that
bypasses it) is served, and /ready stays 200, saying `"maintenance": true`. It ends when it is
turned off; the process does not stop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import Draining, DrainTimeout
from edgellm.server.errors import send_error
from edgellm.server.pipeline import Pipeline

log = logging.getLogger("edgellm.server")

# the routes that start work; everything else (/health, /ready, /metrics, model lists) is served
INFERENCE_PATHS = frozenset(
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
# how long requests cut off at the timeout have to write their error event
CUT_OFF_GRACE_S = 2.0


def refused() -> Draining:
    return Draining("the server is shutting down and takes no new requests")


def cut_off() -> DrainTimeout:
    return DrainTimeout("the server shut down before this request finished (drain timeout)")


class Drain:
    """The app's drain state: whether it began, and the inference requests in flight."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.began: float | None = None  # monotonic seconds; None: serving normally
        self.maintenance = False  # the agent says drain; requests are still served
        self.in_flight = 0
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> None:
        """Refuse new inference requests and turn /ready to 503; takes effect at once."""
        if self.began is None:
            self.began = time.monotonic()

    async def idle(self) -> None:
        """Return once no inference request is in flight."""
        await self._idle.wait()

    async def run(self, timeout_s: float) -> int:
        """Begin, wait up to `timeout_s` for the requests in flight, then cut off those left.
        Returns how many were cut off."""
        self.begin()
        started = time.monotonic()
        log.info("draining: %d requests in flight, up to %g s", self.in_flight, timeout_s)
        if await self._idle_within(timeout_s):
            log.info("drained in %.2f s: every request finished", time.monotonic() - started)
            return 0
        left = self.in_flight
        self.pipeline.interrupt(cut_off)
        # beyond the grace, uvicorn's own graceful shutdown (--shutdown-timeout) takes over
        await self._idle_within(CUT_OFF_GRACE_S)
        log.info("drain timed out after %g s: %d requests ended with an error", timeout_s, left)
        return left

    async def _idle_within(self, timeout_s: float) -> bool:
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class DrainGate:
    """ASGI middleware: counts inference requests in flight; refuses them once draining."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send_error(scope, refused(), send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
