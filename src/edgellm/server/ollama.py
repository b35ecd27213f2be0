"""The Ollama-compatible routes: /api/tags, /api/version, /api/show, /api/ps, /api/chat,
/api/generate, /api/embed, /api/embeddings.

Field names, NDJSON streaming (the default), done reasons and the nanosecond timing fields are
Ollama's. Sampling defaults are Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9,
repeat_penalty 1.1 over the last 64 tokens); `options` wins over the same fields at top level.
Errors are Ollama's `{"error": "..."}` (edgellm.server.errors).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, field_validator

from edgellm import __version__
from edgellm.engine import SamplingParams
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.server.disconnect import unless_disconnected
from edgellm.server.errors import ollama_message
from edgellm.server.generation import Final, Generation, Piece
from edgellm.server.guard import ParsedJsonRoute
from edgellm.server.models import ChatPlan, ModelTable, ServedModel
from edgellm.server.openai import normalised, submit
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
from edgellm.structured import json_object_grammar, schema_grammar

router = APIRouter(prefix="/api", route_class=ParsedJsonRoute)

_NS = 1_000_000_000


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


class _Generating(Options):
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


class ChatBody(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)


class GenerateBody(_Generating):
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


def _models(request: Request) -> ModelTable:
    table: ModelTable = request.app.state.models
    return table


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _tag(model: ServedModel) -> str:
    return f"{model.model_id}:latest"


def _file_type(model: ServedModel) -> str:
    import gguf

    code = model.info.metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(code).name.removeprefix("MOSTLY_") if code else "unknown"
    except (TypeError, ValueError):
        return "unknown"


def _details(model: ServedModel) -> dict[str, Any]:
    arch = model.info.architecture
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": str(model.info.metadata.get("general.size_label", "")),
        "quantization_level": _file_type(model),
    }


async def _digest(model: ServedModel) -> str:
    """SHA-256 of the model file, computed once (in a thread: it reads the whole file)."""
    cached = model.info.metadata.get("edgellm.sha256")
    if isinstance(cached, str):
        return cached

    def compute() -> str:
        h = hashlib.sha256()
        with model.info.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    digest = await asyncio.to_thread(compute)
    model.info.metadata["edgellm.sha256"] = digest
    return digest


async def _entry(model: ServedModel) -> dict[str, Any]:
    modified = datetime.fromtimestamp(model.info.path.stat().st_mtime, UTC)
    return {
        "name": _tag(model),
        "model": _tag(model),
        "modified_at": modified.isoformat().replace("+00:00", "Z"),
        "size": model.info.size_bytes,
        "digest": await _digest(model),
        "details": _details(model),
    }


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [await _entry(m) for m in _models(request)]}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    loaded = [m for m in _models(request) if m.engine.ready]
    return {
        "models": [
            {
                **(await _entry(m)),
                "expires_at": "9999-12-31T23:59:59Z",  # loaded until the server stops
                "size_vram": 0,
                "context_length": m.n_ctx,
            }
            for m in loaded
        ]
    }


@router.post("/show")
async def show(body: ShowBody, request: Request) -> dict[str, Any]:
    name = body.model or body.name
    if not name:
        raise ValidationError("model is required", param="model")
    model = _models(request).get(name)
    capabilities = ["completion", "tools"] + (["thinking"] if model.reasoning else [])
    info = {k: v for k, v in model.info.metadata.items() if not k.startswith("edgellm.")}
    info.pop("tokenizer.chat_template", None)
    return {
        "license": str(info.get("general.license", "")),
        "modelfile": f"# served by edgellm {__version__}\nFROM {model.info.path}\n",
        "parameters": "",
        "template": model.template.source,
        "details": _details(model),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": (await _entry(model))["modified_at"],
    }


def _grammar(fmt: str | dict[str, Any] | None) -> str | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_object_grammar()
    if isinstance(fmt, dict):
        return schema_grammar(fmt, "format")
    raise ValidationError(f'format must be "json" or a JSON schema, not {fmt!r}', param="format")


def _sampling(body: _Generating, grammar: str | None) -> tuple[SamplingParams, int | None]:
    stop = body.option("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    seed = body.option("seed")
    temperature = body.option("temperature")
    last_n = body.option("repeat_last_n")
    sampling = SamplingParams(
        temperature=0.8 if temperature is None else min(temperature, 2.0),
        top_p=body.option("top_p") or 0.9,
        top_k=40 if body.option("top_k") is None else body.option("top_k"),
        min_p=body.option("min_p") or 0.0,
        seed=None if seed is None or seed < 0 else seed & 0xFFFFFFFF,
        presence_penalty=body.option("presence_penalty") or 0.0,
        frequency_penalty=body.option("frequency_penalty") or 0.0,
        repeat_penalty=body.option("repeat_penalty") or 1.1,
        penalty_last_n=64 if last_n is None else last_n,
        stop=tuple(s for s in stops if s),
        grammar=grammar,
        logit_bias=tuple((int(t), b) for t, b in (body.option("logit_bias") or {}).items()),
    )
    predict = body.option("num_predict")
    return sampling, predict if predict is not None and predict > 0 else None


def _no_images(images: list[str] | None, param: str) -> None:
    if images:
        raise ValidationError("this model does not take images", param=param)


@router.post("/chat", response_model=None)
async def chat(body: ChatBody, request: Request) -> JSONResponse | StreamingResponse:
    model = _models(request).get(body.model)
    if not body.messages:
        return _loaded(model, {"message": {"role": "assistant", "content": ""}})
    messages = []
    for i, m in enumerate(body.messages):
        _no_images(m.images, f"messages[{i}].images")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_name:
            d["name"] = m.tool_name
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": None, "name": c.function.name, "arguments": c.function.arguments}
                for c in m.tool_calls
            ]
        messages.append(d)

    def plan() -> ChatPlan:  # schema conversion, grammar check, rendering, tokenizing
        return model.plan_chat(
            messages,
            tools=[t.tool() for t in body.tools or []],
            grammar=_grammar(body.format),
            grammar_param="format",
            think=body.thinking,
        )

    chat_plan = await asyncio.to_thread(plan)
    return await _run(request, model, body, chat_plan.prompt, chat_plan, "message")


@router.post("/generate", response_model=None)
async def generate(body: GenerateBody, request: Request) -> JSONResponse | StreamingResponse:
    model = _models(request).get(body.model)
    _no_images(body.images, "images")
    if body.suffix:
        raise ValidationError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if not body.prompt and not body.context:
        return _loaded(model, {"response": ""})
    context = body.context or []
    bad = next((t for t in context if not 0 <= t < model.tokenizer.n_vocab), None)
    if bad is not None:
        raise ValidationError(f"token id {bad} is outside the vocabulary", param="context")
    plan: ChatPlan | None = None
    if body.raw:  # the prompt as the model sees it, control tokens included
        if body.format or body.thinking:
            raise ValidationError("raw prompts take neither format nor think", param="raw")
        prompt = await asyncio.to_thread(
            model.tokenizer.tokenize, body.prompt, add_special=not context, parse_special=True
        )
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []

        def make_plan() -> ChatPlan:
            return model.plan_chat(
                [*system, {"role": "user", "content": body.prompt}],
                grammar=_grammar(body.format),
                grammar_param="format",
                think=body.thinking,
                param="prompt",
            )

        plan = await asyncio.to_thread(make_plan)
        prompt = plan.prompt
    return await _run(request, model, body, context + prompt, plan, "response")


def _loaded(model: ServedModel, empty: dict[str, Any]) -> JSONResponse:
    """Ollama's answer to a request without input: the model is loaded, nothing generated."""
    return JSONResponse(
        {"model": _tag(model), "created_at": _now(), **empty, "done": True, "done_reason": "load"}
    )


