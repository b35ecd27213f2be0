"""The serving process's signals: the first SIGTERM or SIGINT drains, a second one exits now.

uvicorn's own handler starts its shutdown at the first signal, and that shutdown closes the
listening socket at once: a client arriving during the drain would get a refused connection
instead of a 503 it can act on. So `DrainingServer` installs its own handler in place of
uvicorn's: the first signal begins the app's drain (edgellm.server.drain) and only when it has
ended sets `should_exit`, so uvicorn's shutdown (closing the listener, then `--shutdown-timeout`
for open connections, then the app's lifespan) starts after it. A second signal during the drain
exits at once with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell
reports a process killed by it. uvicorn re-raises the signals it caught once it stops; this
server does not, so a drained process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from edgellm.server.drain import Drain

log = logging.getLogger("edgellm.server")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining `drain` for up to `drain_timeout_s` before it shuts down."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None  # held: the loop keeps weak references

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our handler for SIGINT and SIGTERM while serving; the old ones restored after."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread (a test's server in a thread)
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # runs on the main thread, which is the event loop's, between two bytecodes
        if self.drain.draining or self.should_exit:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            logging.shutdown()  # flush the log first: os._exit skips that
            sys.stdout.flush()
            os._exit(128 + sig)
        self.drain.begin()  # /ready answers 503 and new requests are refused from now on
        if self._loop is None:  # not serving yet
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.drain_timeout_s)
        finally:
            self.should_exit = True
