"""The one request pipeline: a typed generation request in, events and a final record out.

Every way of generating text goes through it: the OpenAI routes, the Ollama routes and the
in-process `edgellm chat`. They only translate their wire shapes to a `GenerationRequest` and
write the events (SSE, NDJSON, a terminal) and errors in their own envelope. The pipeline owns
the rest: resolving the model, rendering and tokenizing (off the event loop), submission,
streaming vs collecting, client disconnect and abort, reasoning and tool-call splitting, usage
and timings. When a request ends, however it ends, its `Record` goes to the record sinks
(metrics, quotas and the audit log consume it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request as HttpRequest

from edgellm.engine import Request as EngineRequest
from edgellm.engine import RequestOutput, RequestStream, SamplingParams
from edgellm.errors import ContextOverflow, EdgeLLMError, EngineError, OutputConstraintError
from edgellm.reasoning import ReasoningSplitter
from edgellm.server.defaults import LLAMA_SERVER, GivenSampling, model_defaults, settle_sampling
from edgellm.server.disconnect import unless_disconnected
from edgellm.server.errors import mark_recorded
from edgellm.server.keys import Principal
from edgellm.server.lifecycle import Lease, ModelTable
from edgellm.server.models import ChatPlan, ServedModel
from edgellm.structured import LIMITS, SchemaLimits, json_object_grammar, schema_grammar
from edgellm.tools import Tool, ToolCall, ToolCallScanner

log = logging.getLogger("edgellm.server")

Api = Literal["openai", "ollama", "cli", "mirror", "probe"]
# the HTTP routes of generation requests: one the pipeline never saw (its body did not parse, a
# middleware refused it) is still recorded, by `Pipeline.refused`
GENERATION_ROUTES: dict[str, Api] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/api/chat": "ollama",
    "/api/generate": "ollama",
}


@dataclass(slots=True, frozen=True)
class OutputFormat:
    """A structured output: any JSON object (`schema` None) or JSON matching `schema`."""

    schema: dict[str, Any] | None
    param: str  # the request field it came from, for errors

    def grammar(self, limits: SchemaLimits = LIMITS) -> str:
        if self.schema is None:
            return json_object_grammar()
        return schema_grammar(self.schema, self.param, limits)


@dataclass(slots=True)
class ChatInput:
    """A conversation to render with the model's chat template.

    `messages` are dicts with role, content (str) and optionally name, tool_call_id and
    tool_calls ([{"id", "name", "arguments"}]). `tool_choice` is "auto", "none", "required"
    or a tool's name."""

    messages: list[dict[str, Any]]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"
    format: OutputFormat | None = None
    think: bool | None = None
    include_reasoning: bool = True
    param: str = "messages"  # the request field the prompt comes from, for errors


@dataclass(slots=True)
class TextInput:
    """A prompt taken as it is: text (control tokens spelled out are parsed) or token ids."""

    prompt: str | list[int]
    add_special: bool = True  # prepend BOS where the model wants one
    param: str = "prompt"


@dataclass(slots=True)
class GenerationRequest:
    api: Api
    route: str  # e.g. "/v1/chat/completions", for records
    model: str  # the name the client asked for
    input: ChatInput | TextInput
    sampling: GivenSampling  # the client's fields; the pipeline adds the defaults
    max_tokens: int | None  # None: not given
    stream: bool = False
    n_ctx: int | None = None  # a smaller context the client asks for (Ollama's num_ctx)
    # The API's own defaults, below the model's (edgellm.server.defaults): its sampling, and
    # its max_tokens (OpenAI's 16 on /v1/completions; None: the server's --max-tokens-default,
    # else the rest of the context)
    api_sampling: SamplingParams = LLAMA_SERVER
    api_max_tokens: int | None = None
    prefix: list[int] = field(default_factory=list)  # token ids before the input (Ollama's context)
    prefix_param: str = "context"
    request_id: str | None = None  # the client-facing id (X-Request-Id); None: a new one
    client: str | None = None  # the peer's "host:port", for logs
    principal: Principal | None = None  # who asks (its API key); None when auth is off
    session: str | None = None  # the conversation's key: OpenAI's `user`, X-Session-Id
    keep_alive_s: float | None = None  # how long the model stays loaded after (Ollama's)

    def conversation(self) -> str:
        """The sticky key of the conversation this request belongs to (a canary sends every
        turn of one to the same version): its session, else its system prompt and first user
        message, else its prompt."""
        if self.session:
            return f"session:{self.session}"
        given = self.input
        if isinstance(given, ChatInput):
            system = next((m for m in given.messages if m["role"] in ("system", "developer")), None)
            user = next((m for m in given.messages if m["role"] == "user"), None)
            parts = [str(m.get("content") or "") if m else "" for m in (system, user)]
            return "chat:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()
        return "prompt:" + hashlib.sha256(str(given.prompt).encode()).hexdigest()


