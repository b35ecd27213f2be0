"""The models a server instance serves, and turning wire requests into engine requests."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request as HttpRequest

from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Request, SamplingParams, Tokenizer
from edgellm.engine.runner import Embedder
from edgellm.engine.turns import StepTurns
from edgellm.errors import ContextOverflow, ValidationError
from edgellm.modelfile import ModelInfo
from edgellm.reasoning import ReasoningFormat, opens_reasoning
from edgellm.server.disconnect import unless_disconnected
from edgellm.server.keys import Principal
from edgellm.structured import LIMITS, SchemaLimits, tool_call_grammar
from edgellm.tools import Tool, fallback_instructions, render_call
from edgellm.user_text import UserText


def normalised(vector: list[float]) -> list[float]:
    """Unit length, as OpenAI's and Ollama's /api/embed vectors are."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


@dataclass(slots=True)
class ChatPlan:
    """A rendered chat and how to read the model's answer to it."""

    prompt: list[int]
    grammar: str | None
    tools: list[Tool]  # tools whose calls are parsed out of the answer
    reasoning: ReasoningFormat | None
    in_reasoning: bool  # the prompt ends inside an opened reasoning block
    include_reasoning: bool  # whether the client gets the reasoning
    param: str  # the request field the prompt came from, for errors
    grammar_param: str | None = None  # the request field the grammar came from, for errors


