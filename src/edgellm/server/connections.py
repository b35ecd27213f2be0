"""Connection hygiene for uvicorn: a header timeout and a cap on open connections.

uvicorn bounds an idle keep-alive connection but not one that trickles its request headers a
byte at a time, so a few hundred slow sockets would hold the server's file descriptors for
ever. `protocol_class` makes an h11 protocol that closes a connection whose request line and
headers are not complete within `header_timeout_s` of its opening (or of the previous
response), and refuses connections beyond `max_connections` at once. The body's own deadline
is the request guard's (edgellm.server.guard).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_class(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            # h11 stays IDLE until a request's line and headers are complete
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:
                self._disarm()  # a request arrived: its body is the guard's business

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def uvicorn_options(
    *, header_timeout_s: float, keep_alive_s: float, max_connections: int
) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` carrying these limits."""
    return {
        "http": protocol_class(header_timeout_s, max_connections),
        "timeout_keep_alive": max(1, round(keep_alive_s)),
        "limit_concurrency": max_connections,
        "h11_max_incomplete_event_size": 16 << 10,  # request line + headers
    }
