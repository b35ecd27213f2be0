"""Wire models for the OpenAI-compatible API. Unknown fields are accepted and ignored."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from edgellm.errors import ValidationError
from edgellm.tools import Tool

MAX_TOKENS_LIMIT = 1 << 24  # far beyond any context; the context check gives the real bound
COMPLETION_TOKENS = 16  # OpenAI's max_tokens default on /v1/completions
DEFAULT = "Default: the model's (its version's, its GGUF's, else llama.cpp server's)."


def json_argument(text: str, max_depth: int) -> Any:
    """A JSON text from inside a request (tool-call arguments), bounded like a body."""
    from edgellm.server.guard import check_json

    try:
        value = json.loads(text or "{}")
        check_json(value, max_depth)
    except RecursionError:
        raise ValueError(f"nests deeper than {max_depth} levels") from None
    except ValidationError as exc:
        raise ValueError(exc.message) from None
    return value


class Wire(BaseModel):
    """Base of request bodies: unknown fields are accepted and ignored, as peers do."""

    model_config = ConfigDict(extra="ignore")


class TextPart(Wire):
    type: Literal["text"]
    text: str


ContentPart = Annotated[TextPart, Field(discriminator="type")]


class FunctionCall(Wire):
    name: str = Field(min_length=1, max_length=256)
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; Ollama an object

    def argument_dict(self, param: str, max_depth: int) -> dict[str, Any]:
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json_argument(self.arguments, max_depth)
        except ValueError as exc:
            raise ValidationError(f"arguments must be a JSON object ({exc})", param=param) from None
        if not isinstance(value, dict):
            raise ValidationError("arguments must be a JSON object", param=param)
        return value


class MessageToolCall(Wire):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = Field(None, max_length=256)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("content is required (only an assistant message may omit it)")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(Wire):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolDef(Wire):
    type: Literal["function"] = "function"
    function: FunctionDef

    def tool(self) -> Tool:
        f = self.function
        return Tool(f.name, f.description, f.parameters)


class NamedFunction(Wire):
    name: str = Field(min_length=1)


class NamedToolChoice(Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(Wire):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Wire):
    include_usage: bool = False


class _SamplingFields(Wire):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str = Field(min_length=1, max_length=256)
    user: str | None = Field(
        None,
        max_length=256,
        description="The end user; edgellm also keeps a conversation on one version by it.",
    )
    # Omitted (or null), a field takes the model's default: its version's parameters, else
    # its GGUF's general.sampling.*, else llama.cpp's server's (edgellm.server.defaults).
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description=DEFAULT)
    top_p: float | None = Field(None, gt=0.0, le=1.0, description=DEFAULT)
    top_k: int | None = Field(
        None, ge=0, le=100_000, description=f"edgellm extension; 0 disables. {DEFAULT}"
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0, description=f"edgellm extension. {DEFAULT}")
    repeat_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description=f"edgellm extension. {DEFAULT}"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="edgellm extension, for benchmarks")
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; at most one call per turn is forced
    response_format: ResponseFormat | None = None
    include_reasoning: bool = Field(True, description="edgellm/vLLM extension")
    think: bool | None = Field(None, description="edgellm extension, as Ollama's `think`")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = None
    # omitted: the version's max_tokens, else OpenAI's default here, 16 (COMPLETION_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(Wire):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
