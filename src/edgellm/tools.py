"""Tool calling: tool definitions into the prompt, tool calls out of the generated text.

Calls are written in the widespread `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
form. A chat template that renders `tools` itself gets the definitions as its `tools`
variable; for one that does not, the definitions and this calling convention go into the
system message (the documented fallback). `ToolCallScanner` watches the answer text as it
streams: text that may be the start of a call is held back, calls are collected whole.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgellm.reasoning import partial_suffix
from edgellm.structured import TOOL_CALL_END, TOOL_CALL_START


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def fallback_instructions(tools: list[Tool]) -> str:
    """System-prompt text teaching a template without tool support how to call tools."""
    listing = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call the following tools. To call one, reply with only\n"
        f'{TOOL_CALL_START}{{"name": "<tool name>", "arguments": {{...}}}}{TOOL_CALL_END}\n'
        "Tool results come back in messages from the tool role.\n"
        f"Tools:\n{listing}"
    )


def render_call(call: dict[str, Any]) -> str:
    """An earlier assistant tool call as the text the model would have written."""
    return f"{TOOL_CALL_START}{json.dumps(call, ensure_ascii=False)}{TOOL_CALL_END}"


def parse_call(body: str, known: set[str]) -> ToolCall | None:
    """The JSON inside one `<tool_call>` block, or None when it is not a call of a known tool
    (or not valid Unicode: the model may write `\\ud800` escapes that no client can read)."""
    try:
        data = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    if not isinstance(data, dict) or data.get("name") not in known:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
            json.dumps(arguments, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(str(data["name"]), arguments)


class ToolCallScanner:
    """Feed answer text with `push`, end with `flush`; both return the text that is plain
    answer. Complete calls accumulate in `calls`; a block that does not parse as a call of a
    known tool is given back as text."""

    __slots__ = ("_held", "_inside", "_known", "calls")

    def __init__(self, known: set[str]):
        self._known = known
        self._held = ""
        self._inside = False
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> str:
        self._held += text
        out = ""
        while True:
            if self._inside:
                cut = self._held.find(TOOL_CALL_END)
                if cut < 0:
                    return out
                body = self._held[len(TOOL_CALL_START) : cut]
                block = self._held[: cut + len(TOOL_CALL_END)]
                self._held = self._held[cut + len(TOOL_CALL_END) :]
                self._inside = False
                out += self._take(body, block)
                continue
            start = self._held.find(TOOL_CALL_START)
            if start >= 0:
                out += self._held[:start]
                self._held = self._held[start:]
                self._inside = True
                continue
            keep = partial_suffix(self._held, TOOL_CALL_START)
            out += self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep :]
            return out

    def flush(self) -> str:
        held, self._held = self._held, ""
        if self._inside:  # generation ended inside a call: keep it if its JSON is whole
            self._inside = False
            return self._take(held[len(TOOL_CALL_START) :], held)
        return held

    def _take(self, body: str, block: str) -> str:
        call = parse_call(body.strip(), self._known)
        if call is None:
            return block
        self.calls.append(call)
        return ""
