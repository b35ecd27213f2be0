"""`create_app`: the FastAPI application, built from settings and served models. No globals."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Scope

from edgellm import __version__
from edgellm.engine.engine import describe
from edgellm.errors import EdgeLLMError
from edgellm.server.admin import router as admin_router
from edgellm.server.agent import AgentServer
from edgellm.server.audit import AuditMiddleware, AuditTrail
from edgellm.server.auth import KeyAuth
from edgellm.server.drain import Drain, DrainGate
from edgellm.server.errors import install_error_handlers
from edgellm.server.guard import GuardPolicy, RequestGuard
from edgellm.server.keys import KeyRing, KeyStore, principal_of
from edgellm.server.lifecycle import ModelTable
from edgellm.server.limits import Limits
from edgellm.server.logs import RequestLog
from edgellm.server.metrics import CONTENT_TYPE as METRICS_TYPE
from edgellm.server.metrics import Metrics
from edgellm.server.models import ServedModel, models_of
from edgellm.server.ollama import router as ollama_router
from edgellm.server.openai import router as openai_router
from edgellm.server.pipeline import GENERATION_ROUTES, Pipeline, RecordSink
from edgellm.server.quotas import QuotaGate, Quotas
from edgellm.server.request_id import RequestIds, client_of, request_id_of
from edgellm.server.responses import describe_errors
from edgellm.settings import ServerSettings


def create_app(
    settings: ServerSettings,
    models: list[ServedModel] | ModelTable,
    sinks: Iterable[RecordSink] = (),
    keys: KeyStore | None = None,
) -> FastAPI:
    """Build the app. Engines start with the app's lifespan and stop with it. Each generation
    request's final record goes to every one of `sinks`. `keys`: the API keys it accepts
    besides `settings.api_key` (serve passes the data directory's; None: none). `models`:
    ready-made models, or a model table (registry names loaded on demand)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        table.start(asyncio.get_running_loop())
        agent = None
        if settings.agent_port is not None:
            agent = AgentServer(table, app.state.drain, settings.host, settings.agent_port)
            await agent.start()
        app.state.keys.announce()  # whether auth is on, and with how many keys
        if audit is not None:
            audit.start()
        try:
            yield
        finally:
            if agent is not None:
                await agent.stop()
            await pipeline.stop_shadows()
            await table.shutdown()
            if audit is not None:  # after the engines: the last records are in
                await asyncio.to_thread(audit.close)

    table = models if isinstance(models, ModelTable) else ModelTable(models)
    app = FastAPI(title="edgellm", version=__version__, lifespan=lifespan)
    app.state.models = table
    app.state.limits = Limits.from_settings(settings)  # what one request may ask (routes)
    app.state.keys = KeyRing(keys, api_key=settings.api_key)
    app.state.error_observers = []  # called with every whole error answer (server.errors)
    if settings.metrics:
        metrics = Metrics(table, compat=settings.metrics_compat)
        sinks = [metrics.observe, *sinks]
        app.state.error_observers.append(metrics.on_error)

        async def scrape() -> Response:
            """Prometheus metrics (text exposition format)."""
            return Response(metrics.exposition(), media_type=METRICS_TYPE)

        app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False)
    app.state.audit = audit = (
        AuditTrail.open(required=settings.audit_required, with_text=settings.audit_text)
        if settings.audit
        else None
    )
    if audit is not None:
        sinks = [*sinks, audit.record]
        app.state.error_observers.append(audit.on_error)
    app.state.quotas = quotas = Quotas()
    sinks = [RequestLog(with_text=settings.log_prompts), quotas.observe, table.observe, *sinks]
    app.state.pipeline = pipeline = Pipeline(
        table,
        sinks,
        keep_text=settings.log_prompts or settings.audit_text,
        cache_scope=settings.prefix_cache_scope,
        schema_limits=app.state.limits.grammar,
        deadline_s=settings.request_timeout,
    )
    if settings.metrics:
        pipeline.shadow_sinks.append(metrics.observe)  # mirror copies and probes: metrics only

    def record_refusal(scope: Scope, exc: EdgeLLMError, recorded: bool) -> None:
        """Generation requests refused before the pipeline get their record too."""
        path = scope.get("path", "")
        if path in GENERATION_ROUTES and not recorded:
            pipeline.refused(path, exc, request_id_of(scope), client_of(scope), principal_of(scope))

    app.state.error_observers.append(record_refusal)
    app.state.drain = Drain(app.state.pipeline)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(ollama_router)
    app.include_router(admin_router)

    app.add_api_route("/", root, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    _add_middleware(app, settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def root() -> str:
    """What Ollama answers here; some clients probe it."""
    return "edgellm is running"


async def health(request: Request) -> JSONResponse:
    """Alive: the process answers and no engine has stopped after an internal error (503
    with the reason then: the process must be restarted). Says nothing about loading."""
    failed = {
        i.model.model_id: i.model.engine.failure
        for i in models_of(request).loaded()
        if i.model.engine.failure
    }
    if failed:
        return JSONResponse({"status": "error", "engines": failed}, status_code=503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """200 when a request can be taken now, with engine stats; 503 while a model that must be
    loaded at start is loading, when one failed, or while draining (shutting down). A served
    name that loads on demand is ready when it is not loaded. In a maintenance drain it is
    still 200, with `"maintenance": true`."""
    body: dict[str, Any] = {"models": {}}
    drain: Drain = request.app.state.drain
    status = "ready"
    table = models_of(request)
    state = table.describe()
    for slot in table.slots():
        instance = next((i for i in table.loaded() if i.key == slot.target), None)
        entry: dict[str, Any] = {k: v for k, v in state["models"][slot.model_id].items()
                                 if k != "ref" and v is not None}  # fmt: skip
        engine = instance.model.engine if instance is not None else None
        if engine is not None and (engine.load_error is not None or engine.failure is not None):
            status = "error"
            entry |= {"status": "error", "error": engine.failure or str(engine.load_error)}
        elif engine is not None and not engine.ready:
            status = "loading" if status == "ready" else status
            entry["status"] = "loading"
        elif engine is not None:
            entry |= {"status": "ready", **describe(engine.stats())}
        elif slot.model_id in table.preloading:  # must be loaded before requests come
            status = "loading" if status == "ready" else status
            entry["status"] = "loading"
        elif slot.model_id in table.failures:
            status = "error"
            entry |= {"status": "error", "error": table.failures[slot.model_id]}
        else:  # loads on its first request
            entry["status"] = "loading" if table.loading(slot.target) else "unloaded"
        body["models"][slot.model_id] = entry
    if any(s.ref for s in table.slots()):
        body["loaded"], body["budget"] = state["loaded"], state["budget"]
    if drain.draining:
        status, body["in_flight"] = "draining", drain.in_flight
    audit: AuditTrail | None = request.app.state.audit
    if audit is not None and not audit.accepting:  # requests are refused: send them elsewhere
        status, body["audit"] = "error", "unavailable"
    body["status"] = status
    keys: KeyRing = request.app.state.keys
    if keys.enforced and principal_of(request.scope) is None:
        body = {"status": status}  # engine statistics are for key holders
    if drain.maintenance:  # still ready: a maintenance drain only turns the agent to drain
        body["maintenance"] = True
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


def _add_middleware(app: FastAPI, settings: ServerSettings) -> None:
    """Outermost last: request ids, the guard, then CORS (preflights carry no key), the key
    check, then the drain gate."""
    app.add_middleware(DrainGate, drain=app.state.drain)
    app.add_middleware(QuotaGate, quotas=app.state.quotas)  # inside the key check: its principal
    app.add_middleware(KeyAuth, ring=app.state.keys, metrics_public=settings.metrics_public)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
        )
    policy = GuardPolicy.build(
        host=settings.host,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout,
        allowed_origins=settings.allowed_origins,
        allowed_hosts=settings.allowed_hosts,
        loopback=is_loopback(settings.host),
        max_json_depth=settings.max_json_depth,
        max_json_objects=settings.max_json_objects,
    )
    app.add_middleware(RequestGuard, policy=policy)
    if app.state.audit is not None:  # sees every answer, the guard's and the key check's too
        app.add_middleware(AuditMiddleware, trail=app.state.audit)
    app.add_middleware(RequestIds)  # outermost: every answer carries X-Request-Id


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
