"""The server's log (edgellm.server.logs): one line per finished request with its fields, JSON
lines that parse, uvicorn's access lines in the same shape, and no prompt or output text unless
the operator asks for it."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from edgellm.server.logs import REQUESTS, JsonFormatter
from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, VERSION, scripted_server

pytestmark = pytest.mark.anyio

SECRET = "plover-anagram-4417"


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The request lines of the log, formatted as JSON the way --log-format json writes them."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == REQUESTS]


async def test_each_request_has_one_line_with_its_fields_and_no_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with scripted_server() as srv:
        messages = [{"role": "user", "content": SECRET}]
        ok = await srv.chat(messages=messages, headers={"X-Request-Id": "line-1"})
        assert ok.status_code == 200
        assert (await srv.chat(messages=messages, temperature=9)).status_code == 400
    first, refused = _request_lines(caplog)
    assert first["request_id"] == "line-1" and first["event"] == "request"
    assert (first["model"], first["version"], first["api"]) == (MODEL, VERSION, "openai")
    assert first["status"] == 200 and first["finish_reason"] in ("stop", "length")
    assert first["completion_tokens"] == ok.json()["usage"]["completion_tokens"]
    assert first["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
    assert isinstance(first["ttft_s"], float) and isinstance(first["e2e_s"], float)
    assert "prompt" not in first and "output" not in first
    assert (refused["status"], refused["error"]) == (400, "ValidationError")
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in everything and ok.json()["choices"][0]["message"]["content"] not in (
        everything
    )


async def test_log_prompts_puts_the_text_in(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with scripted_server(ServerSettings(log_prompts=True)) as srv:
        ok = await srv.chat(messages=[{"role": "user", "content": SECRET}])
        generate = {
            "model": MODEL,
            "prompt": SECRET,
            "raw": True,
            "stream": False,
            "options": {"num_predict": 3},
        }
        said = await srv.client.post("/api/generate", json=generate)
    chat, text = _request_lines(caplog)
    assert chat["prompt"] == [{"role": "user", "content": SECRET}]
    assert chat["output"] == ok.json()["choices"][0]["message"]["content"]
    assert (text["prompt"], text["output"]) == (SECRET, said.json()["response"])


def test_access_lines_are_fields_too() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("10.0.0.7:5123", "POST", "/v1/chat/completions", "1.1", 200),
        None,
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "access" and line["client"] == "10.0.0.7:5123"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert line["time"].endswith("Z") and line["level"] == "info"


def test_other_lines_carry_their_message_and_traceback() -> None:
    try:
        raise RuntimeError("step failed")
    except RuntimeError:
        record = logging.LogRecord(
            "edgellm.engine", logging.ERROR, __file__, 1, "engine %s", ("stops",), None
        )
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "engine stops" and "RuntimeError: step failed" in line["traceback"]
