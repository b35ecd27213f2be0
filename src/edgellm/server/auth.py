"""API-key check as pure ASGI middleware. Clients send the key either way peers accept it:
`Authorization: Bearer KEY` (OpenAI SDKs, Cherry Studio) or `X-Api-Key: KEY`. Health and
readiness probes stay open. Keys are compared in constant time."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import AuthError
from edgellm.server.errors import send_error

OPEN_PATHS = frozenset({"/", "/health", "/ready"})


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, from either header; None if it carries none."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.strip()
    return None


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", []))
        if key is not None and hmac.compare_digest(key, self._key):
            await self.app(scope, receive, send)
            return
        if key is None:
            error = AuthError("no API key: send Authorization: Bearer KEY or X-Api-Key: KEY")
        else:
            error = AuthError("the API key is not valid")
        await send_error(scope, error, send)