@dataclass(slots=True)
class ServedModel:
    model_id: str  # the name clients send as `model`
    info: ModelInfo
    template: ChatTemplate
    engine: AsyncEngine
    max_tokens_default: int | None = None  # when a request omits max_tokens; None: rest of ctx
    # the version's serving defaults (`edgellm models set`): checked values by their canonical
    # names (edgellm.registry.params); they fill what a request omits (edgellm.server.defaults)
    params: dict[str, Any] = field(default_factory=dict)
    reasoning: ReasoningFormat | None = None  # how the model marks its thinking; None: it does not
    created: int = field(default_factory=lambda: int(time.time()))
    make_embedder: Callable[[], Embedder] | None = None  # built on first use
    version_of: Callable[[], str] = lambda: ""  # the weights' SHA-256 prefix, once loaded
    turns: StepTurns | None = None  # shared with the process's engines: embeddings take turns
    _embedder: Embedder | None = None
    _user_text: UserText | None = None
    _embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        """Which weights serve this name: its file's SHA-256 prefix ("" until loaded)."""
        return self.version_of()

    async def embed(
        self, request: HttpRequest, texts: list[str], *, truncate: bool, param: str
    ) -> tuple[list[list[float]], int]:
        """Pooled embeddings of `texts` (unnormalised) and the tokens they took; stops between
        inputs when the client of `request` goes away."""
        cancel = threading.Event()
        return await unless_disconnected(
            request,
            cancel.set,
            lambda: asyncio.to_thread(self._embed, texts, truncate, param, cancel),
        )

    def _embed(
        self, texts: list[str], truncate: bool, param: str, cancel: threading.Event
    ) -> tuple[list[list[float]], int]:
        if self.make_embedder is None:
            raise ValidationError(f"the model '{self.model_id}' has no embeddings", param="model")
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self.make_embedder()
        embedder = self._embedder
        n_ctx = embedder.n_ctx
        vectors, total = [], 0
        for i, text in enumerate(texts):
            where = f"{param}[{i}]" if len(texts) > 1 else param
            tokens = self.tokenizer.tokenize(text, add_special=True, parse_special=False)
            if not text or not tokens:
                raise ValidationError("an embedding input is empty", param=where)
            if len(tokens) > n_ctx and not truncate:
                raise ContextOverflow(
                    f"the input is {len(tokens)} tokens; embeddings take at most {n_ctx}",
                    param=where,
                )
            if cancel.is_set():
                break  # the client is gone: nobody will read the rest
            with self._embed_lock:  # one input at a time: requests take turns between inputs
                if self.turns is None:
                    vectors.append(embedder.embed(tokens[:n_ctx]))
                else:  # and with the engines' steps, so the cores are not oversubscribed
                    with self.turns.turn():
                        vectors.append(embedder.embed(tokens[:n_ctx]))
            total += len(tokens[:n_ctx])
        return vectors, total

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def n_ctx(self) -> int:
        """The most cells one request can hold (its own stream in the split layout)."""
        config = self.engine.engine.scheduler.config
        return config.seq_cells or config.n_ctx

    def plan_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[Tool] | None = None,
        tool_choice: str = "auto",
        grammar: str | None = None,
        grammar_param: str | None = None,
        think: bool | None = None,
        include_reasoning: bool = True,
        param: str = "messages",
        schema_limits: SchemaLimits = LIMITS,
    ) -> ChatPlan:
        """Render a chat for this model and decide how its output is taken apart.

        `messages` are dicts with role, content (str) and optionally tool_calls
        ([{"id", "name", "arguments"}]), tool_call_id and name. `tool_choice` is "auto",
        "none", "required" or a tool's name; "required" and a name force one call by grammar.
        `grammar_param` names the field `grammar` came from; `schema_limits` bound the grammar
        of a forced call made from the tools' schemas. Blocking (the grammar is compiled
        in a sandbox, the prompt tokenized): call it from a worker thread.
        """
        if think and self.reasoning is None:
            raise ValidationError(
                f"the model '{self.model_id}' does not reason; `think` needs a reasoning model",
                param="think",
            )
        tools = _chosen_tools(list(tools or []), tool_choice)
        if tools and tool_choice != "auto":
            if grammar is not None:
                raise ValidationError(
                    "a structured output format cannot be combined with a forced tool call",
                    param="tool_choice",
                )
            calls = [(t.name, t.parameters) for t in tools]
            grammar = tool_call_grammar(calls, "tools", schema_limits)
            grammar_param = "tools"
        if grammar is not None:
            grammar_param = grammar_param or "response_format"
            reason = self.tokenizer.grammar_error(grammar)
            if reason is not None:
                raise ValidationError(f"{grammar_param}: {reason}", param=grammar_param)
        originals: list[str] = []
        text = self._render(messages, tools, think, originals)
        bos = self.template.bos_token
        prompt = self.user_text.tokenize(
            text, originals, self._tokenize, add_special=not (bos and text.startswith(bos))
        )
        in_reasoning = self.reasoning is not None and opens_reasoning(text, self.reasoning)
        return ChatPlan(
            prompt=prompt,
            grammar=grammar,
            tools=tools,
            reasoning=self.reasoning,
            in_reasoning=in_reasoning,
            include_reasoning=include_reasoning and think is not False,
            param=param,
            grammar_param=grammar_param,
        )

    @property
    def user_text(self) -> UserText:
        """Control-token spellings of this model's vocabulary, kept out of client text."""
        if self._user_text is None:
            self._user_text = UserText(self.tokenizer.control_texts())
        return self._user_text

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.tokenizer.tokenize(text, add_special=add_special, parse_special=parse_special)

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Tool],
        think: bool | None,
        originals: list[str],
    ) -> str:
        """The prompt text, client strings protected by placeholders (`originals`)."""
        native = self.template.supports_tools
        rendered = []
        for m in messages:
            role = "system" if m["role"] == "developer" else m["role"]
            out: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
            for key in ("name", "tool_call_id"):
                if m.get(key):
                    out[key] = m[key]
            calls = m.get("tool_calls") or []
            if calls and native:
                out["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ]
            elif calls:
                out["content"] += "".join(
                    render_call({"name": c["name"], "arguments": c["arguments"]}) for c in calls
                )
            rendered.append(out)
        extra: dict[str, Any] = {}
        if tools and native:
            extra["tools"] = self.user_text.protect([t.as_openai() for t in tools], originals)
        elif tools:
            instructions = fallback_instructions(tools)
            if rendered and rendered[0]["role"] == "system":
                rendered[0]["content"] = f"{rendered[0]['content']}\n\n{instructions}"
            else:
                rendered.insert(0, {"role": "system", "content": instructions})
        if think is not None:
            extra["enable_thinking"] = think
        rendered = self.user_text.protect(rendered, originals)
        return self.template.render(rendered, add_generation_prompt=True, **extra)

    def check_token_ids(self, tokens: list[int], param: str) -> None:
        bad = next((t for t in tokens if not 0 <= t < self.tokenizer.n_vocab), None)
        if bad is not None:
            raise ValidationError(f"token id {bad} is outside the vocabulary", param=param)

    def make_request(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        limit: int | None,
        prompt_param: str,
        n_ctx: int | None = None,
        request_id: str | None = None,
        *,
        limit_default: int | None = None,
    ) -> Request:
        """An engine request: `limit` tokens at most (None: the rest of the context, at most
        `limit_default`, else the server's max_tokens_default), within `n_ctx` (a client's
        smaller context, as Ollama's num_ctx) or the model's."""
        bad = next((t for t, _ in sampling.logit_bias if t >= self.tokenizer.n_vocab), None)
        if bad is not None:
            raise ValidationError(f"token id {bad} is outside the vocabulary", param="logit_bias")
        n_ctx = min(n_ctx or self.n_ctx, self.n_ctx)
        if limit is None:
            limit = max(1, n_ctx - len(prompt))
            default = limit_default or self.max_tokens_default
            if default is not None:
                limit = min(limit, default)
        if len(prompt) >= n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens; the context is {n_ctx} tokens",
                param=prompt_param,
            )
        limit = min(limit, n_ctx - len(prompt)) if n_ctx < self.n_ctx else limit
        sampling = dataclasses.replace(sampling, max_tokens=limit)
        if sampling.penalty_last_n < 0:  # -1: the whole context, as llama-server and Ollama
            sampling = dataclasses.replace(sampling, penalty_last_n=n_ctx)  # (libllama: off)
        request_id = request_id or uuid.uuid4().hex
        return Request(request_id, prompt, sampling, arrival_time=time.monotonic())


