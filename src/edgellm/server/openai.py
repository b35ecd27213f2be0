"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgellm.engine import Request as EngineRequest
from edgellm.engine import RequestOutput, RequestStream, SamplingParams
from edgellm.errors import ContextOverflow, EdgeLLMError, ValidationError
from edgellm.server.disconnect import unless_disconnected
from edgellm.server.errors import stream_error
from edgellm.server.generation import Collected, Generation, Piece
from edgellm.server.guard import ParsedJsonRoute
from edgellm.server.models import ChatPlan, ModelTable, ServedModel
from edgellm.server.wire import (
    MAX_EMBED_INPUTS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
    model_card,
    usage,
)
from edgellm.structured import json_object_grammar, schema_grammar
from edgellm.tools import ToolCall

router = APIRouter(prefix="/v1", route_class=ParsedJsonRoute)


def _models(request: Request) -> ModelTable:
    table: ModelTable = request.app.state.models
    return table


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m.model_id, m.created) for m in _models(request)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    model = _models(request).get(model_id)
    return model_card(model.model_id, model.created)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    model = _models(request).get(body.model)
    if body.dimensions is not None:
        raise ValidationError("dimensions cannot be changed for this model", param="dimensions")
    if isinstance(body.input, str):
        texts = [body.input]
    elif all(isinstance(x, str) for x in body.input):
        texts = [x for x in body.input if isinstance(x, str)]
    else:
        raise ValidationError("token id inputs are not supported; send text", param="input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise ValidationError(f"at most {MAX_EMBED_INPUTS} inputs per request", param="input")
    vectors, n_tokens = await model.embed(request, texts, truncate=False, param="input")
    data = []
    for i, vector in enumerate(vectors):
        unit = normalised(vector)
        encoded: list[float] | str = (
            base64.b64encode(struct.pack(f"<{len(unit)}f", *unit)).decode()
            if body.encoding_format == "base64"
            else unit
        )
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model.model_id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


def normalised(vector: list[float]) -> list[float]:
    """Unit length, as OpenAI's and Ollama's /api/embed vectors are."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.n != 1:
        raise ValidationError("n > 1 is not supported yet; send n=1", param="n")
    if body.logprobs:
        raise ValidationError("logprobs are not supported yet", param="logprobs")


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest, grammar: str | None
) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=None if body.seed is None else body.seed & 0xFFFFFFFF,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        grammar=grammar,
        logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
    )


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Wire messages as `ServedModel.plan_chat` takes them."""
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
                        f"messages[{i}].tool_calls[{j}].function.arguments"
                    ),
                }
                for j, c in enumerate(m.tool_calls)
            ]
        out.append(d)
    return out


def _response_grammar(fmt: ResponseFormat | None) -> tuple[str | None, str | None]:
    """The grammar a response_format asks for, and the field it came from."""
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return json_object_grammar(), "response_format"
    param = "response_format.json_schema.schema"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValidationError("json_schema.schema is required with type json_schema", param=param)
    return schema_grammar(fmt.json_schema.schema_, param), param


def _tool_choice(body: ChatCompletionRequest) -> str:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return choice.function.name


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    _check_supported(body)
    model = _models(request).get(body.model)

    def plan() -> ChatPlan:  # schema conversion, grammar check, rendering, tokenizing
        grammar, grammar_param = _response_grammar(body.response_format)
        return model.plan_chat(
            message_dicts(body.messages),
            tools=[t.tool() for t in body.tools or []],
            tool_choice=_tool_choice(body),
            grammar=grammar,
            grammar_param=grammar_param,
            think=body.think,
            include_reasoning=body.include_reasoning,
        )

    chat = await asyncio.to_thread(plan)
    return await _run(request, model, body, chat.prompt, chat)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    _check_supported(body)
    if body.echo:
        raise ValidationError("echo is not supported yet", param="echo")
    model = _models(request).get(body.model)
    prompt = await asyncio.to_thread(model.completion_prompt, body.prompt)
    return await _run(request, model, body, prompt, None)


async def submit(
    model: ServedModel, engine_request: EngineRequest, prompt_param: str
) -> RequestStream:
    """Queue a request, naming the client's field when its prompt does not fit."""
    try:
        return await model.engine.submit(engine_request)
    except ContextOverflow as exc:
        if exc.param == "prompt":
            exc.param = prompt_param
        raise


async def _run(
    request: Request,
    model: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    plan: ChatPlan | None,
) -> JSONResponse | StreamingResponse:
    prompt_param = "messages" if plan is not None else "prompt"
    sampling = sampling_params(body, plan.grammar if plan is not None else None)
    engine_request = model.make_request(prompt, sampling, body.token_limit, prompt_param)
    stream = await submit(model, engine_request, prompt_param)
    generation = Generation(stream, plan)
    chat = plan is not None
    meta = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "created": int(time.time()),
        "model": model.model_id,
    }
    if body.stream:
        return StreamingResponse(
            _sse(generation, meta, chat, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    done = await unless_disconnected(request, stream.abort, generation.collect)
    final = done.final
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": _message(done, plan), "logprobs": None}
    else:
        choice = {"index": 0, "text": done.content, "logprobs": None}
    choice["finish_reason"] = final.finish_reason
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "system_fingerprint": None,
            "choices": [choice],
            "usage": _usage(final.output),
        }
    )


def _usage(output: RequestOutput) -> dict[str, Any]:
    return usage(output.prompt_tokens, output.completion_tokens, output.cached_tokens)


def _reasoning_fields(plan: ChatPlan | None, text: str) -> dict[str, Any]:
    """`reasoning_content` (DeepSeek's name) and `reasoning` (vLLM's, OpenRouter's)."""
    if plan is None or plan.reasoning is None or not plan.include_reasoning or not text:
        return {}
    return {"reasoning_content": text, "reasoning": text}


def _message(done: Collected, plan: ChatPlan | None) -> dict[str, Any]:
    calls = done.final.tool_calls
    message: dict[str, Any] = {
        "role": "assistant",
        "content": done.content if done.content or not calls else None,
        **_reasoning_fields(plan, done.reasoning),
    }
    if calls:
        message["tool_calls"] = [_tool_call(c) for c in calls]
    return message


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    out |= {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    return out


def _sse_event(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def _sse(
    generation: Generation, meta: dict[str, Any], chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {
        **meta,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "system_fingerprint": None,
    }
    if include_usage:
        base["usage"] = None
    plan = generation.plan

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body = delta if not chat else {"delta": delta}
        choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}
        return _sse_event({**base, "choices": [choice]})

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        async for event in generation.events():
            if isinstance(event, Piece):
                if chat:
                    delta = _reasoning_fields(plan, event.reasoning)
                    if event.content:
                        delta["content"] = event.content
                    yield chunk(delta)
                else:
                    yield chunk({"text": event.content})
                continue
            if event.tool_calls:
                calls = [_tool_call(c, i) for i, c in enumerate(event.tool_calls)]
                yield chunk({"tool_calls": calls})
            yield chunk({} if chat else {"text": ""}, event.finish_reason)
            if include_usage:
                yield _sse_event({**base, "choices": [], "usage": _usage(event.output)})
    except EdgeLLMError as exc:
        yield _sse_event(stream_error(exc))
    finally:
        generation.stream.abort()  # no-op when finished; frees the sequence when the client left
    yield b"data: [DONE]\n\n"
