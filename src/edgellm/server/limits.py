"""Bounds on what one request may ask for, and the check each route runs on its body.

The bounds are server settings (`--max-messages`, `--max-stop-strings`, ...), so they cannot be
constants on the module-level wire models: pydantic checks each body's types and value ranges,
then the route calls its check here with the app's `Limits` (`limits_of(request)`) before any
other work. A refusal is a 400 naming the field (`messages[3].content`, `options.stop`) in the
route's API envelope. Counts are checked before anything walks the items they count, so a
body's cost stays proportional to what the bounds allow.

The other bounds live where their work is: the body's size, nesting and object count in the
request guard (edgellm.server.guard), the grammar's in the schema checker
(edgellm.structured.SchemaLimits, `grammar` here), the deadline in the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from edgellm.engine.request import MAX_LOGIT_BIAS
from edgellm.errors import ValidationError
from edgellm.server.ollama_wire import (
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    GeneratingBody,
    Options,
)
from edgellm.server.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ToolDef,
)
from edgellm.settings import ServerSettings
from edgellm.structured import LIMITS, SchemaLimits

_TOKEN_ID = re.compile(r"[0-9]{1,10}")


@dataclass(slots=True, frozen=True)
class Limits:
    """One server's bounds on a request (each from the `ServerSettings` field named after it)."""

    messages: int  # messages in one chat
    message_chars: int  # characters of one message's content, one prompt or one input
    request_chars: int  # characters of all of them in one request
    content_parts: int  # parts of one message's content
    tools: int  # tools in one request
    tool_schema_chars: int  # one tool's parameters schema, as compact JSON
    tool_calls: int  # tool calls in one message of the history
    json_depth: int  # nesting of a body and of tool-call arguments
    stop_strings: int
    stop_chars: int  # of one stop string
    logit_bias: int  # entries
    embed_inputs: int
    prompt_token_ids: int  # a prompt given as token ids, or Ollama's context
    grammar: SchemaLimits  # what a JSON schema may ask of its grammar

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        s = settings
        return cls(
            messages=s.max_messages,
            message_chars=s.max_message_chars,
            request_chars=s.max_request_chars,
            content_parts=s.max_content_parts,
            tools=s.max_tools,
            tool_schema_chars=s.max_tool_schema_chars,
            tool_calls=s.max_tool_calls,
            json_depth=s.max_json_depth,
            stop_strings=s.max_stop_strings,
            stop_chars=s.max_stop_chars,
            logit_bias=s.max_logit_bias,
            embed_inputs=s.max_embed_inputs,
            prompt_token_ids=s.max_prompt_token_ids,
            grammar=dataclasses.replace(LIMITS, grammar_bytes=s.max_grammar_bytes),
        )


def limits_of(request: Request) -> Limits:
    """The bounds of the app serving `request`."""
    limits: Limits = request.app.state.limits
    return limits


def _count(n: int, limit: int, param: str, what: str, setting: str) -> None:
    if n > limit:
        raise ValidationError(f"{n} {what}; at most {limit} ({setting})", param=param)


class _Chars:
    """Characters of a request's texts: each within `message_chars`, all within
    `request_chars` (refused naming `total_param`)."""

    def __init__(self, limits: Limits, total_param: str):
        self.limits = limits
        self.total_param = total_param
        self.used = 0

    def add(self, size: int, param: str) -> None:
        limits = self.limits
        if size > limits.message_chars:
            raise ValidationError(
                f"{size} characters; at most {limits.message_chars} (max_message_chars)",
                param=param,
            )
        self.used += size
        if self.used > limits.request_chars:
            raise ValidationError(
                f"over {limits.request_chars} characters in all (max_request_chars)",
                param=self.total_param,
            )


def _stops(value: str | list[str] | None, limits: Limits, param: str) -> None:
    stops = [value] if isinstance(value, str) else value or []
    _count(len(stops), limits.stop_strings, param, "stop strings", "max_stop_strings")
    for i, stop in enumerate(stops):
        if len(stop) > limits.stop_chars:
            where = param if isinstance(value, str) else f"{param}[{i}]"
            raise ValidationError(
                f"a stop string of {len(stop)} characters; at most {limits.stop_chars} "
                "(max_stop_chars)",
                param=where,
            )


def _logit_bias(value: dict[str, float] | None, limits: Limits, param: str) -> None:
    bias = value or {}
    _count(len(bias), limits.logit_bias, param, "logit_bias entries", "max_logit_bias")
    for token, amount in bias.items():
        if not _TOKEN_ID.fullmatch(token):
            raise ValidationError(
                f"keys are token ids (up to 10 ASCII digits), not {token[:20]!r}", param=param
            )
        if not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS:
            raise ValidationError(
                f"biases are between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}", param=param
            )


