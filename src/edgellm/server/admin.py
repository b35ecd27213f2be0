"""The admin API under /admin (admin keys only, as every path outside /v1 and /api): what is
served and loaded, load and unload, and the registry's deployment operations, the same ones as
`edgellm models promote | rollback | canary | fallback`. An operation writes the registry, then
the server applies it at once (it would within half a second anyway).

What `edgellm fleet` drives a worker with is here too: its status, a key stored from its hash
(the secret is made once, by the fleet command, and never sent), a revoke, a pull into this
worker's registry, and the maintenance drain (edgellm.server.drain) around a rolling swap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import Field

from edgellm import __version__
from edgellm.errors import EdgeLLMError, Forbidden, ModelFileError, ValidationError
from edgellm.keystore import PREFIX_PATTERN, KeySpec, KeyStore
from edgellm.server.agent import load_of, problem_of
from edgellm.server.keys import KeyRing, principal_of
from edgellm.server.models import models_of
from edgellm.server.wire import Wire

if TYPE_CHECKING:
    from edgellm.registry import Registry
    from edgellm.server.drain import Drain
    from edgellm.server.lifecycle import ModelTable

router = APIRouter(prefix="/admin", tags=["admin"])
T = TypeVar("T")

DURATION = "Seconds, or a duration: 800ms, 0.8s, 60s, 5m."


class ModelRef(Wire):
    model: str = Field(min_length=1, max_length=256, description="A served name or NAME:TAG.")


class PromoteBody(ModelRef):
    to: str | None = Field(
        None, max_length=256, description="A version (SHA-256 prefix), a tag, or NAME:TAG; "
        "omitted: the running canary's candidate.",
    )  # fmt: skip
    force: bool = Field(False, description="Go past a failing gate (written to the audit log).")


class CanaryBody(ModelRef):
    to: str = Field(min_length=1, max_length=256)
    weight: float = Field(0.0, description="Percent of conversations sent to it, (0, 100].")
    mirror: float = Field(0.0, description="Percent of requests copied to it, (0, 100].")
    force: bool = False


class FallbackBody(ModelRef):
    to: str = Field(min_length=1, max_length=256)
    ttft_p99: float | str = Field(description=f"The p99 TTFT objective. {DURATION}")
    window: float | str = Field(60.0, description=f"The window. {DURATION}")


class InstanceOut(Wire):
    """One loaded version (an entry of /admin/models' `loaded`)."""

    version: str
    names: list[str]  # the served names that route to it
    state: str  # loading | ready | unloading
    in_flight: int
    requests: int  # leases taken over its life
    size_bytes: int  # what the budget is charged
    estimate_bytes: int
    measured_bytes: int | None
    expires_in_s: float | None  # None: never


class Described(Wire):
    """The served names, the loaded versions and the budget (as /ready shows them)."""

    models: dict[str, Any]
    loaded: list[InstanceOut]
    budget: dict[str, Any]


class Unloaded(Wire):
    unloaded: list[str]  # versions unloaded now (busy ones follow after their last request)


class MoveOut(Wire):
    name: str
    operation: str
    previous: str | None
    current: str
    sha256: str
    forced: bool
    gate_failure: str | None


class DeploymentOut(Wire):
    name: str
    target: str
    gate: str | None = None
    candidate: str | None = None
    weight: float = 0.0
    mirror: float = 0.0
    fallback: str | None = None
    ttft_p99_s: float | None = None
    window_s: float | None = None


class StoredKeyBody(KeySpec):
    """A key made elsewhere: its settings, its first characters and its SHA-256, no secret."""

    prefix: str = Field(pattern=f"^{PREFIX_PATTERN}$", description="The key's first 12 characters.")
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the whole key, hex.")


class KeyOut(Wire):
    name: str
    prefix: str
    role: str
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    expires: str | None
    created_at: str
    revoked_at: str | None
    state: str  # active | revoked | expired


class ResolvedOut(Wire):
    ref: str  # NAME:TAG
    current: str  # the version it points at now
    candidate: str | None  # its canary's candidate
    to: str | None  # the version `to` names here (None: none asked, or no canary running)
    sha256: str | None  # the whole SHA-256 of `to`


class PullBody(Wire):
    source: str = Field(
        min_length=1, max_length=4096, description="https:// or http:// URL, or hf://ORG/REPO/FILE"
    )
    name: str = Field(min_length=1, max_length=256, description="NAME[:TAG] to register it as.")
    sha256: str | None = Field(None, pattern="^[0-9a-fA-F]{64}$", description="Expected, hex.")


class PulledOut(Wire):
    name: str  # NAME:TAG as registered
    version: str  # the SHA-256 prefix
    sha256: str
    size: int
    notices: list[str]  # e.g. that nothing could verify the download


class DrainBody(Wire):
    on: bool = Field(strict=True, description="true: the agent answers drain; false: it ends.")


class MaintenanceOut(Wire):
    maintenance: bool


class StatusOut(Wire):
    """One worker at a glance, for `edgellm fleet status`."""

    edgellm: str  # the package version
    maintenance: bool  # in a maintenance drain (the agent says drain; requests are served)
    draining: bool  # shutting down (SIGTERM): new requests are refused
    in_flight: int  # inference requests being answered
    problem: str | None  # why it cannot serve (an engine died, a load failed); None: it can
    models: dict[str, Any]  # served name -> its target version, loaded or not, canary, ...
    loaded: list[InstanceOut]
    parallel: int  # sequences the loaded engines run at once
    running: int
    waiting: int
    kv_cells_used: int
    kv_cells_total: int


class PullFailed(EdgeLLMError):
    """A worker's pull did not finish (the source refused, the bytes were wrong): 502, with the
    reason, which is ours (edgellm.registry.pull words it) and names no secret."""

    status_code = 502
    error_type = "server_error"
    shown = True


@router.get("/models", response_model=Described)
async def list_models(request: Request) -> dict[str, Any]:
    """What is served, what is loaded, and the memory budget."""
    return models_of(request).describe()


@router.post("/models/{name}/load", response_model=InstanceOut)
async def load(name: str, request: Request) -> dict[str, Any]:
    """Load the target of a served name now (it stays for its keep-alive)."""
    table = models_of(request)
    return table.describe_instance(await table.load(name))


@router.post("/models/{name}/unload", response_model=Unloaded)
async def unload(name: str, request: Request) -> dict[str, Any]:
    """Unload the idle versions of a served name (busy ones after their last request)."""
    return {"unloaded": await models_of(request).unload(name)}


@router.post("/promote", response_model=MoveOut)
async def promote(body: PromoteBody, request: Request) -> dict[str, Any]:
    """Point a tag at another version: the server swaps to it without failing a request."""
    from edgellm.registry import deploy

    actor = _actor(request)
    return await _operate(
        request,
        lambda reg, ref: deploy.promote(
            reg, ref, body.to, force=body.force, actor=actor, method="POST"
        ).as_json(),
        body.model,
    )


@router.post("/rollback", response_model=MoveOut)
async def rollback(body: ModelRef, request: Request) -> dict[str, Any]:
    """Point a tag back where it pointed before its last move."""
    from edgellm.registry import deploy

    return await _operate(request, lambda reg, ref: deploy.rollback(reg, ref).as_json(), body.model)


@router.post("/canary", response_model=DeploymentOut)
async def canary(body: CanaryBody, request: Request) -> dict[str, Any]:
    """Send a share of conversations to a candidate, and/or copy requests to it."""
    from edgellm.registry import deploy

    actor = _actor(request)
    return await _operate(
        request,
        lambda reg, ref: deploy.start_canary(
            reg, ref, body.to, weight=body.weight, mirror=body.mirror, force=body.force,
            actor=actor, method="POST",
        ).as_json(),
        body.model,
    )  # fmt: skip


@router.post("/canary/end", response_model=DeploymentOut)
async def end_canary(body: ModelRef, request: Request) -> dict[str, Any]:
    from edgellm.registry import deploy

    return await _operate(
        request, lambda reg, ref: deploy.end_canary(reg, ref).as_json(), body.model
    )


@router.post("/fallback", response_model=DeploymentOut)
async def fallback(body: FallbackBody, request: Request) -> dict[str, Any]:
    """Send new requests to a lighter version while the target's p99 TTFT is over the
    objective."""
    from edgellm.registry import deploy

    ttft = _seconds(body.ttft_p99, "ttft_p99")
    window = _seconds(body.window, "window")
    return await _operate(
        request,
        lambda reg, ref: deploy.set_fallback(
            reg, ref, body.to, ttft_p99_s=ttft, window_s=window
        ).as_json(),
        body.model,
    )


@router.post("/fallback/off", response_model=DeploymentOut)
async def fallback_off(body: ModelRef, request: Request) -> dict[str, Any]:
    from edgellm.registry import deploy

    return await _operate(
        request, lambda reg, ref: deploy.clear_fallback(reg, ref).as_json(), body.model
    )


@router.get("/status", response_model=StatusOut)
async def status(request: Request) -> dict[str, Any]:
    """This worker at a glance: version, served and loaded models, load, maintenance."""
    table = models_of(request)
    drain: Drain = request.app.state.drain
    described = table.describe()
    load = load_of(table)
    return {
        "edgellm": __version__, "maintenance": drain.maintenance, "draining": drain.draining,
        "in_flight": drain.in_flight, "problem": problem_of(table),
        "models": described["models"], "loaded": described["loaded"],
        "parallel": load.parallel, "running": load.running, "waiting": load.waiting,
        "kv_cells_used": load.kv_cells_used, "kv_cells_total": load.kv_cells_total,
    }  # fmt: skip


@router.get("/resolve", response_model=ResolvedOut)
async def resolve(request: Request, model: str, to: str | None = None) -> dict[str, Any]:
    """Where a tag points and which version `to` names for it here, changing nothing (omitted:
    its canary's candidate): what `edgellm fleet` asks every worker before a rolling promote
    or canary, so that a worker without the version refuses before any worker moves."""
    from edgellm.registry import deploy

    def look(registry: Any, ref: str) -> dict[str, Any]:
        dep = deploy.read_deployment(registry.catalog, ref)
        version = deploy.find_target(registry, dep.name, to) if to is not None else dep.candidate
        candidate = dep.candidate.short if dep.candidate is not None else None
        return {"ref": dep.ref, "current": dep.target.short, "candidate": candidate,
                "to": version.short if version else None,
                "sha256": version.sha256 if version else None}  # fmt: skip

    return await _operate(request, look, model)


@router.post("/drain", response_model=MaintenanceOut)
async def maintenance(body: DrainBody, request: Request) -> dict[str, Any]:
    """Turn the maintenance drain on or off: while on, HAProxy's agent check answers drain, so
    no new sessions come; requests that still arrive are served and /ready stays 200."""
    drain: Drain = request.app.state.drain
    drain.maintenance = body.on
    return {"maintenance": drain.maintenance}


@router.post("/keys", response_model=KeyOut)
async def store_key(body: StoredKeyBody, request: Request) -> dict[str, Any]:
    """Store a key made elsewhere, from its prefix and SHA-256; it works at once. 409 if a key
    of that name exists (revoked ones included). Refused on a server with auth off: the first
    stored key would turn auth on, locking out everyone but whoever stored it."""
    _admin_only(request, "store a key")
    ring, store = _keys(request)
    info = await asyncio.to_thread(store.add_hashed, body, body.prefix, bytes.fromhex(body.sha256))
    ring.reload()
    return info.as_json()


@router.get("/keys/{name}", response_model=KeyOut)
async def find_key(name: str, request: Request) -> dict[str, Any]:
    """A stored key's record (never its secret): 404 if there is none of that name, so
    `edgellm fleet keys create` can see a name is free on every worker before storing it."""
    _, store = _keys(request)
    info = await asyncio.to_thread(store.find, name)
    return info.as_json()


@router.post("/keys/{name}/revoke", response_model=KeyOut)
async def revoke_key(name: str, request: Request) -> dict[str, Any]:
    """Revoke a key: refused from the next request on. 404 if there is none of that name."""
    ring, store = _keys(request)
    info = await asyncio.to_thread(store.revoke, name)
    ring.reload()
    return info.as_json()


@router.post("/models/pull", response_model=PulledOut)
async def pull(body: PullBody, request: Request) -> dict[str, Any]:
    """Download a GGUF into this worker's registry (resumably, its SHA-256 checked) and
    register it as NAME[:TAG]. Answers once it is registered."""
    from edgellm.registry.pull import DownloadError
    from edgellm.registry.pull import pull as do_pull

    _admin_only(request, "pull a model")  # a server that fetches any URL for anyone: no
    table = _registry_table(request)
    notices: list[str] = []

    def run() -> dict[str, Any]:
        with _open_registry(table) as registry:
            version = do_pull(registry, body.source, body.name, sha256=body.sha256,
                              notice=notices.append)  # fmt: skip
        ref = body.name if ":" in body.name else f"{body.name}:latest"
        return {"name": ref, "version": version.short, "sha256": version.sha256,
                "size": version.size, "notices": notices}  # fmt: skip

    try:
        return await asyncio.to_thread(run)
    except (DownloadError, ModelFileError) as exc:
        raise PullFailed(f"the pull failed: {exc.message}", code="pull_failed") from None


def _admin_only(request: Request, what: str) -> None:
    """Refuse `what` when the server has auth off (no --api-key, no stored key)."""
    if principal_of(request.scope) is None:
        raise Forbidden(
            f"this server has auth off: {what} only with an admin key (serve with --api-key, "
            "or make one with `edgellm keys create --role admin` beside it)",
            code="auth_off",
        )


def _actor(request: Request) -> str | None:
    principal = principal_of(request.scope)
    return principal.name if principal is not None else None


def _seconds(value: float | str, param: str) -> float:
    from edgellm.registry.deploy import parse_duration

    if isinstance(value, str):
        return parse_duration(value, param)
    if not value > 0 or value == float("inf"):
        raise ValidationError(f"{param} must be a positive duration", param=param)
    return float(value)


def _keys(request: Request) -> tuple[KeyRing, KeyStore]:
    """The server's keys and the store behind them; refused when it has none."""
    ring: KeyRing = request.app.state.keys
    if ring.store is None:
        raise ValidationError(
            "this server keeps no stored keys (only --api-key): nothing to store or revoke",
            code="no_key_store",
        )
    return ring, ring.store


def _registry_table(request: Request) -> ModelTable:
    """The model table, if it serves registry models; else refused, rather than writing a
    registry it does not read."""
    table = models_of(request)
    if table.loader is None:
        raise ValidationError(
            "this server serves no registry models (it was started with model files): "
            "serve NAME:TAG to move tags from the admin API, or use `edgellm models` beside it",
            param="model",
            code="no_registry",
        )
    return table


def _open_registry(table: ModelTable) -> Registry:
    """The registry `table` reads: its loader's `home` when it names one (tests run several
    workers in one process, each with its own), else the data directory's."""
    from edgellm.registry import Registry

    return Registry.open(getattr(table.loader, "home", None))


async def _operate(request: Request, operation: Callable[[Any, str], T], name: str) -> T:
    """Run a registry operation on the tag `name` names (a served name, or NAME:TAG) in a
    worker thread (the registry's connection lives there), then apply it now."""
    table = _registry_table(request)
    ref = name
    for slot in table.slots():
        if name in (slot.model_id, slot.ref) and slot.ref is not None:
            ref = slot.ref
    if ":" not in ref:
        ref = f"{ref}:latest"

    def run() -> T:
        with _open_registry(table) as registry:
            return operation(registry, ref)

    result = await asyncio.to_thread(run)
    table.refresh()
    return result