async def _run(
    request: Request,
    model: ServedModel,
    body: _Generating,
    prompt: list[int],
    plan: ChatPlan | None,
    field: Literal["message", "response"],
) -> JSONResponse | StreamingResponse:
    sampling, limit = _sampling(body, plan.grammar if plan is not None else None)
    param = "messages" if field == "message" else "prompt"
    engine_request = model.make_request(prompt, sampling, limit, param, body.option("num_ctx"))
    stream = await submit(model, engine_request, param)
    generation = Generation(stream, plan)
    shape = _Shape(_tag(model), field, plan is not None and plan.include_reasoning)
    if body.stream:
        return StreamingResponse(_ndjson(generation, shape), media_type="application/x-ndjson")
    done = await unless_disconnected(request, stream.abort, generation.collect)
    piece = shape.piece(Piece(done.reasoning, done.content), done.final)
    return JSONResponse({**piece, **shape.final(done.final)})


class _Shape:
    """How /api/chat and /api/generate write a piece of text and the final line."""

    def __init__(self, model: str, field: Literal["message", "response"], thinking: bool):
        self.model = model
        self.field = field
        self.thinking = thinking

    def piece(self, piece: Piece, final: Final | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.field == "message":
            message: dict[str, Any] = {"role": "assistant", "content": piece.content}
            if self.thinking and piece.reasoning:
                message["thinking"] = piece.reasoning
            if final is not None and final.tool_calls:
                message["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": c.arguments}}
                    for c in final.tool_calls
                ]
            out["message"] = message
        else:
            out["response"] = piece.content
            if self.thinking and piece.reasoning:
                out["thinking"] = piece.reasoning
        out["done"] = final is not None
        return out

    def final(self, final: Final) -> dict[str, Any]:
        out = final.output
        return {
            "done_reason": out.finish_reason if out.finish_reason != "abort" else "stop",
            "total_duration": _ns(final.ended - final.started),
            "load_duration": 0,
            "prompt_eval_count": out.prompt_tokens - out.cached_tokens,
            "prompt_eval_duration": _ns(final.first_output - final.started),
            "eval_count": out.completion_tokens,
            "eval_duration": _ns(final.ended - final.first_output),
        }


def _ns(seconds: float) -> int:
    return max(0, math.floor(seconds * _NS))


async def _ndjson(generation: Generation, shape: _Shape) -> AsyncIterator[bytes]:
    def line(data: dict[str, Any]) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    try:
        async for event in generation.events():
            if isinstance(event, Piece):
                yield line(shape.piece(event))
            else:
                yield line({**shape.piece(Piece("", ""), event), **shape.final(event)})
    except EdgeLLMError as exc:
        yield line({"error": ollama_message(exc)})
    finally:
        generation.stream.abort()


@router.post("/embed")
async def embed(body: EmbedBody, request: Request) -> dict[str, Any]:
    model = _models(request).get(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None:
        raise ValidationError("dimensions cannot be changed for this model", param="dimensions")
    started = time.monotonic()
    vectors, n_tokens = await model.embed(request, texts, truncate=body.truncate, param="input")
    return {
        "model": _tag(model),
        "embeddings": [normalised(v) for v in vectors],
        "total_duration": _ns(time.monotonic() - started),
        "load_duration": 0,
        "prompt_eval_count": n_tokens,
    }


@router.post("/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request) -> dict[str, Any]:
    """The older endpoint: one prompt, an unnormalised vector; an empty prompt gives []."""
    model = _models(request).get(body.model)
    if not body.prompt:
        return {"embedding": []}
    vectors, _ = await model.embed(request, [body.prompt], truncate=True, param="prompt")
    return {"embedding": vectors[0]}
