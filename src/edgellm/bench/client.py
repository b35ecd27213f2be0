"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Errors are classified, never raised: the benchmark reports them per kind and keeps going.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from edgellm.bench.stats import RequestRecord


@dataclass(slots=True)
class Reply:
    """A finished request: its record and the text (the next chat turn resends it)."""

    record: RequestRecord
    text: str


class _StreamFailed(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


async def send(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST `body` with streaming on and fill `record`; `record.start` is the level-relative
    send time, set by the caller."""
    sent = time.perf_counter()
    pieces: list[str] = []
    stamps: list[float] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise _StreamFailed(f"http_{response.status_code}", _error_message(response))
            async for line in response.aiter_lines():
                if _take_event(line, pieces, stamps, record):
                    break
    except _StreamFailed as exc:
        record.error, record.detail = exc.kind, exc.detail
    except httpx.TimeoutException as exc:
        record.error, record.detail = "timeout", type(exc).__name__
    except httpx.ConnectError as exc:
        record.error, record.detail = "connect", str(exc) or type(exc).__name__
    except httpx.HTTPError as exc:  # connection dropped mid-stream, bad chunking, ...
        record.error, record.detail = "stream", str(exc) or type(exc).__name__
    done = time.perf_counter()
    if record.error is None and not stamps:
        record.error, record.detail = "empty", "the stream carried no text"
    if stamps:
        record.ttft = stamps[0] - sent
        record.itls = [b - a for a, b in itertools.pairwise(stamps)]
        if not record.output_tokens:
            record.output_tokens = len(stamps)
    if record.error is None:
        record.e2e = done - sent
    return Reply(record, "".join(pieces))


def _take_event(line: str, pieces: list[str], stamps: list[float], record: RequestRecord) -> bool:
    """Handle one SSE line; True at `[DONE]`."""
    if not line.startswith("data:"):
        return False  # blank separators, comments, event names
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise _StreamFailed("stream", f"not JSON in the stream: {data[:80]!r}") from None
    if not isinstance(event, dict):
        raise _StreamFailed("stream", f"unexpected event: {data[:80]!r}")
    if "error" in event:
        raise _StreamFailed("server_error", _message_of(event["error"]))
    text = _text_of(event)
    if text:
        stamps.append(time.perf_counter())
        pieces.append(text)
    usage = event.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            record.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            record.input_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            record.cached_tokens = details["cached_tokens"]
    return False


def _text_of(event: dict[str, Any]) -> str:
    """The generated text in a chat or completion chunk (reasoning counts as output)."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        parts = (delta.get("content"), delta.get("reasoning_content"))
        return "".join(p for p in parts if isinstance(p, str))
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(payload, dict) and "error" in payload:
        return _message_of(payload["error"])
    return str(payload)[:200]


def _message_of(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message", error))[:200]
    return str(error)[:200]
