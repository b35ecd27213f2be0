"""Request bodies of the Ollama-compatible routes: types and value ranges (the bounds set by
the server's settings are checked by edgellm.server.limits)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edgellm.server.wire import MAX_TOKENS_LIMIT, ToolDef, Wire


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
    logit_bias: dict[str, float] | None = Field(None, description="edgellm extension")


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
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = Field(None, max_length=256)


class ChatBody(GeneratingBody):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class GenerateBody(GeneratingBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = Field(None, max_length=16)
    context: list[int] | None = None


class EmbedBody(Wire):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
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
