"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings. They translate OpenAI's wire shapes to the pipeline's requests and write its
events as server-sent events; errors are rendered by edgellm.server.errors."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgellm.engine import RequestOutput
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.modelfile import file_type_name, parameter_size
from edgellm.server.errors import openai_error
from edgellm.server.guard import ParsedJsonRoute
from edgellm.server.keys import principal_of
from edgellm.server.limits import check_chat, check_completion, check_embedding, limits_of
from edgellm.server.models import ServedModel, may_use, models_of, normalised
from edgellm.server.pipeline import (
    ChatInput,
    Collected,
    GenerationRequest,
    OutputFormat,
    Piece,
    Run,
    TextInput,
    pipeline_of,
    run_headers,
    sampling_params,
)
from edgellm.server.request_id import client_of, request_id_of
from edgellm.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    EmbeddingData,
    EmbeddingList,
    EmbeddingUsage,
    FunctionCallOut,
    ModelCard,
    ModelList,
    ModelMeta,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
    documented,
)
from edgellm.server.wire import (
    COMPLETION_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
)
from edgellm.tools import ToolCall

router = APIRouter(prefix="/v1", route_class=ParsedJsonRoute)

SSE = "text/event-stream"


def _card(model: ServedModel, name: str) -> ModelCard:
    info = model.info
    digest = info.metadata.get("edgellm.sha256")  # a registry model's, or once /api/tags read it
    meta = ModelMeta(
        version=model.version,
        digest=digest if isinstance(digest, str) else None,
        size=info.size_bytes,
        format="gguf",
        family=info.architecture,
        parameter_size=parameter_size(info),
        quantization_level=file_type_name(info.metadata) or "unknown",
        context_length=info.context_length,
    )
    return ModelCard(id=name, object="model", created=model.created, owned_by="edgellm", meta=meta)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> dict[str, Any]:
    table, principal = models_of(request), principal_of(request.scope)
    cards = [
        _card(table.card(s), s.model_id) for s in table.slots() if may_use(principal, s.model_id)
    ]
    return ModelList(object="list", data=cards).body()


@router.get("/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    table = models_of(request)
    slot = table.slot(model_id, principal_of(request.scope))
    return _card(table.card(slot), slot.model_id).body()


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    check_embedding(body, limits_of(request))
    if body.dimensions is not None:  # said before a model is loaded for it
        raise ValidationError("dimensions cannot be changed for this model", param="dimensions")
    lease = await models_of(request).acquire(
        body.model, principal_of(request.scope), primary_only=True
    )
    try:
        return await _embeddings(body, request, lease.model, lease.name)
    finally:
        lease.release()


async def _embeddings(
    body: EmbeddingRequest, request: Request, model: ServedModel, name: str
) -> dict[str, Any]:
    if body.dimensions is not None:
        raise ValidationError("dimensions cannot be changed for this model", param="dimensions")
    if isinstance(body.input, str):
        texts = [body.input]
    elif all(isinstance(x, str) for x in body.input):
        texts = [x for x in body.input if isinstance(x, str)]
    else:
        raise ValidationError("token id inputs are not supported; send text", param="input")
    vectors, n_tokens = await model.embed(request, texts, truncate=False, param="input")
    data = []
    for i, vector in enumerate(vectors):
        unit = normalised(vector)
        encoded: list[float] | str = (
            base64.b64encode(struct.pack(f"<{len(unit)}f", *unit)).decode()
            if body.encoding_format == "base64"
            else unit
        )
        data.append(EmbeddingData(object="embedding", index=i, embedding=encoded))
    return EmbeddingList(
        object="list",
        data=data,
        model=name,
        usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens),
    ).body()


def _check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.n != 1:
        raise ValidationError("n > 1 is not supported yet; send n=1", param="n")
    if body.logprobs:
        raise ValidationError("logprobs are not supported yet", param="logprobs")


def _generation(
    body: ChatCompletionRequest | CompletionRequest, request: Request, given: ChatInput | TextInput
) -> GenerationRequest:
    sampling = sampling_params(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        logit_bias=body.logit_bias,
    )
    return GenerationRequest(
        "openai",
        request.url.path,
        body.model,
        given,
        sampling,
        body.token_limit,
        stream=body.stream,
        api_max_tokens=COMPLETION_TOKENS if isinstance(body, CompletionRequest) else None,
        request_id=request_id_of(request.scope),
        client=client_of(request.scope),
        principal=principal_of(request.scope),
        session=body.user or request.headers.get("x-session-id"),
    )


