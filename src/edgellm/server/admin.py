"""The admin API under /admin (admin keys only, as every path outside /v1 and /api): what is
served and loaded, load and unload, and the registry's deployment operations, the same ones as
`edgellm models promote | rollback | canary | fallback`. An operation writes the registry, then
the server applies it at once (it would within half a second anyway)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import Field

from edgellm.errors import ValidationError
from edgellm.server.keys import principal_of
from edgellm.server.models import models_of
from edgellm.server.wire import Wire

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


async def _operate(request: Request, operation: Callable[[Any, str], T], name: str) -> T:
    """Run a registry operation on the tag `name` names (a served name, or NAME:TAG) in a
    worker thread (the registry's connection lives there), then apply it now. A server of
    model files only has no registry to move: refused, rather than writing a registry it
    does not read."""
    table = models_of(request)
    if table.loader is None:
        raise ValidationError(
            "this server serves no registry models (it was started with model files): "
            "serve NAME:TAG to move tags from the admin API, or use `edgellm models` beside it",
            param="model",
            code="no_registry",
        )
    ref = name
    for slot in table.slots():
        if name in (slot.model_id, slot.ref) and slot.ref is not None:
            ref = slot.ref
    if ":" not in ref:
        ref = f"{ref}:latest"

    def run() -> T:
        from edgellm.registry import Registry

        with Registry.open() as registry:
            return operation(registry, ref)

    result = await asyncio.to_thread(run)
    table.refresh()
    return result