def sampling_params(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repeat_penalty: float | None = None,
    penalty_last_n: int | None = None,
    ignore_eos: bool | None = None,
    stop: Iterable[str] | None = None,
    logit_bias: dict[str, float] | None = None,
) -> GivenSampling:
    """The sampling fields a client gave (None: not given); the pipeline fills in the rest
    from the model's and the API's defaults. Seeds are taken modulo 2^32, as llama.cpp's
    sampler takes them."""
    stops = tuple(s for s in stop or () if s)
    return GivenSampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        penalty_last_n=penalty_last_n,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=None if seed is None else seed & 0xFFFFFFFF,
        ignore_eos=ignore_eos,
        stop=stops or None,
        logit_bias=tuple((int(t), b) for t, b in (logit_bias or {}).items()),
    )


@dataclass(slots=True)
class Record:
    """What happened to one generation request, once it ended (however it ended)."""

    request_id: str  # the client-facing id: X-Request-Id, and the suffix of OpenAI's `id`
    api: Api
    route: str
    model: str  # the served model's name; the requested one until it resolved
    stream: bool
    version: str = ""  # the served model's version (its file's SHA-256 prefix), once resolved
    variant: str = "primary"  # which of the name's versions took it: primary, canary, fallback
    mirror_match: bool | None = None  # a mirror copy: whether its output was the client's
    client: str | None = None  # the peer's "host:port"
    key: str | None = None  # the name of the API key it came with (never the key)
    role: str | None = None  # that key's role
    started: float = field(default_factory=time.monotonic)  # monotonic seconds: arrived
    created: float = field(default_factory=time.time)  # wall clock, for logs
    submitted: float | None = None  # rendered, tokenized and queued in the engine
    first_output: float | None = None  # the first text or token
    ended: float | None = None
    status: int = 200  # the HTTP status the client got (a stream that failed after it began
    # got 200: `error` says it failed); 499: the client went away
    error: str | None = None  # the error class, when the request failed
    error_code: str | None = None
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "abort" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    completion_tokens: int = 0
    queued_s: float | None = None  # submitted to first given a sequence by the scheduler
    token_gaps: list[float] = field(default_factory=list)  # seconds between output tokens
    prompt: Any = None  # the messages or prompt as given; only when the pipeline keeps text
    output: str | None = None  # the text generated (reasoning first); only when kept
    input_sha256: str | None = None  # of the prompt's token ids, once tokenized (`ids_digest`)
    output_sha256: str | None = None  # of the text the client got, in order, UTF-8

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.started

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


RecordSink = Callable[[Record], None]


def ids_digest(ids: list[int]) -> str:
    """SHA-256 hex of token ids written as decimal numbers joined by "," (what the model read:
    the rendered prompt, Ollama's context ids included)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


@dataclass(slots=True)
class Piece:
    """New text since the last event; either part may be empty."""

    reasoning: str
    content: str


@dataclass(slots=True)
class Final:
    output: RequestOutput  # the engine's last output: counts and finish reason
    tool_calls: list[ToolCall]
    started: float  # monotonic seconds: queued in the engine, first output, last output
    first_output: float
    ended: float

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's reason: "tool_calls" when the answer was calls."""
        if self.tool_calls and self.output.finish_reason == "stop":
            return "tool_calls"
        return self.output.finish_reason


@dataclass(slots=True)
class Collected:
    reasoning: str
    content: str
    final: Final


