"""Response models of the OpenAI and Ollama routes, declared on the routes so that
`/openapi.json` describes what clients get back.

Fields that are always present are required (no default), so building a response names each
one; optional fields default to None and are left out of the JSON unless set (responses are
written with `exclude_unset`): a present `null` (OpenAI's `logprobs`) is set explicitly.
Stream chunks are written as plain dicts on the hot path; tests check them against the chunk
models here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# -- OpenAI ---------------------------------------------------------------------------------


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class ModelMeta(Response):
    """What edgellm adds to OpenAI's model object: the file behind the name, as Ollama's
    /api/tags describes it (OpenAI clients ignore fields they do not know)."""

    version: str  # the weights' SHA-256 prefix ("" until loaded)
    digest: str | None = None  # the weights' whole SHA-256, when known without reading them
    size: int  # bytes of the GGUF
    format: str
    family: str
    parameter_size: str
    quantization_level: str
    context_length: int | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: ModelMeta | None = None


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(Response):
    cached_tokens: int


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCallOut(Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(Response):
    index: int | None = None  # in stream deltas
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(Response):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # DeepSeek's name for the reasoning
    reasoning: str | None = None  # vLLM's and OpenRouter's
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None  # the version (weights' SHA-256 prefix) that served it
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChunkChoice(Response):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(Response):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None  # the version (weights' SHA-256 prefix) that served it
    choices: list[ChunkChoice]
    usage: Usage | None = None  # with stream_options.include_usage: null, then on the last


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(Response):
    """A text completion, and (object the same) each event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None  # the version (weights' SHA-256 prefix) that served it
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(Response):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Response):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class OpenAIErrorBody(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Response):
    error: OpenAIErrorBody


# -- Ollama ---------------------------------------------------------------------------------


class OllamaDetails(Response):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModelEntry(Response):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaDetails


class OllamaTags(Response):
    models: list[OllamaModelEntry]


class OllamaRunningEntry(OllamaModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class OllamaPs(Response):
    models: list[OllamaRunningEntry]


class OllamaVersion(Response):
    version: str


class OllamaShow(Response):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: OllamaDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaToolFunctionOut(Response):
    name: str
    arguments: dict[str, Any]


class OllamaToolCallOut(Response):
    function: OllamaToolFunctionOut


class OllamaMessageOut(Response):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[OllamaToolCallOut] | None = None


class _OllamaDone(Response):
    """The counts and timings of the last line (nanoseconds)."""

    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_OllamaDone):
    """/api/chat's answer, and each NDJSON line of a streamed one."""

    message: OllamaMessageOut


class OllamaGenerateResponse(_OllamaDone):
    """/api/generate's answer, and each NDJSON line of a streamed one."""

    response: str
    thinking: str | None = None


class OllamaEmbed(Response):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddings(Response):
    embedding: list[float]


class OllamaError(Response):
    error: str


SSE = "text/event-stream"


def documented(
    model: type[BaseModel], stream_type: str | None = None, event: type[BaseModel] | None = None
) -> dict[int | str, Any]:
    """`responses=` for a route: its JSON answer, and the media type of its stream, whose
    events are `event` (default: `model`), one per event. An SSE stream is described event by
    event, as OpenAPI 3.1 tools read `text/event-stream` (schemathesis checks each event)."""
    content: dict[str, Any] = {"application/json": {}}
    if stream_type == SSE:
        content[SSE] = {"schema": _sse_event(event or model)}
    elif stream_type is not None:  # NDJSON: one `event` per line (not described line by line)
        content[stream_type] = {"schema": {"type": "string"}}
    return {200: {"model": model, "content": content}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _sse_event(model: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: its `data` is a `model` (or, once a stream failed, an error
    object) as JSON, or the closing `[DONE]`."""
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(model), _ref(OpenAIError)]},
    }
    return {
        "type": "object",
        "properties": {
            "data": {"anyOf": [{"const": "[DONE]"}, payload]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


def describe_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with each operation's errors as they are answered: FastAPI lists a
    422 validation error, but edgellm answers 400 (and 404, 413, 503, ...) in the envelope of
    the route's API. Also adds the schemas stream events refer to."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (OpenAIError, OllamaError, ChatCompletionChunk):  # the last: stream events
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, operations in doc.get("paths", {}).items():
        name = "OllamaError" if path.startswith("/api/") else "OpenAIError"
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = {"description": "the request was refused", "content": content}
            responses["5XX"] = {"description": "overloaded, loading or failed", "content": content}
    return doc
