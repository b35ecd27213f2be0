"""Tool calls parsed from model output: what a client could not read is left as text."""

from __future__ import annotations

from edgellm.tools import ToolCallScanner, parse_call


def test_a_call_with_a_lone_surrogate_escape_stays_text() -> None:
    # the model may write the JSON escape of an unpaired surrogate; json.loads accepts it,
    # but no client could decode the response, so it is not taken as a call
    assert parse_call('{"name": "f", "arguments": {"a": "\\ud800"}}', {"f"}) is None
    assert parse_call('{"name": "f", "arguments": "{\\"a\\": \\"\\\\udfff\\"}"}', {"f"}) is None
    assert parse_call('{"name": "f", "arguments": {"a": "\\ud83d\\ude00"}}', {"f"}) is not None


def test_a_call_nested_past_the_recursion_limit_stays_text() -> None:
    body = '{"name": "f", "arguments": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    assert parse_call(body, {"f"}) is None
    scanner = ToolCallScanner({"f"})
    text = scanner.push("<tool_call>" + body + "</tool_call>") + scanner.flush()
    assert scanner.calls == [] and text.startswith("<tool_call>")
