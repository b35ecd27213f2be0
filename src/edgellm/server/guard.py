"""The request guard: pure ASGI middleware that sees every HTTP request before the routes.

1. Browser safety. A request with an `Origin` header not allowed (`--allowed-origins`; by
   default only the server's own origin on a loopback name) is refused with 403, so a web
   page the user visits cannot drive the server. When bound to loopback, a `Host` header
   that is not a loopback name, the bound address or `--allowed-hosts` is refused with 403,
   which defeats DNS rebinding (a page whose name resolves to 127.0.0.1 sends its own name).
2. Content type. POST bodies are JSON. One labelled otherwise (`curl -d` says form data) is
   read as JSON only when it carries no `Origin`: a browser's cross-site "simple" request
   needs no CORS preflight exactly when its type is not JSON.
3. The body: at most `max_body_bytes` (413), whole within `body_timeout_s` (408), parsed
   off the event loop when large, with bounded nesting and object count, no NaN or
   Infinity, no number of thousands of digits and no string that is not valid Unicode (400
   naming the field; a body nested too deep for Python's parser is scanned for where). The
   parsed value is handed to the routes (`ParsedJsonRoute`), so no body is parsed twice.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.errors import (
    EdgeLLMError,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    ValidationError,
)

PARSED_KEY = "edgellm.json"  # scope key holding the parsed body
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_INLINE_BYTES = 64 << 10  # bodies up to this are parsed on the event loop (< 1 ms)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True, frozen=True)
class GuardPolicy:
    max_body_bytes: int
    body_timeout_s: float
    allowed_origins: frozenset[str]  # exact origins ("https://app.example"), or "*"
    allowed_hosts: frozenset[str] | None  # Host names accepted; None: any
    max_json_depth: int  # nesting of objects and lists in a body
    max_json_objects: int  # JSON objects in one body (validation cost grows with them)

    @classmethod
    def build(
        cls,
        *,
        host: str,
        max_body_bytes: int,
        body_timeout_s: float,
        allowed_origins: Iterable[str],
        allowed_hosts: Iterable[str],
        loopback: bool,
        max_json_depth: int,
        max_json_objects: int,
    ) -> GuardPolicy:
        hosts = {h.lower().strip("[]") for h in allowed_hosts}
        checked = loopback or bool(hosts)  # a public bind checks Host only when told names
        if checked:
            hosts |= LOOPBACK_NAMES | {host.lower().strip("[]")}
        return cls(
            max_body_bytes,
            body_timeout_s,
            frozenset(o.rstrip("/").lower() for o in allowed_origins),
            frozenset(hosts) if checked else None,
            max_json_depth,
            max_json_objects,
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(host: str) -> str:
    """ "[::1]:8000" -> "::1", "Example.com:80" -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    def __init__(self, app: ASGIApp, policy: GuardPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            origin = self._check_browser(scope)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                scope, receive = await self._read_body(scope, receive, origin)
        except EdgeLLMError as exc:
            from edgellm.server.errors import error_response

            response = error_response(scope, exc)
            if isinstance(exc, PayloadTooLarge | RequestTimeout):
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_browser(self, scope: Scope) -> str | None:
        policy = self.policy
        host = _header(scope, b"host")
        hosts = policy.allowed_hosts
        if hosts is not None and host is not None and _host_name(host) not in hosts:
            raise Forbidden(
                f"the Host header {host!r} is not this server's name; add it with --allowed-hosts",
                param="Host",
            )
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_allowed(origin, scope):
            raise Forbidden(
                f"requests from the web origin {origin!r} are not allowed; add it with "
                "--allowed-origins",
                param="Origin",
            )
        return origin

    def _origin_allowed(self, origin: str, scope: Scope) -> bool:
        allowed = self.policy.allowed_origins
        if "*" in allowed or origin.rstrip("/").lower() in allowed:
            return True
        try:
            parts = urlsplit(origin)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        server = scope.get("server") or (None, None)
        # the server's own pages (e.g. /docs) on a loopback name
        return (parts.hostname or "") in LOOPBACK_NAMES and port == server[1]

    async def _read_body(
        self, scope: Scope, receive: Receive, origin: str | None
    ) -> tuple[Scope, Receive]:
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        is_json = content_type in ("", "application/json") or content_type.endswith("+json")
        if not is_json and origin is not None:
            raise UnsupportedMediaType(
                f"a request from a web page must send Content-Type: application/json, not "
                f"{content_type!r}",
                param="Content-Type",
            )
        body = await self._collect(scope, receive)
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        if body:
            bounds = (self.policy.max_json_depth, self.policy.max_json_objects)
            if len(body) <= _INLINE_BYTES:
                scope[PARSED_KEY] = parse_json(body, *bounds)
            else:  # in a thread: the parser's hooks let the event loop run in between
                scope[PARSED_KEY] = await asyncio.to_thread(parse_json, body, *bounds)
        return scope, _replay(body, receive)

    async def _collect(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.policy.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes", code="body_too_large")
        deadline = time.monotonic() + self.policy.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.policy.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise RequestTimeout("the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes", code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, once, as one message; then the connection's own messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def parse_json(body: bytes, max_depth: int, max_objects: int) -> Any:
    """The body as JSON, or a ValidationError naming where it is bad."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(
            "the request body is not UTF-8 (send JSON in UTF-8)", code="invalid_json"
        ) from None
    objects = 0

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal objects
        objects += 1
        if objects > max_objects:
            raise _TooMany
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except _TooMany:
        raise ValidationError(
            f"the request body has more than {max_objects} JSON objects (max_json_objects)",
            code="invalid_json",
        ) from None
    except RecursionError:  # nested too deep for the parser itself: find where, iteratively
        raise _too_deep(too_deep_at(text, max_depth), max_depth) from None
    except ValueError as exc:  # JSONDecodeError, and integers of over 4300 digits
        raise ValidationError(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    check_json(value, max_depth)
    return value


class _TooMany(Exception):
    pass


def _too_deep(path: str | None, max_depth: int) -> ValidationError:
    return ValidationError(
        f"the request body nests deeper than {max_depth} levels (max_json_depth)",
        param=path or None,
        code="invalid_json",
    )


def check_json(value: Any, max_depth: int) -> None:
    """Bounded nesting and valid Unicode everywhere in a parsed JSON value (iterative)."""
    todo: list[tuple[Any, str, int]] = [(value, "", 0)]
    while todo:
        item, path, depth = todo.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise ValidationError(
                    "text with an unpaired UTF-16 surrogate (such as \\ud800) is not valid Unicode",
                    param=path or None,
                )
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= max_depth:
            raise _too_deep(path, max_depth)
        if isinstance(item, list):
            todo += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item)]
            continue
        for key, v in item.items():
            where = f"{path}.{key}" if path else key
            if not key.isascii() and _SURROGATE.search(key):
                raise ValidationError("a key is not valid Unicode", param=path or None)
            todo.append((v, where, depth + 1))


# a JSON string, or one structural character
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def too_deep_at(text: str, max_depth: int) -> str | None:
    """The path (as `check_json` writes it) of the first object or list in JSON `text` that
    is nested `max_depth` deep, found by scanning tokens up to it; None if there is none.
    For bodies too deep for `json.loads`, which gives up without saying where."""
    # one frame per open container: [key or None, index or None]
    frames: list[list[Any]] = []
    expect_key = False
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            if len(frames) >= max_depth:
                return "".join(_step(i, frame) for i, frame in enumerate(frames)) or None
            frames.append([None, 0] if token == "[" else [None, None])
            expect_key = token == "{"
        elif token in "]}":
            if frames:
                frames.pop()
            expect_key = False
        elif token == ",":
            if frames and frames[-1][1] is not None:
                frames[-1][1] += 1
            expect_key = bool(frames) and frames[-1][1] is None
        elif expect_key and frames:  # a key of the innermost object
            frames[-1][0] = token
            expect_key = False
    return None


def _step(i: int, frame: list[Any]) -> str:
    key, index = frame
    if index is not None:
        return f"[{index}]"
    try:
        name = json.loads(key) if key is not None else "?"
    except ValueError:
        name = "?"
    return f".{name}" if i else str(name)


class ParsedJsonRoute(APIRoute):
    """A route that takes the body the guard already parsed instead of parsing it again."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if PARSED_KEY in request.scope:
                request._json = request.scope[PARSED_KEY]  # Starlette's own cache of .json()
            response: Response = await handler(request)
            return response

        return route