def _tools(tools: list[ToolDef] | None, limits: Limits) -> None:
    if not tools:
        return
    _count(len(tools), limits.tools, "tools", "tools", "max_tools")
    for i, tool in enumerate(tools):
        schema = json.dumps(tool.function.parameters, separators=(",", ":"), ensure_ascii=False)
        if len(schema) > limits.tool_schema_chars:
            raise ValidationError(
                f"a parameters schema of {len(schema)} characters; at most "
                f"{limits.tool_schema_chars} (max_tool_schema_chars)",
                param=f"tools[{i}].function.parameters",
            )


def _token_ids(ids: list[Any], limits: Limits, param: str) -> None:
    _count(len(ids), limits.prompt_token_ids, param, "token ids", "max_prompt_token_ids")


def _embedding_inputs(value: str | list[Any], limits: Limits, param: str) -> None:
    if isinstance(value, str):
        _Chars(limits, param).add(len(value), param)
        return
    if value and isinstance(value[0], int):  # one input given as token ids
        _token_ids(value, limits, param)
        return
    _count(len(value), limits.embed_inputs, param, "inputs", "max_embed_inputs")
    chars = _Chars(limits, param)
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(item, str):
            chars.add(len(item), where)
        elif isinstance(item, list):
            _token_ids(item, limits, where)


def check_chat(body: ChatCompletionRequest, limits: Limits) -> None:
    """POST /v1/chat/completions."""
    _count(len(body.messages), limits.messages, "messages", "messages", "max_messages")
    chars = _Chars(limits, "messages")
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        content = message.content
        if isinstance(content, list):
            parts = f"{where}.content"
            _count(len(content), limits.content_parts, parts, "parts", "max_content_parts")
            chars.add(sum(len(part.text) for part in content), parts)
        elif content is not None:
            chars.add(len(content), f"{where}.content")
        if message.tool_calls:
            calls = f"{where}.tool_calls"
            _count(len(message.tool_calls), limits.tool_calls, calls, "calls", "max_tool_calls")
    _tools(body.tools, limits)
    _stops(body.stop, limits, "stop")
    _logit_bias(body.logit_bias, limits, "logit_bias")


def check_completion(body: CompletionRequest, limits: Limits) -> None:
    """POST /v1/completions."""
    prompt = body.prompt
    if isinstance(prompt, str):
        _Chars(limits, "prompt").add(len(prompt), "prompt")
    elif prompt and isinstance(prompt[0], int):
        _token_ids(prompt, limits, "prompt")
    elif len(prompt) == 1 and isinstance(prompt[0], str):  # more are refused by the route
        _Chars(limits, "prompt").add(len(prompt[0]), "prompt[0]")
    _stops(body.stop, limits, "stop")
    _logit_bias(body.logit_bias, limits, "logit_bias")


def check_embedding(body: EmbeddingRequest, limits: Limits) -> None:
    """POST /v1/embeddings."""
    _embedding_inputs(body.input, limits, "input")


def _ollama_sampling(body: GeneratingBody, limits: Limits) -> None:
    options: list[tuple[Options, str]] = [(body, "")]
    if body.options is not None:
        options.append((body.options, "options."))
    for given, prefix in options:
        _stops(given.stop, limits, prefix + "stop")
        _logit_bias(given.logit_bias, limits, prefix + "logit_bias")


def check_ollama_chat(body: ChatBody, limits: Limits) -> None:
    """POST /api/chat."""
    _count(len(body.messages), limits.messages, "messages", "messages", "max_messages")
    chars = _Chars(limits, "messages")
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        chars.add(len(message.content), f"{where}.content")
        if message.thinking:
            chars.add(len(message.thinking), f"{where}.thinking")
        if message.tool_calls:
            calls = f"{where}.tool_calls"
            _count(len(message.tool_calls), limits.tool_calls, calls, "calls", "max_tool_calls")
    _tools(body.tools, limits)
    _ollama_sampling(body, limits)


def check_generate(body: GenerateBody, limits: Limits) -> None:
    """POST /api/generate."""
    chars = _Chars(limits, "prompt")
    chars.add(len(body.prompt), "prompt")
    if body.system:
        chars.add(len(body.system), "system")
    if body.context:
        _token_ids(body.context, limits, "context")
    _ollama_sampling(body, limits)


def check_embed(body: EmbedBody, limits: Limits) -> None:
    """POST /api/embed."""
    _embedding_inputs(body.input, limits, "input")


def check_ollama_embeddings(body: EmbeddingsBody, limits: Limits) -> None:
    """POST /api/embeddings."""
    _Chars(limits, "prompt").add(len(body.prompt), "prompt")
