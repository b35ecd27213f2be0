"""Every error a client reads is rendered here, from the exception tree (`edgellm.errors`), by
one function per API shape:

    OpenAI (/v1/..., /, /health, ...)  {"error": {"message", "type", "param", "code"}}
    Ollama (/api/...)                  {"error": "param: message"}

Routes, middleware (`error_response`, `send_error`) and streams that already began
(`openai_error`, `ollama_error` written as an event) all go through them. A class whose message
may not be shown (`EdgeLLMError.shown`) is answered "internal server error" and logged.

Every whole error answer is also reported to the app's error observers (`app.state.
error_observers`: metrics count rejections there), with whether the request pipeline already
recorded the request (`mark_recorded`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from edgellm.errors import (
    EdgeLLMError,
    MethodNotAllowed,
    RouteNotFound,
    ValidationError,
)

log = logging.getLogger("edgellm.server")

HIDDEN = "internal server error"
_RECORDED = "edgellm_recorded"

ErrorObserver = Callable[[Scope, EdgeLLMError, bool], None]  # (scope, error, recorded)


def mark_recorded(exc: BaseException) -> None:
    """`exc` ended a request the pipeline has recorded: observers must not count it again."""
    setattr(exc, _RECORDED, True)


def _observe(scope: Scope, exc: EdgeLLMError, cause: BaseException) -> None:
    app = scope.get("app")
    observers: list[ErrorObserver] = getattr(getattr(app, "state", None), "error_observers", [])
    for observer in observers:
        try:
            observer(scope, exc, getattr(cause, _RECORDED, False))
        except Exception:  # counting must never break an answer
            log.exception("an error observer failed")


def shown_message(exc: EdgeLLMError) -> str:
    """What a client may read of an error inside a stream that began (the engine's own
    reasons included)."""
    return exc.message if exc.shown else HIDDEN


def _answered(exc: EdgeLLMError) -> EdgeLLMError:
    """The error as a whole answer says it: a 500's own text stays in the log."""
    if exc.status_code != 500 or not exc.shown:
        return exc
    hidden = EdgeLLMError(HIDDEN, param=exc.param, code=exc.code)
    hidden.error_type = exc.error_type
    return hidden


def _log(exc: EdgeLLMError) -> None:
    if exc.status_code >= 500 and exc.status_code != 503:
        log.error("internal error: %s", exc.message)


def openai_error(exc: EdgeLLMError) -> dict[str, Any]:
    """The OpenAI error object, as a response body or an SSE event."""
    error = {"message": shown_message(exc), "type": exc.error_type, "param": exc.param}
    return {"error": {**error, "code": exc.code}}


def ollama_message(exc: EdgeLLMError) -> str:
    """Ollama's error text: the message, prefixed by the field it is about."""
    message = shown_message(exc)
    return f"{exc.param}: {message}" if exc.param and not message.startswith(exc.param) else message


def ollama_error(exc: EdgeLLMError) -> dict[str, Any]:
    """Ollama's error object, `{"error": "..."}`, as a response body or an NDJSON line."""
    return {"error": ollama_message(exc)}


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, exc: EdgeLLMError) -> dict[str, Any]:
    """The error in the shape of the API `path` belongs to."""
    return ollama_error(exc) if is_ollama(path) else openai_error(exc)


def error_response(
    scope: Scope, exc: EdgeLLMError, *, logged: bool = False, cause: BaseException | None = None
) -> JSONResponse:
    """The whole answer to a request that failed with `exc` (`logged`: already logged;
    `cause`: the exception as raised, when `exc` stands for it)."""
    if not logged:
        _log(exc)
    _observe(scope, exc, cause or exc)
    body = error_body(scope.get("path", ""), _answered(exc))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def send_error(scope: Scope, exc: EdgeLLMError, send: Send) -> None:
    """Answer with an error from pure ASGI middleware (before any route ran)."""
    _log(exc)
    _observe(scope, exc, exc)
    payload = json.dumps(error_body(scope.get("path", ""), _answered(exc))).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()),
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def param_from_loc(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; drops pydantic's union tags."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-" in part or part in {"str", "int", "float", "bool", "list"}:
            continue  # a union member's type tag, not a field name
        else:
            out += f".{part}" if out else part
    return out or None


def from_validation(exc: RequestValidationError) -> ValidationError:
    """FastAPI's validation error as ours: the first problem, naming its field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ValidationError("the request body is not valid JSON", code="invalid_json")
    param = param_from_loc(first.get("loc", ()))
    if first.get("type") == "missing":
        message = "this field is required"
    else:
        message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    return ValidationError(message, param=param, code="invalid_value")


def from_http(exc: StarletteHTTPException) -> EdgeLLMError:
    """Starlette's routing errors (no such path, wrong method, unreadable body) as ours."""
    detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
    error: EdgeLLMError
    if exc.status_code == 404:
        error = RouteNotFound(detail)
    elif exc.status_code == 405:
        error = MethodNotAllowed(detail, allow=(exc.headers or {}).get("Allow"))
    elif detail == "There was an error parsing the body":
        error = ValidationError("the request body could not be read (is it UTF-8 JSON?)")
    else:
        error = ValidationError(detail)
        error.status_code = exc.status_code if 400 <= exc.status_code < 500 else 400
    return error


def install_error_handlers(app: FastAPI) -> None:
    async def on_edgellm(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, EdgeLLMError):  # pragma: no cover - registered for this type
            raise exc
        return error_response(request.scope, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.scope, from_validation(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(request.scope, from_http(exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(request.scope, EdgeLLMError(HIDDEN), logged=True, cause=exc)

    app.add_exception_handler(EdgeLLMError, on_edgellm)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
