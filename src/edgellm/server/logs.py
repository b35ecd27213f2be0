"""The server's log: text or JSON lines on stderr, and one line per finished generation request.

`configure(fmt, level)` sends every logger (edgellm's and uvicorn's, its access lines included)
through one handler and formatter. `RequestLog` is a record sink: each request that reached the
pipeline gets one line (logger `edgellm.request`) with its id, model, api, status, token counts,
timings, finish reason and client address. Its prompt and output text are there only when the
operator asks (`--log-prompts`); by default no text a client sent or got is ever logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from edgellm.server.pipeline import Record

LogFormat = Literal["text", "json"]
REQUESTS = "edgellm.request"
_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}
_FIELDS = "fields"  # the LogRecord attribute that carries a structured line's fields


def configure(fmt: LogFormat, level: str) -> None:
    """One stderr handler for the whole process, in `fmt`. uvicorn must then be started with
    `log_config=None`, so that it keeps these handlers instead of installing its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """uvicorn's access line, `'%s - "%s %s HTTP/%s" %d'` with (client, method, path, http
    version, status), as fields."""
    args = record.args
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return None
    client, method, path, http_version, status = args
    return {
        "event": "access",
        "client": client,
        "method": method,
        "path": path,
        "http_version": http_version,
        "status": status,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, then either the line's
    fields (requests, access) or its message; a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, _FIELDS, None) or _access_fields(record)
        if fields is not None:
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def request_fields(record: Record, *, with_text: bool = False) -> dict[str, Any]:
    """What the log says about one finished request."""
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": record.request_id,
        "model": record.model,
        "version": record.version,
        "api": record.api,
        "route": record.route,
        "stream": record.stream,
        "status": record.status,
        "finish_reason": record.finish_reason,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "queue_s": _seconds(record.queued_s),
        "ttft_s": _seconds(record.ttft_s),
        "e2e_s": _seconds(record.e2e_s),
        "client": record.client,
    }
    if record.variant != "primary":  # a canary's or a fallback's version took it
        fields["variant"] = record.variant
    if record.error is not None:
        fields["error"] = record.error
        fields["error_code"] = record.error_code
    if with_text:
        fields["prompt"] = record.prompt
        fields["output"] = record.output
    return fields


class RequestLog:
    """The record sink that logs each finished request once."""

    def __init__(self, *, with_text: bool = False):
        self.with_text = with_text
        self.log = logging.getLogger(REQUESTS)

    def __call__(self, record: Record) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        fields = request_fields(record, with_text=self.with_text)
        shown = " ".join(
            f"{k}={json.dumps(v, ensure_ascii=False) if isinstance(v, str | list | dict) else v}"
            for k, v in fields.items()
            if k != "event" and v is not None
        )
        self.log.info(shown, extra={_FIELDS: fields})
