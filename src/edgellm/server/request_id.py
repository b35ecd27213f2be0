"""Request ids: every response carries `X-Request-Id`, the client's own when it sent a sane one
(so a caller can follow its request through logs and records), else a new one. Pure ASGI, the
outermost layer, so error answers from the other middleware carry it too."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The id the middleware gave this request (a new one outside the middleware)."""
    state = scope.get("state") or {}
    given = state.get("request_id")
    return given if isinstance(given, str) else uuid.uuid4().hex


def client_of(scope: Scope) -> str | None:
    """The peer's address as "host:port" (a proxy's, behind one), for logs."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _chosen(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == HEADER and _SANE.fullmatch(value.strip()):
            return bytes(value).strip().decode()
    return uuid.uuid4().hex


class RequestIds:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ident = _chosen(scope)
        scope.setdefault("state", {})["request_id"] = ident

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER]
                message["headers"] = [*headers, (HEADER, ident.encode())]
            await send(message)

        await self.app(scope, receive, tagged)
