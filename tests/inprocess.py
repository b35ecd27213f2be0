"""The in-process test seam: the real app, pipeline and engine around a scripted runner,
driven through httpx's ASGI transport. No process, no model weights: errors, limits, auth,
wire shapes and engine faults get fast tests. (The header, chat template and metadata are the
real default model's, read from its GGUF header; tokens are the scripted runner's.)

    async with scripted_server() as srv:
        r = await srv.client.post("/v1/chat/completions", json={...})
        srv.runner.fail_with = RuntimeError("boom")  # the next engine step raises
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from edgellm.chat_template import ChatTemplate
from edgellm.engine import AsyncEngine, Engine, RunnerOutput, SchedulerConfig, SchedulerOutput
from edgellm.modelfile import ModelInfo, default_model_path, inspect_gguf
from edgellm.server import create_app
from edgellm.server.keys import KeyStore, Principal
from edgellm.server.models import ServedModel
from edgellm.server.pipeline import Record, RecordSink
from edgellm.settings import ServerSettings
from tests.fakes import EOS, ScriptedRunner

MODEL = "scripted"
VERSION = "0123456789ab"  # what a served model's version looks like: a SHA-256 prefix


@dataclass
class TextRunner(ScriptedRunner):
    """The scripted runner with a tokenizer for any text (one token per UTF-8 byte, never
    EOS) and, on demand, a step that raises as a broken backend would."""

    fail_with: BaseException | None = None  # raised by the next step, then cleared
    step_s: float = 0.0  # how long each step takes (a slow model)
    stepping: threading.Event = field(default_factory=threading.Event)  # a step has begun

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        self.stepping.set()
        time.sleep(self.step_s)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return super().execute(work)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [1 + b % (self.n_vocab - 1) for b in text.encode()]

    def token_to_piece(self, token: int) -> bytes:
        return b"" if token == EOS else chr(ord("a") + token % 26).encode()


@dataclass
class ScriptedEmbedder:
    n_ctx: int = 512

    def embed(self, tokens: list[int]) -> list[float]:
        return [float(len(tokens)), 1.0, 0.0]


@dataclass
class ScriptedServer:
    app: FastAPI
    client: httpx.AsyncClient
    runner: TextRunner
    model: ServedModel
    records: list[Record] = field(default_factory=list)

    async def chat(self, *, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        """POST /v1/chat/completions with a default one-message body and `body` merged in."""
        messages = [{"role": "user", "content": "hi"}]
        payload = {"model": MODEL, "messages": messages, "max_tokens": 4, **body}
        return await self.client.post("/v1/chat/completions", json=payload, headers=headers)


@functools.cache
def _header() -> tuple[ModelInfo, ChatTemplate]:
    """The default model's header and template, read once (reading takes seconds)."""
    info = inspect_gguf(default_model_path())
    template = ChatTemplate.load(
        info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
    )
    return info, template


def scripted_model(
    runner: TextRunner, *, parallel: int = 4, max_queue: int = 64, model_id: str = MODEL
) -> ServedModel:
    info, template = _header()
    config = SchedulerConfig(
        n_ctx=runner.n_ctx,
        max_running=parallel,
        max_batch_tokens=256,
        max_queue=max_queue,
        seq_cells=runner.seq_cells,
    )
    return ServedModel(
        model_id=model_id,
        info=info,
        template=template,
        engine=AsyncEngine(lambda: Engine(runner, runner, config)),
        make_embedder=ScriptedEmbedder,
        version_of=lambda: VERSION,
    )


@asynccontextmanager
async def scripted_server(
    settings: ServerSettings | None = None,
    *,
    runner: TextRunner | None = None,
    sinks: Iterable[RecordSink] = (),
    keys: KeyStore | None = None,
    **model_options: Any,
) -> AsyncIterator[ScriptedServer]:
    """The app with its lifespan running, and an httpx client on it; `keys`: the API keys it
    takes (a KeyStore on a test's own database)."""
    runner = runner or TextRunner(n_ctx=2048, seq_cells=512, eos_at=None)
    model = scripted_model(runner, **model_options)
    records: list[Record] = []
    app = create_app(
        settings or ServerSettings(), [model], sinks=[records.append, *sinks], keys=keys
    )
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(model.engine.wait_loaded)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield ScriptedServer(app, client, runner, model, records)


def as_keys(app: FastAPI, principals: dict[str, Principal]) -> None:
    """Make `app` take these bearer keys as the key check would: the principal of the key a
    request carries goes into its scope (outermost, before the app's own middleware runs)."""
    inner = app.middleware_stack or app.build_middleware_stack()

    async def keyed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"authorization" and value.startswith(b"Bearer "):
                    principal = principals.get(value[7:].decode())
                    if principal is not None:
                        scope.setdefault("state", {})["principal"] = principal
        await inner(scope, receive, send)

    app.middleware_stack = keyed  # type: ignore[assignment]
