"""The Ollama-compatible routes: /api/tags, /api/version, /api/show, /api/ps, /api/chat,
/api/generate, /api/embed, /api/embeddings.

Field names, NDJSON streaming (the default), done reasons and the nanosecond timing fields are
Ollama's. Below the model's own defaults, sampling defaults are Ollama's documented ones
(edgellm.server.defaults.OLLAMA); `options` wins over the same fields at top level.
The routes translate Ollama's wire shapes to the pipeline's requests and write its events;
errors are Ollama's `{"error": "..."}` (edgellm.server.errors).
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

from edgellm import __version__
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.modelfile import file_type_name, parameter_size
from edgellm.server.defaults import OLLAMA
from edgellm.server.errors import ollama_error
from edgellm.server.guard import ParsedJsonRoute
from edgellm.server.keys import principal_of
from edgellm.server.lifecycle.keep_alive import parse_keep_alive
from edgellm.server.limits import (
    check_embed,
    check_generate,
    check_ollama_chat,
    check_ollama_embeddings,
    limits_of,
)
from edgellm.server.models import ServedModel, may_use, models_of, normalised
from edgellm.server.ollama_wire import (
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    GeneratingBody,
    ShowBody,
)
from edgellm.server.pipeline import (
    ChatInput,
    Final,
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
    OllamaChatResponse,
    OllamaDetails,
    OllamaEmbed,
    OllamaEmbeddings,
    OllamaGenerateResponse,
    OllamaModelEntry,
    OllamaPs,
    OllamaRunningEntry,
    OllamaShow,
    OllamaTags,
    OllamaVersion,
    documented,
)

router = APIRouter(prefix="/api", route_class=ParsedJsonRoute)

NDJSON = "application/x-ndjson"
_NS = 1_000_000_000


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _tag(name: str) -> str:
    """Ollama's name:tag: a registry model's own, else the name with `latest`."""
    return name if ":" in name else f"{name}:latest"


# `edgellm models set` names that Ollama's PARAMETER calls otherwise
_OLLAMA_NAMES = {"max_tokens": "num_predict", "reasoning": "think"}


def _parameters(params: dict[str, Any]) -> str:
    """A version's serving defaults as Ollama's /api/show lists them: `name value` lines, one
    per stop string (the system prompt is the Modelfile's SYSTEM)."""
    lines = []
    for name, value in params.items():
        if name == "system":
            continue
        shown = _OLLAMA_NAMES.get(name, name)
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item) if isinstance(item, str | bool) else str(item)
            lines.append(f"{shown:<30} {text}")
    return "\n".join(lines)


def _modelfile(model: ServedModel) -> str:
    digest = model.info.metadata.get("edgellm.sha256")
    source = f"{model.model_id}@sha256:{digest}" if digest else str(model.info.path)
    lines = [f"# served by edgellm {__version__}", f"FROM {source}"]
    lines += [f"PARAMETER {line}" for line in _parameters(model.params).splitlines()]
    if model.params.get("system"):
        lines.append(f'SYSTEM """{model.params["system"]}"""')
    return "\n".join(lines) + "\n"


def _details(model: ServedModel) -> OllamaDetails:
    arch = model.info.architecture
    return OllamaDetails(
        parent_model="",
        format="gguf",
        family=arch,
        families=[arch],
        parameter_size=parameter_size(model.info),
        quantization_level=file_type_name(model.info.metadata) or "unknown",
    )


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


def _modified(model: ServedModel) -> str:
    modified = datetime.fromtimestamp(model.info.path.stat().st_mtime, UTC)
    return modified.isoformat().replace("+00:00", "Z")


async def _entry(model: ServedModel, name: str) -> dict[str, Any]:
    return {
        "name": _tag(name),
        "model": _tag(name),
        "modified_at": _modified(model),
        "size": model.info.size_bytes,
        "digest": await _digest(model),
        "details": _details(model),
    }


@router.get("/version", response_model=OllamaVersion)
async def version() -> dict[str, Any]:
    return OllamaVersion(version=__version__).body()


@router.get("/tags", response_model=OllamaTags)
async def tags(request: Request) -> dict[str, Any]:
    table, principal = models_of(request), principal_of(request.scope)
    entries = [
        OllamaModelEntry(**await _entry(table.card(slot), slot.model_id))
        for slot in table.slots()
        if may_use(principal, slot.model_id)
    ]
    return OllamaTags(models=entries).body()