class Pipeline:
    """Runs generation requests against the models of a table, reporting each one's record."""

    def __init__(
        self,
        models: ModelTable,
        sinks: Iterable[RecordSink] = (),
        *,
        keep_text: bool = False,
        cache_scope: Literal["key", "global"] = "key",
        schema_limits: SchemaLimits = LIMITS,
        deadline_s: float | None = None,
    ):
        self.models = models
        self.sinks = list(sinks)
        self.keep_text = keep_text  # records carry the prompt and output (--log-prompts)
        self.cache_scope = cache_scope  # key: one API key never reuses another's cached cells
        self.schema_limits = schema_limits  # what a client's JSON schema may ask of a grammar
        self.deadline_s = deadline_s  # a request's life from its arrival (--request-timeout)
        self.live: set[Run] = set()  # submitted and not closed yet
        self.shadow_sinks: list[RecordSink] = []  # records of mirror copies and probes
        self._shadows: set[asyncio.Task[None]] = set()
        self._interrupted: Callable[[], EdgeLLMError] | None = None  # set once: refuse new runs

    async def start(self, request: GenerationRequest) -> Run:
        """Resolve, render, tokenize and submit; raises the request's error (recorded)."""
        ident = request.request_id or uuid.uuid4().hex
        record = Record(
            ident, request.api, request.route, request.model, request.stream, client=request.client
        )
        if request.principal is not None:
            record.key, record.role = request.principal.name, request.principal.role
        if self.keep_text:
            given = request.input
            record.prompt = given.messages if isinstance(given, ChatInput) else given.prompt
            record.output = ""
        lease: Lease | None = None
        try:
            lease = await self.models.acquire(
                request.model,
                request.principal,
                conversation=request.conversation(),
                keep_alive_s=request.keep_alive_s,
            )
            model = lease.model
            record.model, record.version, record.variant = lease.name, lease.version, lease.route
            defaults = model_defaults(model.params, model.info.metadata)
            given = _with_defaults(request.input, defaults, model)
            plan, prompt = await asyncio.to_thread(
                _prompt, model, given, request, self.schema_limits
            )
            record.prompt_tokens = len(prompt)
            record.input_sha256 = ids_digest(prompt)
            sampling = dataclasses.replace(
                settle_sampling(request.sampling, defaults, request.api_sampling),
                grammar=plan.grammar if plan is not None else None,
            )
            if lease.shadow is not None and sampling.seed is None:
                # a mirror copy samples as the client's request did, so that two equal
                # versions give equal answers: the seed, chosen here, is the same for both
                sampling = dataclasses.replace(sampling, seed=random.getrandbits(32))
            limit, limit_default = request.max_tokens, defaults.get("max_tokens")
            if limit is None and limit_default is None:
                limit = request.api_max_tokens
            # the engine's own id stays unique even when clients reuse an X-Request-Id
            engine_request = model.make_request(
                prompt,
                sampling,
                limit,
                given.param,
                request.n_ctx or defaults.get("num_ctx"),
                limit_default=limit_default,
            )
            if request.principal is not None:
                engine_request.tenant = request.principal.name
                if self.cache_scope == "key":
                    engine_request.cache_scope = request.principal.name
            stream = await _submit(model, engine_request, given.param)
            if self._interrupted is not None:  # it was being prepared when the drain ended
                stream.abort()
                raise self._interrupted()
        except BaseException as exc:  # recorded however it failed, then raised as it was
            if lease is not None:
                lease.drop_shadow()
                lease.release(request.keep_alive_s)
            record.ended = time.monotonic()
            self.record_failure(record, exc)
            raise
        record.submitted = time.monotonic()
        run = Run(self, model, plan, stream, record, lease)
        self.live.add(run)
        if lease.shadow is not None:
            self._shadow(run, lease, given, request, engine_request)
        return run

    def _shadow(
        self,
        run: Run,
        lease: Lease,
        given: ChatInput | TextInput,
        request: GenerationRequest,
        engine_request: EngineRequest,
    ) -> None:
        """Copy a request to another version in the background: a mirror (its answer is
        compared with the client's, then dropped) or a probe of a primary that a fallback
        has taken the traffic from. Nothing of it reaches the client."""
        kind, key = lease.shadow or ("mirror", "")
        slot = lease.slot
        slot.shadows += 1  # (a probe's `probing` flag was set when it was routed)

        async def shadow() -> None:
            record = Record(
                f"{run.record.request_id}-{kind}", kind, run.record.route, lease.name, False
            )
            record.variant = "canary" if kind == "mirror" else "primary"
            other: Lease | None = None
            try:
                other = await self.models.acquire_key(slot, key)
                record.version = other.version
                model = other.model
                plan, prompt = await asyncio.to_thread(
                    _prompt, model, given, request, self.schema_limits
                )
                sampling = dataclasses.replace(
                    engine_request.sampling, grammar=plan.grammar if plan is not None else None
                )
                copy = EngineRequest(
                    uuid.uuid4().hex, prompt, sampling, arrival_time=time.monotonic()
                )
                record.started = time.monotonic()
                stream = await model.engine.submit(copy)
                record.submitted = record.started  # its latency counts from its own submission
                raw = hashlib.sha256()
                async for output in stream:
                    if output.error is not None:
                        raise output.error
                    if record.first_output is None:
                        record.first_output = time.monotonic()
                    raw.update(output.text.encode())
                    record.completion_tokens = output.completion_tokens
                    record.prompt_tokens = output.prompt_tokens
                    if output.finished:
                        record.finish_reason = output.finish_reason
                        break
                record.ended = time.monotonic()
                other.release()  # before waiting for the client's answer to compare
                other = None
                theirs = await run.raw_digest
                if kind == "mirror" and theirs is not None:
                    record.mirror_match = raw.hexdigest() == theirs
            except Exception as exc:
                record.ended = record.ended or time.monotonic()
                record.error, record.status = type(exc).__name__, 500
                log.info("%s of %s to %s failed: %s", kind, run.record.request_id, key, exc)
            finally:
                if other is not None:
                    other.release()
                slot.shadows -= 1
                if kind == "probe" and slot.fallback is not None:
                    slot.fallback.probing = False
            if kind == "probe":
                self.models.observe(record)
            for sink in self.shadow_sinks:
                try:
                    sink(record)
                except Exception:
                    log.exception("a record sink failed")

        task = asyncio.ensure_future(shadow())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def stop_shadows(self) -> None:
        """Cancel the mirror copies and probes still running (the server stops)."""
        shadows = list(self._shadows)
        for task in shadows:
            task.cancel()
        await asyncio.gather(*shadows, return_exceptions=True)

    def interrupt(self, error: Callable[[], EdgeLLMError]) -> None:
        """End every request in flight with `error()` as its last event (a drain that timed
        out); requests still being prepared get it too, once submitted."""
        self._interrupted = error
        for run in self.live:
            run.stream.interrupt(error())

    def refused(
        self,
        route: str,
        exc: EdgeLLMError,
        request_id: str,
        client: str | None = None,
        principal: Principal | None = None,
    ) -> None:
        """Record a generation request refused before it reached the pipeline (`route` one of
        GENERATION_ROUTES): its model is unknown, its body having been refused."""
        record = Record(request_id, GENERATION_ROUTES[route], route, "", False, client=client)
        if principal is not None:
            record.key, record.role = principal.name, principal.role
        record.ended = record.started
        self.record_failure(record, exc)

    def record_failure(self, record: Record, exc: BaseException, *, answered: bool = False) -> None:
        """Report a request that ended with `exc`; `answered`: its client already got a 200
        (a stream that began), which stays its status."""
        if isinstance(exc, asyncio.CancelledError):
            status = 499  # the client went away while the request was being prepared
        else:
            status = exc.status_code if isinstance(exc, EdgeLLMError) else 500
        if not answered:
            record.status = status
        mark_recorded(exc)
        record.error = type(exc).__name__
        record.error_code = exc.code if isinstance(exc, EdgeLLMError) else None
        record.finish_reason = record.finish_reason or ("abort" if status == 499 else "error")
        self.emit(record)

    def emit(self, record: Record) -> None:
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # a broken sink must not break the request
                log.exception("a record sink failed")