def _chosen_tools(tools: list[Tool], tool_choice: str) -> list[Tool]:
    """The tools the model may call under `tool_choice`."""
    if tool_choice == "none":
        return []
    if tool_choice not in ("auto", "required"):
        tools = [t for t in tools if t.name == tool_choice]
        if not tools:
            raise ValidationError(
                f"tool_choice names '{tool_choice}', which is not among the tools",
                param="tool_choice",
            )
    if len({t.name for t in tools}) != len(tools):
        raise ValidationError("two tools have the same name", param="tools")
    return tools


def name_keys(name: str) -> list[tuple[str, str]]:
    """The (name, tag) pairs a requested name may mean: "smollm2:latest" is ("smollm2",
    "latest"); a name without a tag means "latest", as in Ollama; a model whose own name holds
    a colon is found by that whole name first."""
    keys = [(name, "latest")]
    base, sep, tag = name.rpartition(":")
    if sep and base and tag:
        keys.append((base, tag))
    return keys


def may_use(principal: Principal | None, name: str) -> bool:
    """Whether a key may use the model `name`: a scope entry "m" allows m under any tag,
    "m:t" only that tag; no principal (auth off) or no scope allows every model."""
    if principal is None or principal.models is None:
        return True
    scope = principal.models
    return any(base in scope or f"{base}:{tag}" in scope for base, tag in name_keys(name))


def models_of(request: HttpRequest) -> ModelTable:
    """The model table of the app serving `request`."""
    table: ModelTable = request.app.state.models
    return table


if TYPE_CHECKING:
    from edgellm.server.lifecycle import ModelTable
