"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgellm.engine import RequestOutput, RequestStream
from edgellm.errors import ContextOverflow, EngineError, ValidationError
from edgellm.server.models import ModelTable, ServedModel
from edgellm.server.wire import ChatCompletionRequest, CompletionRequest, model_card, usage

router = APIRouter(prefix="/v1")


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


@dataclass(slots=True)
class _Completion:
    """How one endpoint shapes its responses; chat and text completions differ only here."""

    id_prefix: str
    object_name: str  # of whole responses
    chunk_object: str  # of stream chunks
    choice: Callable[[str, str | None], dict[str, Any]]  # (text, finish_reason) -> whole choice
    delta: Callable[[str, bool], dict[str, Any]]  # (text, first) -> stream choice body


_CHAT = _Completion(
    "chatcmpl-",
    "chat.completion",
    "chat.completion.chunk",
    choice=lambda text, fr: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": fr,
    },
    delta=lambda text, first: {
        "delta": {"role": "assistant", "content": text} if first else {"content": text}
    },
)
_TEXT = _Completion(
    "cmpl-",
    "text_completion",
    "text_completion",
    choice=lambda text, fr: {"index": 0, "text": text, "logprobs": None, "finish_reason": fr},
    delta=lambda text, _first: {"text": text},
)


def _check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.n != 1:
        raise ValidationError("n > 1 is not supported yet; send n=1", param="n")
    if body.logprobs:
        raise ValidationError("logprobs are not supported yet", param="logprobs")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    _check_supported(body)
    model = _models(request).get(body.model)
    prompt = model.chat_prompt(body)
    return await _run(request, model, body, prompt, "messages", _CHAT)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> JSONResponse | StreamingResponse:
    _check_supported(body)
    if body.echo:
        raise ValidationError("echo is not supported yet", param="echo")
    model = _models(request).get(body.model)
    prompt = model.completion_prompt(body)
    return await _run(request, model, body, prompt, "prompt", _TEXT)


async def _run(
    request: Request,
    model: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    prompt_param: str,
    shape: _Completion,
) -> JSONResponse | StreamingResponse:
    engine_request = model.make_request(prompt, body, prompt_param)
    try:
        stream = await model.engine.submit(engine_request)
    except ContextOverflow as exc:
        if exc.param == "prompt":
            exc.param = prompt_param
        raise
    meta = {
        "id": shape.id_prefix + uuid.uuid4().hex,
        "created": int(time.time()),
        "model": model.model_id,
    }
    if body.stream:
        return StreamingResponse(
            _sse(stream, meta, shape, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, last = await _collect_unless_disconnected(request, stream)
    return JSONResponse(
        {
            **meta,
            "object": shape.object_name,
            "system_fingerprint": None,
            "choices": [shape.choice(text, last.finish_reason)],
            "usage": usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
        }
    )


async def _collect(stream: RequestStream) -> tuple[str, RequestOutput]:
    parts = []
    last: RequestOutput | None = None
    async for output in stream:
        if output.error:
            raise EngineError(output.error)
        parts.append(output.text)
        last = output
    if last is None:  # pragma: no cover - a finished stream always yields a final output
        raise EngineError("the request ended without output")
    return "".join(parts), last


async def _collect_unless_disconnected(
    request: Request, stream: RequestStream
) -> tuple[str, RequestOutput]:
    """Await the whole completion, aborting it if the client goes away first."""
    work = asyncio.ensure_future(_collect(stream))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            stream.abort()
    if work.cancelled():
        raise asyncio.CancelledError  # the client is gone; nothing to answer
    return work.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_event(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def _sse(
    stream: RequestStream, meta: dict[str, Any], shape: _Completion, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {**meta, "object": shape.chunk_object, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None

    def chunk(text: str, first: bool, finish_reason: str | None) -> bytes:
        choice = {
            "index": 0,
            **shape.delta(text, first),
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return _sse_event({**base, "choices": [choice]})

    first = True
    try:
        async for output in stream:
            if output.error:
                yield _sse_event(
                    {
                        "error": {
                            "message": output.error,
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                break
            if output.text or first:
                yield chunk(output.text, first, None)
                first = False
            if output.finished:
                yield chunk("", False, output.finish_reason)
                if include_usage:
                    yield _sse_event(
                        {
                            **base,
                            "choices": [],
                            "usage": usage(
                                output.prompt_tokens, output.completion_tokens, output.cached_tokens
                            ),
                        }
                    )
        yield b"data: [DONE]\n\n"
    finally:
        stream.abort()  # no-op when finished; frees the sequence when the client left early