def message_dicts(messages: list[ChatMessage], max_depth: int) -> list[dict[str, Any]]:
    """Wire messages as the pipeline's ChatInput takes them (tool-call arguments parsed,
    nested at most `max_depth` deep)."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "name": c.function.name,
                    "arguments": c.function.argument_dict(
                        f"messages[{i}].tool_calls[{j}].function.arguments", max_depth
                    ),
                }
                for j, c in enumerate(m.tool_calls)
            ]
        out.append(d)
    return out


def _output_format(fmt: ResponseFormat | None) -> OutputFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return OutputFormat(None, "response_format")
    param = "response_format.json_schema.schema"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValidationError("json_schema.schema is required with type json_schema", param=param)
    return OutputFormat(fmt.json_schema.schema_, param)


def _tool_choice(body: ChatCompletionRequest) -> str:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return choice.function.name


@router.post(
    "/chat/completions",
    response_model=None,
    responses=documented(ChatCompletion, SSE, ChatCompletionChunk),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    """A chat completion; with `stream`, ChatCompletionChunk events."""
    limits = limits_of(request)
    check_chat(body, limits)
    _check_supported(body)
    # an unknown model (or one the key may not use) is the first thing said
    models_of(request).slot(body.model, principal_of(request.scope))
    chat = ChatInput(
        message_dicts(body.messages, limits.json_depth),
        tools=[t.tool() for t in body.tools or []],
        tool_choice=_tool_choice(body),
        format=_output_format(body.response_format),
        think=body.think,
        include_reasoning=body.include_reasoning,
    )
    run = await pipeline_of(request).start(_generation(body, request, chat))
    return await _answer(request, run, body, "chatcmpl-")


@router.post("/completions", response_model=None, responses=documented(Completion, SSE))
async def completions(
    body: CompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    """A text completion; with `stream`, Completion events."""
    check_completion(body, limits_of(request))
    _check_supported(body)
    if body.echo:
        raise ValidationError("echo is not supported yet", param="echo")
    # an unknown model (or one the key may not use) is the first thing said
    models_of(request).slot(body.model, principal_of(request.scope))
    prompt: object = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        given = TextInput([t for t in prompt if isinstance(t, int)])
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValidationError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ValidationError("the prompt is empty", param="prompt")
        given = TextInput(prompt)
    run = await pipeline_of(request).start(_generation(body, request, given))
    return await _answer(request, run, body, "cmpl-")


async def _answer(
    request: Request,
    run: Run,
    body: ChatCompletionRequest | CompletionRequest,
    id_prefix: str,
) -> JSONResponse | StreamingResponse:
    ident, created = id_prefix + run.record.request_id, int(time.time())
    meta = {
        "id": ident,
        "created": created,
        "model": run.name,
        "system_fingerprint": run.version or None,  # OpenAI's field for which weights served
    }
    chat = run.plan is not None
    if body.stream:
        return StreamingResponse(
            _sse(run, meta, chat, body.include_usage),
            media_type=SSE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **run_headers(run)},
        )
    done = await run.collect(request)
    reason = done.final.finish_reason
    choice: ChatChoice | CompletionChoice
    if chat:
        choice = ChatChoice(
            index=0, message=_message(run, done), logprobs=None, finish_reason=reason
        )
    else:
        choice = CompletionChoice(index=0, text=done.content, logprobs=None, finish_reason=reason)
    answer = (ChatCompletion if chat else Completion).model_validate(
        {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": _usage(done.final.output),
        }
    )
    return JSONResponse(answer.body(), headers=run_headers(run))


def _usage(out: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.cached_tokens),
    )


def _reasoning_fields(run: Run, text: str) -> dict[str, Any]:
    """`reasoning_content` (DeepSeek's name) and `reasoning` (vLLM's, OpenRouter's)."""
    if not run.reasoning_shown or not text:
        return {}
    return {"reasoning_content": text, "reasoning": text}


def _message(run: Run, done: Collected) -> AssistantMessage:
    calls = done.final.tool_calls
    message = AssistantMessage(
        role="assistant",
        content=done.content if done.content or not calls else None,
        **_reasoning_fields(run, done.reasoning),
    )
    if calls:
        message.tool_calls = [_tool_call(c) for c in calls]
    return message


def _tool_call(call: ToolCall, index: int | None = None) -> ToolCallOut:
    function = FunctionCallOut(name=call.name, arguments=call.arguments_json)
    if index is None:
        return ToolCallOut(id=call.id, type="function", function=function)
    return ToolCallOut(index=index, id=call.id, type="function", function=function)


def _sse_event(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def _sse(
    run: Run, meta: dict[str, Any], chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """ChatCompletionChunk (or Completion) events, then `[DONE]`; an error that comes after
    the stream began is an OpenAI error event."""
    base = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body = delta if not chat else {"delta": delta}
        choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}
        return _sse_event({**base, "choices": [choice]})

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        async for event in run.events():
            if isinstance(event, Piece):
                if chat:
                    delta = _reasoning_fields(run, event.reasoning)
                    if event.content:
                        delta["content"] = event.content
                    yield chunk(delta)
                else:
                    yield chunk({"text": event.content})
                continue
            if event.tool_calls:
                calls = [_tool_call(c, i).body() for i, c in enumerate(event.tool_calls)]
                yield chunk({"tool_calls": calls})
            yield chunk({} if chat else {"text": ""}, event.finish_reason)
            if include_usage:
                yield _sse_event({**base, "choices": [], "usage": _usage(event.output).body()})
    except EdgeLLMError as exc:
        yield _sse_event(openai_error(exc))
    finally:
        run.close()  # frees the sequence when the client left; reports the record
    yield b"data: [DONE]\n\n"
