"""Request bodies of the Ollama-compatible routes, with their bounds (see edgellm.server.wire
for the limits shared with the OpenAI routes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from edgellm.server.wire import (
    MAX_EMBED_INPUTS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_MESSAGES,
    MAX_PROMPT_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    ToolDef,
    Wire,
    check_logit_bias,
    check_stops,
)


class Options(Wire):
    """Ollama's `options` (also accepted at the top level of a request)."""

    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    num_predict: int | None = Field(None, ge=-2, le=MAX_TOKENS_LIMIT)
    num_ctx: int | None = Field(None, ge=1, le=1 << 24)
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(None, ge=-1, le=1 << 16)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_ENTRIES, description="edgellm extension"
    )

    _check_bias = field_validator("logit_bias")(check_logit_bias)
    _check_stop = field_validator("stop")(check_stops)


class GeneratingBody(Options):
    """Fields shared by /api/chat and /api/generate."""

    model: str = Field(min_length=1, max_length=256)
    options: Options | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: str | int | float | None = None  # accepted: the model stays loaded

    def option(self, name: str) -> Any:
        given = getattr(self.options, name) if self.options is not None else None
        return given if given is not None else getattr(self, name)

    @property
    def thinking(self) -> bool | None:
        return None if self.think is None else self.think is not False


class OllamaToolFunction(Wire):
    name: str = Field(min_length=1, max_length=256)
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(Wire):
    function: OllamaToolFunction


class OllamaMessage(Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = Field(None, max_length=16)
    tool_calls: list[OllamaToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)
    tool_name: str | None = Field(None, max_length=256)


class ChatBody(GeneratingBody):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)


class GenerateBody(GeneratingBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = Field(None, max_length=16)
    context: list[int] | None = Field(None, max_length=MAX_PROMPT_TOKEN_IDS)


class EmbedBody(Wire):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1, max_length=MAX_EMBED_INPUTS)
    truncate: bool = True
    options: Options | None = None
    keep_alive: str | int | float | None = None
    dimensions: int | None = None


class EmbeddingsBody(Wire):
    model: str = Field(min_length=1, max_length=256)
    prompt: str
    options: Options | None = None
    keep_alive: str | int | float | None = None


class ShowBody(Wire):
    model: str | None = None
    name: str | None = None  # the older field name
    verbose: bool = False
