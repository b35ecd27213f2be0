"""One place that turns errors into the OpenAI error envelope.

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Internal errors never reach the client as text: they are logged and answered with a generic
message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.errors import EdgeLLMError, EngineError, QueueFull

log = logging.getLogger("edgellm.server")

_HTTP_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
}


def envelope(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def ollama_envelope(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Ollama's error shape, `{"error": "..."}`, which its clients read; the field is named
    in the message."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def reply(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error in the shape of the API the request was for."""
    if is_ollama(request.url.path):
        return ollama_envelope(status, message, param, headers)
    return envelope(status, message, error_type, param, code, headers)


def shown_message(exc: EdgeLLMError) -> str:
    """What a client may read: our own message, except for internal errors."""
    if exc.status_code < 500 or exc.status_code == 503 or isinstance(exc, EngineError):
        return exc.message
    return "internal server error"


def render_for_path(path: str, exc: EdgeLLMError) -> JSONResponse:
    """The error in the envelope of the API `path` belongs to."""
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    message = shown_message(exc) if exc.status_code != 500 else "internal server error"
    if is_ollama(path):
        return ollama_envelope(exc.status_code, message, exc.param, headers)
    return envelope(exc.status_code, message, exc.error_type, exc.param, exc.code, headers)


def error_response(request: Request, exc: EdgeLLMError) -> JSONResponse:
    return render_for_path(request.url.path, exc)


def ollama_message(exc: EdgeLLMError) -> str:
    """Ollama's error text: the message, prefixed by the field it is about."""
    message = shown_message(exc)
    return f"{exc.param}: {message}" if exc.param and not message.startswith(exc.param) else message


def stream_error(exc: EdgeLLMError) -> dict[str, Any]:
    """The OpenAI error object written into an SSE stream that already began."""
    message = shown_message(exc)
    return {
        "error": {"message": message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    }


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


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if err.get("type") == "missing":
        return "this field is required"
    return str(err.get("msg", "invalid value"))


def install_error_handlers(app: FastAPI) -> None:
    async def on_edgellm(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, EdgeLLMError):  # pragma: no cover - registered for this type
            raise exc
        if exc.status_code >= 500 and exc.status_code != 503:
            log.error("internal error: %s", exc.message)
        return error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        first = errors[0] if errors else {}
        param = (
            None if first.get("type") == "json_invalid" else param_from_loc(first.get("loc", ()))
        )
        message = _validation_message(first)
        if param:
            message = f"{param}: {message}"
        if first.get("type") == "json_invalid":
            return reply(request, 400, message, "invalid_request_error", None, "invalid_json")
        return reply(request, 400, message, "invalid_request_error", param, "invalid_value")

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "error"
        message = detail if isinstance(detail, str) else "invalid request"
        if status == 400 and message == "There was an error parsing the body":
            message = "the request body could not be read (is it UTF-8 JSON?)"
        return reply(request, status, message, _HTTP_TYPES.get(status, "invalid_request_error"))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return reply(request, 500, "internal server error", "server_error")

    app.add_exception_handler(EdgeLLMError, on_edgellm)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
