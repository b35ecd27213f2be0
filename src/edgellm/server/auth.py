"""The key check, as pure ASGI middleware: which key a request carries, whether it is valid,
and whether its role may use the route. Clients send the key either way peers accept it:
`Authorization: Bearer KEY` (OpenAI SDKs, Cherry Studio) or `X-Api-Key: KEY`.

Auth is on while the key ring (edgellm.server.keys) holds an active key or `--api-key` is set;
then every route but OPEN_PATHS needs a key:

    no key, an unknown, revoked or expired one   401 (WWW-Authenticate: Bearer)
    a role that may not use the route            403
    admin     everything
    user      the APIs (/v1/..., /api/...) and their documents; models as its scope says
              (checked where the model is named: ModelTable.resolve, in each API's envelope)
    metrics   /metrics only

`/metrics` is open with `--metrics-public`. On an open path a valid key still counts (with one,
`/ready` shows engine statistics); an invalid one there is ignored, so probes never fail on it.
The principal goes into `scope["state"]["principal"]` (edgellm.server.keys.principal_of), also
for a request then refused with 403, so its record and audit entry name the key.
"""

from __future__ import annotations

from contextlib import suppress

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import AuthError, EdgeLLMError, Forbidden
from edgellm.server.errors import send_error
from edgellm.server.keys import API_KEY_PRINCIPAL, KeyRing, Principal, Role

__all__ = ["API_KEY_PRINCIPAL", "OPEN_PATHS", "KeyAuth", "may_call", "presented_key"]

OPEN_PATHS = frozenset({"/", "/health", "/ready"})
API_PREFIXES = ("/v1/", "/api/")  # OpenAI's and Ollama's routes: inference and listings
DOCUMENTS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
METRICS_PATH = "/metrics"


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


def may_call(role: Role, path: str) -> bool:
    """Whether a key of `role` may use `path` (its models are checked later, by name)."""
    if role == "admin":
        return True
    if path == METRICS_PATH:
        return role == "metrics"
    return role == "user" and (path.startswith(API_PREFIXES) or path in DOCUMENTS)


class KeyAuth:
    def __init__(self, app: ASGIApp, ring: KeyRing, metrics_public: bool = False):
        self.app = app
        self.ring = ring
        self.open_paths = OPEN_PATHS | ({METRICS_PATH} if metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.ring.refresh()  # a look at the database at most every RELOAD_S
        if not self.ring.enforced:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", []))
        path: str = scope["path"]
        if path in self.open_paths:
            if key is not None:
                with suppress(AuthError):  # an invalid key: answered as without one
                    _put(scope, self.ring.authenticate(key))
            await self.app(scope, receive, send)
            return
        try:
            if key is None:
                raise AuthError("no API key: send Authorization: Bearer KEY or X-Api-Key: KEY")
            principal = self.ring.authenticate(key)
            _put(scope, principal)
            if not may_call(principal.role, path):
                raise Forbidden(_refusal(principal.role, path), code="role_not_allowed")
        except EdgeLLMError as exc:
            await send_error(scope, exc, send)
            return
        await self.app(scope, receive, send)


def _refusal(role: Role, path: str) -> str:
    if role == "metrics":
        return "this API key (role metrics) may only read /metrics"
    what = "read /metrics" if path == METRICS_PATH else "use this route"
    return f"this API key (role {role}) may not {what}"


def _put(scope: Scope, principal: Principal) -> None:
    scope.setdefault("state", {})["principal"] = principal