def run_headers(run: Run) -> dict[str, str]:
    """Headers naming what served a request, on both APIs: the version (the weights' SHA-256
    prefix) and the route (primary, canary or fallback)."""
    return {"X-Edgellm-Model-Version": run.version, "X-Edgellm-Route": run.record.variant}


def pipeline_of(request: HttpRequest) -> Pipeline:
    """The pipeline of the app serving `request`."""
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


def _with_defaults(
    given: ChatInput | TextInput, defaults: dict[str, Any], model: ServedModel
) -> ChatInput | TextInput:
    """A chat with the version's system prompt when it has none, and its `reasoning` as the
    default of `think` (a default "on" only where the model reasons); text prompts as given."""
    if not isinstance(given, ChatInput):
        return given
    messages, think = given.messages, given.think
    system = defaults.get("system")
    if system is not None and not any(m["role"] in ("system", "developer") for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    reasoning = defaults.get("reasoning")
    if think is None and reasoning is not None and (model.reasoning is not None or not reasoning):
        think = reasoning
    return dataclasses.replace(given, messages=messages, think=think)


def _prompt(
    model: ServedModel,
    given: ChatInput | TextInput,
    request: GenerationRequest,
    limits: SchemaLimits,
) -> tuple[ChatPlan | None, list[int]]:
    """The plan (None for text prompts) and the prompt's tokens. Blocking: schema conversion,
    grammar check, rendering and tokenizing; runs in a worker thread."""
    model.check_token_ids(request.prefix, request.prefix_param)
    if isinstance(given, TextInput):
        if isinstance(given.prompt, list):
            model.check_token_ids(given.prompt, given.param)
            return None, request.prefix + given.prompt
        tokens = model.tokenizer.tokenize(
            given.prompt, add_special=given.add_special, parse_special=True
        )
        return None, request.prefix + tokens
    fmt = given.format
    plan = model.plan_chat(
        given.messages,
        tools=given.tools,
        tool_choice=given.tool_choice,
        grammar=fmt.grammar(limits) if fmt is not None else None,
        grammar_param=fmt.param if fmt is not None else None,
        schema_limits=limits,
        think=given.think,
        include_reasoning=given.include_reasoning,
        param=given.param,
    )
    return plan, request.prefix + plan.prompt


async def _submit(
    model: ServedModel, engine_request: EngineRequest, prompt_param: str
) -> RequestStream:
    """Queue a request, naming the client's field when its prompt does not fit."""
    try:
        return await model.engine.submit(engine_request)
    except ContextOverflow as exc:
        if exc.param == "prompt":
            exc.param = prompt_param
        raise


class _DeadlinePassed(EdgeLLMError):
    """Ends a request at the request timeout; never shown (the request finishes "length")."""


class Run:
    """One submitted request: its events, or its collected answer; `close` always ends it.
    At the pipeline's deadline it ends with the text generated so far, finish reason "length"
    (as llama-server's time limit ends one): what every client already reads as cut short."""

    def __init__(
        self,
        pipeline: Pipeline,
        model: ServedModel,
        plan: ChatPlan | None,
        stream: RequestStream,
        record: Record,
        lease: Lease | None = None,
    ):
        self.pipeline = pipeline
        self.model = model
        self.lease = lease  # released when the run closes: its instance may unload then
        self.name = record.model  # the name the client sent, as it is served (the tag)
        self.version = record.version  # the version that serves it
        self.plan = plan
        self.stream = stream
        self.record = record
        self._closed = False
        self._last_token: float | None = None  # when the latest output token arrived
        self._digest = hashlib.sha256()  # of the text given to the client so far
        self._raw = hashlib.sha256()  # of the engine's text, before reasoning/tool splitting
        # the engine's whole text's SHA-256 once the run closes (None: it did not finish)
        self.raw_digest: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._deadline: asyncio.TimerHandle | None = None
        if pipeline.deadline_s is not None:  # counted from the request's arrival
            left = record.started + pipeline.deadline_s - time.monotonic()
            self._deadline = asyncio.get_running_loop().call_later(max(0.0, left), self._expire)

    def _expire(self) -> None:
        """The request timeout passed: the engine drops the request, its reader gets what was
        generated, then a last output that `events` turns into finish reason "length"."""
        log.info("request %s reached the request timeout", self.record.request_id)
        self.stream.interrupt(_DeadlinePassed("the request timeout passed"))

    @property
    def include_reasoning(self) -> bool:
        """Whether the client asked for the reasoning (it gets it when the model reasons)."""
        return self.plan is not None and self.plan.include_reasoning

    @property
    def reasoning_shown(self) -> bool:
        """Whether reasoning is split out of this request's answer and given to the client."""
        plan = self.plan
        return plan is not None and plan.reasoning is not None and plan.include_reasoning

    async def events(self) -> AsyncIterator[Piece | Final]:
        """Answer and reasoning deltas, then one Final. Raises the request's error (an
        EdgeLLMError) when it ends with one."""
        plan = self.plan
        splitter = (
            ReasoningSplitter(plan.reasoning, in_reasoning=plan.in_reasoning)
            if plan is not None and plan.reasoning is not None
            else None
        )
        scanner = (
            ToolCallScanner({t.name for t in plan.tools})
            if plan is not None and plan.tools
            else None
        )
        record = self.record
        try:
            async for output in self.stream:
                self._count(output)
                if isinstance(output.error, _DeadlinePassed):  # ends as cut short: its text
                    output = dataclasses.replace(output, error=None, finish_reason="length")
                if output.error is not None:
                    error = output.error
                    if isinstance(error, OutputConstraintError) and plan is not None:
                        error.param = error.param or plan.grammar_param
                    raise error
                if record.first_output is None:
                    record.first_output = time.monotonic()
                self._raw.update(output.text.encode())
                reasoning, content = splitter.push(output.text) if splitter else ("", output.text)
                if output.finished and splitter is not None:
                    more_reasoning, more_content = splitter.flush()
                    reasoning, content = reasoning + more_reasoning, content + more_content
                if scanner is not None:
                    content = scanner.push(content) + (scanner.flush() if output.finished else "")
                if plan is not None and not plan.include_reasoning:
                    reasoning = ""
                if reasoning or content:
                    self._digest.update((reasoning + content).encode())
                    if record.output is not None:
                        record.output += reasoning + content
                    yield Piece(reasoning, content)
                if output.finished:
                    calls = scanner.calls if scanner is not None else []
                    record.ended = time.monotonic()
                    submitted = record.submitted or record.started
                    final = Final(output, calls, submitted, record.first_output, record.ended)
                    record.finish_reason = final.finish_reason
                    yield final
        except EdgeLLMError as exc:
            self.close(exc)
            raise

    def _count(self, output: RequestOutput) -> None:
        record = self.record
        if output.completion_tokens > record.completion_tokens:
            now = time.monotonic()
            if self._last_token is not None:
                record.token_gaps.append(now - self._last_token)
            self._last_token = now
        if record.queued_s is None:
            record.queued_s = output.queued_s
        record.prompt_tokens = output.prompt_tokens
        record.cached_tokens = output.cached_tokens
        record.completion_tokens = output.completion_tokens

    async def collect(self, http_request: HttpRequest | None = None) -> Collected:
        """The whole answer; stops (and aborts) when the client of `http_request` goes away."""

        async def gather() -> Collected:
            reasoning: list[str] = []
            content: list[str] = []
            async for event in self.events():
                if isinstance(event, Final):
                    return Collected("".join(reasoning), "".join(content), event)
                reasoning.append(event.reasoning)
                content.append(event.content)
            raise EngineError("the request ended without output")  # pragma: no cover

        try:
            if http_request is None:
                return await gather()
            return await unless_disconnected(http_request, self.stream.abort, gather)
        finally:
            self.close()

    def close(self, error: EdgeLLMError | None = None) -> None:
        """End the request (a no-op for the engine once it finished) and report its record,
        once. A request that neither finished nor failed was abandoned by its client."""
        if self._closed:
            return
        self._closed = True
        self.pipeline.live.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
        self.stream.abort()
        record = self.record
        record.output_sha256 = self._digest.hexdigest()
        if not self.raw_digest.done():
            finished = error is None and record.finish_reason is not None
            self.raw_digest.set_result(self._raw.hexdigest() if finished else None)
        if self.lease is not None:
            self.lease.release()
        if record.ended is None:
            record.ended = time.monotonic()
        if error is not None:
            self.pipeline.record_failure(record, error, answered=record.stream)
            return
        if record.finish_reason is None:
            record.status, record.finish_reason = 499, "abort"
        self.pipeline.emit(record)