@router.get("/ps", response_model=OllamaPs)
async def ps(request: Request) -> dict[str, Any]:
    table, principal = models_of(request), principal_of(request.scope)
    now, wall = time.monotonic(), time.time()
    entries = []
    for instance in table.loaded():
        if instance.state != "ready":
            continue
        names = [s.model_id for s in table.slots() if s.target == instance.key]
        if not names:  # a canary, fallback or old version of a name: named with its version
            names = [f"{instance.model.model_id}@{instance.version}"]
        names = [n for n in names if may_use(principal, n.split("@")[0])]
        if not names:
            continue
        expires = instance.expires_in(now)
        entry = await _entry(instance.model, names[0])
        entry["size"] = instance.size_bytes  # in memory, as Ollama's ps says: weights + KV
        entries.append(
            OllamaRunningEntry(
                **entry,
                expires_at=_expiry(None if expires is None else wall + expires),
                size_vram=0,
                context_length=instance.model.n_ctx,
            )
        )
    return OllamaPs(models=entries).body()


def _expiry(at: float | None) -> str:
    """Ollama's expires_at: when an idle model unloads (far in the future: never)."""
    if at is None:
        return "9999-12-31T23:59:59Z"
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


@router.post("/show", response_model=OllamaShow)
async def show(body: ShowBody, request: Request) -> dict[str, Any]:
    name = body.model or body.name
    if not name:
        raise ValidationError("model is required", param="model")
    table = models_of(request)
    slot = table.slot(name, principal_of(request.scope))
    model = table.card(slot)
    capabilities = ["completion", "tools"] + (["thinking"] if model.reasoning else [])
    info = {k: v for k, v in model.info.metadata.items() if not k.startswith("edgellm.")}
    info.pop("tokenizer.chat_template", None)
    return OllamaShow(
        license=str(info.get("general.license", "")),
        modelfile=_modelfile(model),
        parameters=_parameters(model.params),
        template=model.template.source,
        details=_details(model),
        model_info=info,
        capabilities=capabilities,
        modified_at=_modified(model),
    ).body()


def _format(fmt: str | dict[str, Any] | None) -> OutputFormat | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return OutputFormat(None, "format")
    if isinstance(fmt, dict):
        return OutputFormat(fmt, "format")
    raise ValidationError(f'format must be "json" or a JSON schema, not {fmt!r}', param="format")


def _generation(
    body: GeneratingBody,
    request: Request,
    given: ChatInput | TextInput,
    prefix: list[int] | None = None,
) -> GenerationRequest:
    option = body.option
    stop = option("stop")
    seed = option("seed")
    temperature = option("temperature")
    sampling = sampling_params(
        temperature=None if temperature is None else min(temperature, 2.0),
        top_p=option("top_p"),
        top_k=option("top_k"),
        min_p=option("min_p"),
        seed=None if seed is None or seed < 0 else seed,
        presence_penalty=option("presence_penalty"),
        frequency_penalty=option("frequency_penalty"),
        repeat_penalty=option("repeat_penalty"),
        penalty_last_n=option("repeat_last_n"),
        stop=[stop] if isinstance(stop, str) else stop,
        logit_bias=option("logit_bias"),
    )
    predict = option("num_predict")
    limit = predict if predict is not None and predict > 0 else None
    return GenerationRequest(
        "ollama",
        request.url.path,
        body.model,
        given,
        sampling,
        limit,
        stream=body.stream,
        n_ctx=option("num_ctx"),
        api_sampling=OLLAMA,
        prefix=prefix or [],
        request_id=request_id_of(request.scope),
        client=client_of(request.scope),
        principal=principal_of(request.scope),
        session=request.headers.get("x-session-id"),
        keep_alive_s=parse_keep_alive(body.keep_alive),
    )


def _no_images(images: list[str] | None, param: str) -> None:
    if images:
        raise ValidationError("this model does not take images", param=param)


@router.post("/chat", response_model=None, responses=documented(OllamaChatResponse, NDJSON))
async def chat(body: ChatBody, request: Request) -> JSONResponse | StreamingResponse:
    """A chat reply; streamed (the default) as OllamaChatResponse lines."""
    check_ollama_chat(body, limits_of(request))
    models_of(request).slot(body.model, principal_of(request.scope))
    if not body.messages:
        return await _loaded(request, body, {"message": {"role": "assistant", "content": ""}})
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
    given = ChatInput(
        messages,
        tools=[t.tool() for t in body.tools or []],
        format=_format(body.format),
        think=body.thinking,
    )
    run = await pipeline_of(request).start(_generation(body, request, given))
    return await _answer(request, run, body.stream, "message")


@router.post("/generate", response_model=None, responses=documented(OllamaGenerateResponse, NDJSON))
async def generate(body: GenerateBody, request: Request) -> JSONResponse | StreamingResponse:
    """A completion of `prompt` (in the chat template unless `raw`); streamed (the default)
    as OllamaGenerateResponse lines."""
    check_generate(body, limits_of(request))
    models_of(request).slot(body.model, principal_of(request.scope))
    _no_images(body.images, "images")
    if body.suffix:
        raise ValidationError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if not body.prompt and not body.context:
        return await _loaded(request, body, {"response": ""})
    context = body.context or []
    given: ChatInput | TextInput
    if body.raw:  # the prompt as the model sees it, control tokens included
        if body.format or body.thinking:
            raise ValidationError("raw prompts take neither format nor think", param="raw")
        given = TextInput(body.prompt, add_special=not context)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        given = ChatInput(
            [*system, {"role": "user", "content": body.prompt}],
            format=_format(body.format),
            think=body.thinking,
            param="prompt",
        )
    run = await pipeline_of(request).start(_generation(body, request, given, context))
    return await _answer(request, run, body.stream, "response")


async def _loaded(request: Request, body: GeneratingBody, empty: dict[str, Any]) -> JSONResponse:
    """Ollama's answer to a request without input: the model is loaded (with keep_alive 0:
    unloaded), nothing generated."""
    keep_alive = parse_keep_alive(body.keep_alive)
    table = models_of(request)
    slot = table.slot(body.model, principal_of(request.scope))
    if keep_alive == 0 and slot.ref is not None:  # unload, without loading it first
        await table.unload(slot.model_id)
        return JSONResponse(
            {"model": _tag(slot.model_id), "created_at": _now(), **empty, "done": True,
             "done_reason": "unload"},
        )  # fmt: skip
    lease = await table.acquire(slot.model_id, keep_alive_s=keep_alive, primary_only=True)
    lease.release(keep_alive)
    return JSONResponse(
        {"model": _tag(lease.name), "created_at": _now(), **empty, "done": True,
         "done_reason": "load"},
        headers={"X-Edgellm-Model-Version": lease.version},
    )  # fmt: skip


async def _answer(
    request: Request, run: Run, stream: bool, field: Literal["message", "response"]
) -> JSONResponse | StreamingResponse:
    shape = _Shape(_tag(run.name), field, run.include_reasoning)
    if stream:
        return StreamingResponse(_ndjson(run, shape), media_type=NDJSON, headers=run_headers(run))
    done = await run.collect(request)
    piece = shape.piece(Piece(done.reasoning, done.content), done.final)
    return JSONResponse({**piece, **shape.final(done.final)}, headers=run_headers(run))


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


async def _ndjson(run: Run, shape: _Shape) -> AsyncIterator[bytes]:
    """Response lines, the last with `done: true`; an error after the stream began is an
    `{"error": ...}` line."""

    def line(data: dict[str, Any]) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    try:
        async for event in run.events():
            if isinstance(event, Piece):
                yield line(shape.piece(event))
            else:
                yield line({**shape.piece(Piece("", ""), event), **shape.final(event)})
    except EdgeLLMError as exc:
        yield line(ollama_error(exc))
    finally:
        run.close()


@router.post("/embed", response_model=OllamaEmbed)
async def embed(body: EmbedBody, request: Request) -> dict[str, Any]:
    check_embed(body, limits_of(request))
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None:
        raise ValidationError("dimensions cannot be changed for this model", param="dimensions")
    started = time.monotonic()
    keep_alive = parse_keep_alive(body.keep_alive)
    lease = await models_of(request).acquire(
        body.model, principal_of(request.scope), keep_alive_s=keep_alive, primary_only=True
    )
    try:
        vectors, n_tokens = await lease.model.embed(
            request, texts, truncate=body.truncate, param="input"
        )
    finally:
        lease.release(keep_alive)
    return OllamaEmbed(
        model=_tag(lease.name),
        embeddings=[normalised(v) for v in vectors],
        total_duration=_ns(time.monotonic() - started),
        load_duration=0,
        prompt_eval_count=n_tokens,
    ).body()


@router.post("/embeddings", response_model=OllamaEmbeddings)
async def embeddings(body: EmbeddingsBody, request: Request) -> dict[str, Any]:
    """The older endpoint: one prompt, an unnormalised vector; an empty prompt gives []."""
    check_ollama_embeddings(body, limits_of(request))
    models_of(request).slot(body.model, principal_of(request.scope))
    if not body.prompt:
        return OllamaEmbeddings(embedding=[]).body()
    keep_alive = parse_keep_alive(body.keep_alive)
    lease = await models_of(request).acquire(
        body.model, principal_of(request.scope), keep_alive_s=keep_alive, primary_only=True
    )
    try:
        vectors, _ = await lease.model.embed(request, [body.prompt], truncate=True, param="prompt")
    finally:
        lease.release(keep_alive)
    return OllamaEmbeddings(embedding=vectors[0]).body()
