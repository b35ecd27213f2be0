"""The served names and the loaded versions behind them.

A *slot* is a name clients send (`smollm2:prod`); its registry deployment says which version
serves it (the tag's target), and optionally a canary or mirror candidate and an SLO fallback.
An *instance* is one loaded version: an engine with its weights and KV cache. Requests lease an
instance for as long as they run (`acquire` ... `Lease.release`), so an instance with a request
in flight is never unloaded. Instances load on a request's demand (or at start, `--preload`),
stay loaded for their keep-alive after their last request, and make room for others least
recently used first when `--max-models` or `--max-memory` would be exceeded.

A watcher re-reads the registry's deployments twice a second. When a slot's tag moves, the new
version loads beside the old one (the budget permitting; else the old one is retired first and
new requests wait for the new one), new requests go to it the moment it is ready, and the old
one unloads after its last request. Nothing in flight is moved or failed.

Models given ready-made (a GGUF file served as before, or the tests' scripted models) are
*static* slots: loaded once at start, never unloaded, not in the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from edgellm.errors import EdgeLLMError, Forbidden, ModelNotFound, NotReady, ValidationError
from edgellm.server.keys import Principal
from edgellm.server.lifecycle.memory import format_size, rss_bytes
from edgellm.server.lifecycle.routing import Fallback, conversation_point
from edgellm.server.models import ServedModel, may_use, name_keys

if TYPE_CHECKING:
    from edgellm.registry import Version
    from edgellm.registry.deploy import Deployment
    from edgellm.server.pipeline import Record

log = logging.getLogger("edgellm.server")

Route = Literal["primary", "canary", "fallback"]
FOREVER = math.inf
SHADOWS_MAX = 8  # mirror copies and probes in flight per served name; more are skipped


class ModelBudgetError(EdgeLLMError):
    """A model cannot be loaded within --max-models / --max-memory."""

    status_code = 503
    code = "model_budget"


class ModelTooLarge(ModelBudgetError):
    """A model that alone needs more than --max-memory: it never fits."""


class ModelLoadError(EdgeLLMError):
    """A model's weights failed to load."""

    status_code = 503
    code = "model_load_failed"


@dataclass(slots=True)
class Prepared:
    """A version checked and ready to load: its served model (engine not started yet), what it
    is expected to cost, and what to free once it is unloaded."""

    model: ServedModel
    estimate_bytes: int
    close: Callable[[], None] = lambda: None


class Loader(Protocol):
    """Where versions come from (edgellm.serving.RegistryLoader; tests script one)."""

    def prepare(self, version: Version, model_id: str) -> Prepared:
        """Check and open `version` (blocking: hashes, decrypts, reads the header)."""
        ...

    def deployments(self) -> list[Deployment]:
        """Every tag of the registry with its deployment settings (blocking; cheap)."""
        ...


@dataclass(frozen=True, slots=True)
class Policy:
    max_models: int | None = None
    max_memory: int | None = None  # bytes
    keep_alive_s: float = 300.0  # after the last request; FOREVER: never unloaded; 0: at once
    poll_s: float = 0.5  # how often the registry is read
    load_wait_s: float = 120.0  # how long a load waits for room before it is refused


def version_key(version: Version) -> str:
    return f"v{version.id}"


@dataclass(eq=False)
class Instance:
    """One loaded (or loading) version."""

    key: str
    version: str  # the weights' SHA-256 prefix
    model: ServedModel
    estimate_bytes: int
    keep_alive_s: float
    close: Callable[[], None] = lambda: None
    pinned: bool = False  # a static model: never unloaded
    state: Literal["loading", "ready", "unloading", "failed"] = "loading"
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    measured_bytes: int | None = None  # resident growth across its load, when measured alone
    loaded_at: float | None = None  # monotonic
    requests: int = 0  # leases taken, over its life

    @property
    def size_bytes(self) -> int:
        """What the budget is charged: the larger of the estimate and the measured size."""
        return max(self.estimate_bytes, self.measured_bytes or 0)

    def expires_in(self, now: float) -> float | None:
        """Seconds until its keep-alive ends (None: never; 0: as soon as it is idle)."""
        if self.pinned or self.keep_alive_s == FOREVER:
            return None
        if self.in_flight:
            return self.keep_alive_s
        return max(0.0, self.last_used + self.keep_alive_s - now)


@dataclass(eq=False)
class Slot:
    """A served name."""

    model_id: str
    ref: str | None  # the registry's NAME:TAG; None: a static model
    target: str  # the instance key new primary requests go to
    card: ServedModel  # what listings show: the target's header, template and defaults
    deployment: Deployment | None = None
    pending: str | None = None  # a version being loaded to replace the target
    problem: str | None = None  # why the last swap could not happen
    failed: str | None = None  # a version key whose load failed (not retried until it moves)
    bad: set[str] = field(default_factory=set)  # candidate / fallback keys that failed to load
    fallback: Fallback | None = None
    shadows: int = 0  # mirror copies and probes in flight
    swaps: list[dict[str, Any]] = field(default_factory=list)  # the last few, with timings


class Lease:
    """A request's hold on an instance; `release` once, when the request ends."""

    def __init__(
        self,
        table: ModelTable,
        slot: Slot,
        instance: Instance,
        route: Route = "primary",
        shadow: tuple[Literal["mirror", "probe"], str] | None = None,
    ):
        self.table = table
        self.slot = slot
        self.instance = instance
        self.route = route
        self.shadow = shadow  # a copy of the request to run on that instance key
        self._released = False

    @property
    def model(self) -> ServedModel:
        return self.instance.model

    @property
    def name(self) -> str:
        return self.slot.model_id

    @property
    def version(self) -> str:
        return self.instance.version or self.instance.model.version

    def drop_shadow(self) -> None:
        """The copy will not run (the request failed before it was made)."""
        if self.shadow is not None and self.shadow[0] == "probe" and self.slot.fallback:
            self.slot.fallback.probing = False
        self.shadow = None

    def release(self, keep_alive_s: float | None = None) -> None:
        if not self._released:
            self._released = True
            self.table._release(self.instance, keep_alive_s)


class ModelTable:
    """The served names, the loaded instances, and the policy that moves between them."""

    def __init__(
        self,
        models: Iterable[ServedModel] = (),
        *,
        loader: Loader | None = None,
        policy: Policy = Policy(),
    ):
        self.loader = loader
        self.policy = policy
        self._slots: dict[str, Slot] = {}
        self._instances: dict[str, Instance] = {}
        self._versions: dict[str, Version] = {}  # instance key -> the version it loads
        self._loads: dict[str, asyncio.Task[Instance]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()  # replaced on each change; loads waiting for room
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_tags = False
        self._preload: list[str] = []
        self.preloading: set[str] = set()  # served names loading because they must at start
        self.failures: dict[str, str] = {}  # served names whose preload failed, and why
        self._closing = False
        self._estimates: dict[str, int] = {}  # of each slot's first target, for the start check
        self._refused: set[tuple[str, int]] = set()  # (ref, version id) --all could not serve
        self._untagged: set[str] = set()  # served refs whose tag was removed while serving
        for n, model in enumerate(models):
            self.add(model, key=f"static{n}")

    # -- building -------------------------------------------------------------------------

    def add(self, model: ServedModel, tag: str = "latest", key: str | None = None) -> None:
        """Serve a ready-made model (static: loaded at start, never unloaded) as its
        model_id (and `tag`, when not "latest")."""
        key = key or f"static{len(self._instances)}"
        instance = Instance(key, "", model, 0, FOREVER, pinned=True)
        self._instances[key] = instance
        name = model.model_id if tag == "latest" else f"{model.model_id}:{tag}"
        self._slots[name] = Slot(name, None, key, model)
        if model.engine.ready:
            instance.state, instance.version = "ready", model.version
        elif self._loop is not None:  # added while serving: it serves once it is loaded
            if not model.engine.started:
                model.engine.start(self._loop)
            self._spawn(self._static_ready(instance))

    def remove(self, name: str) -> ServedModel | None:
        """Stop serving `name` (its requests in flight finish); what it served, if anything."""
        try:
            slot = self.slot(name)
        except ModelNotFound:
            return None
        del self._slots[slot.model_id]
        if slot.ref is None and not any(s.target == slot.target for s in self._slots.values()):
            instance = self._instances.pop(slot.target, None)
            return instance.model if instance is not None else slot.card
        self._retire_unwanted()
        return slot.card

    def open_registry(
        self, refs: Iterable[str], *, all_tags: bool = False, preload: Iterable[str] = ()
    ) -> None:
        """Serve registry names (blocking: each target is checked and its header read now, so
        a bad name or blob is refused before the server starts). `all_tags`: every tag, and
        tags made later too."""
        if self.loader is None:
            raise ValueError("a registry needs a loader")
        deployments = {d.ref: d for d in self.loader.deployments()}
        wanted = list(deployments) if all_tags else [_full_ref(r) for r in refs]
        if not wanted and all_tags:
            raise ValidationError("the registry has no tagged model to serve (--all)")
        for ref in wanted:
            deployment = deployments.get(ref)
            if deployment is None:
                from edgellm.registry import Registry

                with Registry.open() as registry:
                    registry.resolve(ref)  # says what is wrong with the name, in one line
                raise ModelNotFound(ref)  # pragma: no cover: resolve raised
            self._add_slot(deployment, self._prepare_card(deployment))
        self._all_tags = all_tags
        served = set(self._slots)
        for name in preload:
            if name not in served and _shown(_full_ref(name)) not in served:
                raise ValidationError(f"--preload {name}: not among the served models")
        self._preload = [_shown(_full_ref(n)) if n not in served else n for n in preload]
        self.preloading = set(self._preload)
        budget = self.policy.max_memory
        for slot in self._slots.values():
            size = self._estimates.get(slot.target, 0)
            if budget is not None and size > budget:
                raise ValidationError(
                    f"{slot.model_id} needs about {format_size(size)} loaded, more than "
                    f"--max-memory {format_size(budget)}",
                    param="max_memory",
                )

    def _prepare_card(self, deployment: Deployment) -> Prepared:
        """Check a tag's target and read its header (blocking)."""
        assert self.loader is not None
        prepared = self.loader.prepare(deployment.target, _shown(deployment.ref))
        prepared.close()  # the card keeps the header; a load opens the version again
        prepared.model.info.path = deployment.target.blob  # not a decrypted memfd, now closed
        return prepared

    def _add_slot(self, deployment: Deployment, prepared: Prepared) -> Slot:
        name = _shown(deployment.ref)
        key = version_key(deployment.target)
        for version in (deployment.target, *_routed(deployment)):
            self._versions[version_key(version)] = version
        self._estimates[key] = prepared.estimate_bytes
        slot = Slot(name, deployment.ref, key, prepared.model, deployment)
        self._configure(slot, deployment)
        self._slots[name] = slot
        return slot

    # -- the asyncio side: start, stop ----------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the static engines, the preloads and (with a registry) the watcher."""
        self._loop = loop or asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for instance in self._instances.values():
            if not instance.model.engine.started:
                instance.model.engine.start(self._loop)
            self._spawn(self._static_ready(instance))
        for name in self._preload:
            self._spawn(self._preload_one(name))
        if self.loader is not None and any(s.ref for s in self._slots.values()):
            self._spawn(self._watch())
            self._spawn(self._warm())
        self._spawn(self._tick())

    async def shutdown(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for instance in list(self._instances.values()):
            await asyncio.to_thread(instance.model.engine.shutdown)
            instance.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _static_ready(self, instance: Instance) -> None:
        await asyncio.to_thread(instance.model.engine.wait_loaded)
        engine = instance.model.engine
        if engine.load_error is None:
            instance.state, instance.loaded_at = "ready", engine.loaded_at
            instance.version = instance.model.version
        else:
            instance.state = "failed"

    async def _preload_one(self, name: str) -> None:
        try:
            lease = await self.acquire(name)
        except EdgeLLMError as exc:
            log.error("preloading %s failed: %s", name, exc.message)
            self.failures[name] = exc.message
            return
        finally:
            self.preloading.discard(name)
        lease.release()

    def loading(self, key: str) -> bool:
        """Whether version `key` is being prepared or loaded now."""
        instance = self._instances.get(key)
        return key in self._loads or (instance is not None and instance.state == "loading")

    def wait_preloaded(self, timeout: float | None = None) -> str | None:
        """Block (another thread) until the static models and the preloads are loaded; the
        first load error, or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            static = [i for i in list(self._instances.values()) if i.pinned]
            failed = next((i for i in static if i.state == "failed"), None)
            if failed is not None:
                return str(failed.model.engine.load_error or "the model failed to load")
            if self.failures:
                name, why = next(iter(self.failures.items()))
                return f"{name}: {why}"
            if all(i.state == "ready" for i in static) and not self.preloading:
                return None
            if deadline is not None and time.monotonic() > deadline:
                return "timed out"
            time.sleep(0.05)

    # -- reading --------------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def slot(self, name: str, principal: Principal | None = None) -> Slot:
        """The served name `name` (NAME, NAME:TAG, NAME:latest); Forbidden when `principal`
        may not use it (whether it exists or not), ModelNotFound when nothing serves it."""
        if not may_use(principal, name):
            raise Forbidden(
                f"this API key may not use the model '{name}'",
                param="model",
                code="model_not_allowed",
            )
        for base, tag in name_keys(name):
            found = self._slots.get(base if tag == "latest" else f"{base}:{tag}")
            if found is not None:
                return found
        raise ModelNotFound(name)

    def card(self, slot: Slot) -> ServedModel:
        """What listings show of `slot`: its loaded target's model, else its card."""
        instance = self._instances.get(slot.target)
        return instance.model if instance is not None else slot.card

    def list_models(self) -> list[ServedModel]:
        """The served names' models, as listings show them, in the order they were added."""
        return [self.card(s) for s in self._slots.values()]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.list_models())

    def visible(self, principal: Principal | None) -> list[ServedModel]:
        return [self.card(s) for s in self._slots.values() if may_use(principal, s.model_id)]

    def lookup(self, name: str, principal: Principal | None = None) -> ServedModel:
        """The model `name` refers to, loaded or not (as `slot`)."""
        return self.card(self.slot(name, principal))

    def resolve(self, name: str, principal: Principal | None = None) -> ServedModel:
        """The loaded model of a static name, ready to take requests (NotReady while it
        loads, EngineDown once its engine stopped); a registry name's card."""
        slot = self.slot(name, principal)
        model = self.card(slot)
        if slot.ref is None:
            model.engine.check_alive()
            if not model.engine.ready:
                raise NotReady(f"the model '{name}' is still loading")
        return model

    def loaded(self) -> list[Instance]:
        """Instances loaded or loading, oldest first."""
        return [i for i in self._instances.values() if i.state != "failed"]

    def fallback_active(self, model_id: str) -> bool:
        slot = self._slots.get(model_id)
        return bool(slot and slot.fallback and slot.fallback.active)

    def used_bytes(self) -> int:
        return sum(i.size_bytes for i in self._instances.values() if i.state != "failed")

    # -- leasing --------------------------------------------------------------------------

    async def acquire(
        self,
        name: str,
        principal: Principal | None = None,
        *,
        conversation: str | None = None,
        keep_alive_s: float | None = None,
        primary_only: bool = False,
    ) -> Lease:
        """Lease the instance that serves `name` for this request, loading it if it must
        (waiting, at most `policy.load_wait_s`, for room). `conversation`: the request's
        sticky key for a canary; `primary_only`: never a canary or fallback (embeddings:
        vectors of one model only)."""
        slot = self.slot(name, principal)
        if slot.ref is None:
            model = self.resolve(name, principal)
            instance = self._instances[slot.target]
            instance.in_flight += 1
            instance.requests += 1
            instance.last_used = time.monotonic()
            del model
            return Lease(self, slot, instance)
        route, key, shadow = self._route(slot, conversation, primary_only)
        if route != "primary":
            try:
                instance = await self._ready(key, slot)
            except EdgeLLMError as exc:  # a bad canary or fallback: the primary serves
                slot.bad.add(key)
                log.error("%s: version %s not served (%s); its requests go to the primary",
                          slot.model_id, self._short(key), exc.message)  # fmt: skip
                route, shadow = "primary", None
                instance = await self._ready(slot.target, slot)
        else:
            instance = await self._ready(key, slot)
        # as in Ollama, each request sets how long the model stays after it: its own
        # keep_alive, else the server's
        instance.keep_alive_s = self.policy.keep_alive_s if keep_alive_s is None else keep_alive_s
        if shadow is not None and slot.shadows >= SHADOWS_MAX:
            shadow = None
        if shadow is not None and shadow[0] == "probe" and slot.fallback is not None:
            if slot.fallback.probing:
                shadow = None  # one probe at a time
            else:
                slot.fallback.probing = True  # until the probe ends (Lease.drop_shadow)
        return Lease(self, slot, instance, route, shadow)

    async def acquire_key(self, slot: Slot, key: str) -> Lease:
        """Lease the instance of version `key` of `slot` (a mirror copy, a probe)."""
        return Lease(self, slot, await self._ready(key, slot))

    def _route(
        self, slot: Slot, conversation: str | None, primary_only: bool = False
    ) -> tuple[Route, str, tuple[Literal["mirror", "probe"], str] | None]:
        deployment = slot.deployment
        if deployment is None or primary_only:
            return "primary", slot.target, None
        fallback = slot.fallback
        if (
            fallback is not None
            and fallback.active
            and deployment.fallback is not None
            and version_key(deployment.fallback) not in slot.bad
        ):
            return "fallback", version_key(deployment.fallback), ("probe", slot.target)
        candidate = deployment.candidate
        if candidate is not None and version_key(candidate) not in (slot.failed, *slot.bad):
            if (
                deployment.weight > 0
                and conversation is not None
                and conversation_point(conversation, candidate.sha256) < deployment.weight
            ):
                return "canary", version_key(candidate), None
            if deployment.mirror > 0 and random.random() * 100 < deployment.mirror:
                return "primary", slot.target, ("mirror", version_key(candidate))
        return "primary", slot.target, None

    async def _ready(self, key: str, slot: Slot) -> Instance:
        """The ready instance of `key` with one more request in flight."""
        instance = await self._ensure(key, slot)
        instance.in_flight += 1  # no await since it was found ready: it cannot be unloading
        instance.requests += 1
        instance.last_used = time.monotonic()
        return instance

    async def _ensure(self, key: str, slot: Slot, swap: Slot | None = None) -> Instance:
        """The ready instance of `key`, loaded if it must be (after an unload of it that is
        still finishing)."""
        while True:
            instance = self._instances.get(key)
            if instance is not None and instance.state == "ready":
                return instance
            if instance is not None and instance.state == "unloading":
                await self._wait_change(self.policy.load_wait_s)
                continue
            task = self._loads.get(key) or self._start_load(key, slot, swap)
            await asyncio.shield(task)  # raises the load's error; a client gone leaves it

    def _start_load(self, key: str, slot: Slot, swap: Slot | None = None) -> asyncio.Task[Instance]:
        """Load `key` in a task of its own: requests waiting on it share it, and one whose
        client goes away does not cancel it."""
        task: asyncio.Task[Instance] = self._spawn(self._load(key, slot, swap))
        self._loads[key] = task

        def done(_: asyncio.Task[Instance]) -> None:
            if self._loads.get(key) is task:
                del self._loads[key]

        task.add_done_callback(done)
        return task

    def _release(self, instance: Instance, keep_alive_s: float | None) -> None:
        instance.in_flight -= 1
        instance.last_used = time.monotonic()
        if keep_alive_s is not None:
            instance.keep_alive_s = keep_alive_s
        if instance.in_flight == 0 and not instance.pinned:
            if not self._wanted(instance.key):
                self._spawn(self._unload(instance, "no longer served"))
            elif instance.keep_alive_s == 0:
                self._spawn(self._unload(instance, "keep_alive 0"))
        self._notify()

    # -- loading and unloading ------------------------------------------------------------

    async def _load(self, key: str, slot: Slot, swap: Slot | None = None) -> Instance:
        assert self.loader is not None
        version = self._versions[key]
        prepared = await asyncio.to_thread(self.loader.prepare, version, slot.model_id)
        try:  # a canary, mirror or probe never unloads the primary of its own name
            protect = {slot.target} if key != slot.target and swap is None else set()
            await self._reserve(prepared.estimate_bytes, key, swap, protect)
        except BaseException:
            prepared.close()
            raise
        instance = Instance(
            key,
            version.short,
            prepared.model,
            prepared.estimate_bytes,
            self._keep_alive_default(),
            prepared.close,
        )
        self._instances[key] = instance
        alone = not any(i.state == "loading" for i in self._instances.values() if i is not instance)
        before = rss_bytes()
        started = time.monotonic()
        log.info("loading %s (version %s, ~%s)", slot.model_id, version.short,
                 format_size(prepared.estimate_bytes))  # fmt: skip
        instance.model.engine.start(self._loop)
        await asyncio.to_thread(instance.model.engine.wait_loaded)
        engine = instance.model.engine
        if engine.load_error is not None:
            instance.state = "failed"
            self._instances.pop(key, None)
            prepared.close()
            self._notify()
            raise ModelLoadError(f"{slot.model_id} ({version.short}) failed to load: "
                                 f"{engine.load_error}")  # fmt: skip
        if alone and not any(
            i.state == "loading" for i in self._instances.values() if i is not instance
        ):
            instance.measured_bytes = max(0, rss_bytes() - before)
        instance.state, instance.loaded_at = "ready", engine.loaded_at
        instance.last_used = time.monotonic()
        log.info("loaded %s (version %s) in %.1f s, %s resident", slot.model_id, version.short,
                 time.monotonic() - started, format_size(instance.measured_bytes or 0))  # fmt: skip
        self._notify()
        return instance

    def _keep_alive_default(self) -> float:
        return self.policy.keep_alive_s

    def _fits(self, size: int) -> bool:
        count = sum(1 for i in self._instances.values() if i.state != "failed")
        policy = self.policy
        if policy.max_models is not None and count + 1 > policy.max_models:
            return False
        return policy.max_memory is None or self.used_bytes() + size <= policy.max_memory

    async def _reserve(
        self, size: int, key: str, swap: Slot | None, protect: set[str] | None = None
    ) -> None:
        """Make room for `size` bytes, unloading idle instances least recently used first,
        else waiting for one to become idle. `swap`: a slot whose target this load replaces;
        when both cannot be held, its old target is retired first."""
        policy = self.policy
        if policy.max_memory is not None and size > policy.max_memory:
            raise ModelTooLarge(
                f"this model needs about {format_size(size)} loaded, more than the memory "
                f"budget (--max-memory {format_size(policy.max_memory)})"
            )
        deadline = time.monotonic() + policy.load_wait_s
        while not self._fits(size):
            victim = self._victim(
                exclude={key, *(protect or ())} | ({swap.target} if swap else set())
            )
            if victim is not None:
                await self._unload(victim, "to make room")
                continue
            if swap is not None and swap.target != key and swap.target in self._instances:
                old = swap.target
                swap.target = key  # new requests wait for the new version
                swap.problem = (
                    "the memory budget does not hold both versions: the old one is "
                    "unloaded after its last request, then the new one loads"
                )
                log.warning("%s: %s", swap.model_id, swap.problem)
                instance = self._instances[old]
                if instance.in_flight == 0 and not self._wanted(old):
                    await self._unload(instance, "swapped out")
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait_change(left):
                busy = ", ".join(f"{i.model.model_id} ({i.in_flight} running)"
                                 for i in self._instances.values())  # fmt: skip
                raise ModelBudgetError(
                    f"no room to load this model within the budget after "
                    f"{policy.load_wait_s:.0f} s: every loaded model is busy ({busy})"
                )

    def _victim(self, exclude: set[str]) -> Instance | None:
        """The idle instance to unload first: one nothing routes to, else the least recently
        used."""
        idle = [
            i
            for i in self._instances.values()
            if i.state == "ready" and i.in_flight == 0 and not i.pinned and i.key not in exclude
        ]
        if not idle:
            return None
        return min(idle, key=lambda i: (self._wanted(i.key), i.last_used))

    async def _unload(self, instance: Instance, reason: str) -> None:
        if instance.state != "ready" or instance.in_flight:
            return
        instance.state = "unloading"
        log.info("unloading %s (version %s): %s", instance.model.model_id, instance.version, reason)
        try:
            await asyncio.to_thread(instance.model.engine.shutdown)
        finally:
            instance.close()
            if self._instances.get(instance.key) is instance:
                del self._instances[instance.key]
            self._notify()

    async def load(self, name: str) -> Instance:
        """Load the target of `name` now (the admin API); it stays for its keep-alive."""
        lease = await self.acquire(name)
        lease.release()
        return lease.instance

    async def unload(self, name: str) -> list[str]:
        """Unload every idle instance `name` routes to; the versions unloaded."""
        slot = self.slot(name)
        if slot.ref is None:
            raise ValidationError(f"{name} is a static model: it cannot be unloaded", param="model")
        keys = {slot.target} | {version_key(v) for v in _routed(slot.deployment)}
        done = []
        for key in keys:
            instance = self._instances.get(key)
            if instance is not None and instance.state == "ready":
                if instance.in_flight:
                    instance.keep_alive_s = 0  # unloaded after its last request
                    continue
                await self._unload(instance, "asked to")
                done.append(instance.version)
        return done

    def _wanted(self, key: str) -> bool:
        """Whether any served name routes to `key` (its target, a swap, candidate, fallback)."""
        for slot in self._slots.values():
            if key in (slot.target, slot.pending):
                return True
            if any(version_key(v) == key for v in _routed(slot.deployment)):
                return True
        return False

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_change(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        return False

    # -- the watcher and hot swap ---------------------------------------------------------

    async def _warm(self) -> None:
        """Read the headers of the other tagged versions of the served models in the
        background (the preloads first), so that a promote to one of them loads without
        seconds of header parsing."""
        assert self.loader is not None
        warm = getattr(self.loader, "warm", None)
        if warm is None:
            return
        while self.preloading:
            await asyncio.sleep(0.2)
        served = {s.deployment.name for s in self._slots.values() if s.deployment is not None}
        deployments = await asyncio.to_thread(self.loader.deployments)
        seen: set[str] = set()
        for deployment in deployments:
            if deployment.name not in served:
                continue
            for version in (deployment.target, *_routed(deployment)):
                if version.sha256 not in seen:
                    seen.add(version.sha256)
                    with contextlib.suppress(Exception):  # a bad one says so when it is loaded
                        await asyncio.to_thread(warm, version)

    async def _watch(self) -> None:
        assert self.loader is not None
        while not self._closing:
            await asyncio.sleep(self.policy.poll_s)
            try:
                deployments = await asyncio.to_thread(self.loader.deployments)
                await self._apply(deployments)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading the registry failed; retrying")

    def refresh(self) -> None:
        """Read the registry now (after an admin operation) instead of at the next poll."""
        if self.loader is not None:
            self._spawn(self._apply_now())

    async def _apply_now(self) -> None:
        assert self.loader is not None
        await self._apply(await asyncio.to_thread(self.loader.deployments))

    async def _apply(self, deployments: list[Deployment]) -> None:
        by_ref = {d.ref: d for d in deployments}
        for deployment in deployments:
            for version in (deployment.target, *_routed(deployment)):
                self._versions[version_key(version)] = version
        if self._all_tags or self._untagged:
            for ref, new in by_ref.items():
                if not self._all_tags and ref not in self._untagged:
                    continue
                if _shown(ref) in self._slots or (ref, new.target.id) in self._refused:
                    continue
                self._untagged.discard(ref)
                try:
                    prepared = await asyncio.to_thread(self._prepare_card, new)
                except EdgeLLMError as exc:
                    self._refused.add((ref, new.target.id))  # until the tag moves
                    log.error("%s is tagged but cannot be served: %s", ref, exc.message)
                    continue
                self._add_slot(new, prepared)
                log.info("serving %s, tagged (again) since the start", _shown(ref))
        for slot in list(self._slots.values()):
            if slot.ref is None:
                continue
            found = by_ref.get(slot.ref)
            if found is None:
                del self._slots[slot.model_id]
                self._untagged.add(slot.ref)  # served again if the tag comes back
                log.warning("%s is no longer tagged in the registry: not served any more", slot.ref)
                self._retire_unwanted()
                continue
            self._configure(slot, found)
            want = version_key(found.target)
            if want not in (slot.target, slot.pending, slot.failed):
                slot.pending = want  # set now: a refresh beside the watcher swaps once
                self._spawn(self._swap(slot, found.target))
        self._retire_unwanted()

    def _configure(self, slot: Slot, deployment: Deployment) -> None:
        """Take a deployment's canary and fallback settings (the target moves by `_swap`)."""
        before = slot.deployment
        slot.deployment = deployment
        if before is not None and before.target.id != deployment.target.id:
            slot.failed = None
        if before is None or (before.candidate, before.fallback) != (
            deployment.candidate,
            deployment.fallback,
        ):
            slot.bad.clear()  # another candidate or fallback: try it
        wanted = (deployment.ttft_p99_s, deployment.window_s) if deployment.fallback else None
        current = slot.fallback
        if wanted is None:
            if current is not None:
                log.info("%s: fallback removed", slot.model_id)
            slot.fallback = None
        elif current is None or (current.objective_s, current.window_s) != wanted:
            assert deployment.ttft_p99_s is not None
            slot.fallback = Fallback(deployment.ttft_p99_s, deployment.window_s)

    async def _swap(self, slot: Slot, version: Version) -> None:
        key = version_key(version)
        slot.pending, slot.problem = key, None
        noticed = time.monotonic()
        old = slot.target
        log.info("%s moved to version %s: loading it beside %s", slot.model_id, version.short,
                 self._versions[old].short if old in self._versions else old)  # fmt: skip
        try:
            instance = await self._ensure(key, slot, swap=slot)
        except EdgeLLMError as exc:
            slot.problem = f"version {version.short} not served: {exc.message}"
            if not isinstance(exc, ModelBudgetError) or isinstance(exc, ModelTooLarge):
                slot.failed = key  # not retried until the tag moves; a busy budget is
            slot.target = old  # swapping in place: the old version (reloaded if it must be)
            log.error("%s: %s", slot.model_id, slot.problem)
            self._retire_unwanted()
            return
        finally:
            if slot.pending == key:
                slot.pending = None
        deployment = slot.deployment
        if deployment is None or version_key(deployment.target) != key:
            self._retire_unwanted()  # moved again meanwhile: the next swap takes over
            return
        flipped = time.monotonic()
        slot.target = key
        if slot.fallback is not None:  # a new primary: its latency is measured afresh
            slot.fallback = Fallback(slot.fallback.objective_s, slot.fallback.window_s)
        ready = instance.loaded_at or flipped
        slot.swaps = [*slot.swaps[-9:], {
            "from": self._versions[old].short if old in self._versions else None,
            "to": version.short,
            "load_s": round(ready - noticed, 3),
            "switch_ms": round((flipped - ready) * 1000, 2),
            "in_place": slot.problem is not None,
            "at": time.time(),
        }]  # fmt: skip
        log.info("%s now served by version %s (%.2f s to load, new requests on it %.1f ms "
                 "after it was ready)", slot.model_id, version.short, ready - noticed,
                 (flipped - ready) * 1000)  # fmt: skip
        self._retire_unwanted()

    def _retire_unwanted(self) -> None:
        for instance in list(self._instances.values()):
            if instance.pinned or instance.state != "ready" or self._wanted(instance.key):
                continue
            if instance.in_flight == 0:
                self._spawn(self._unload(instance, "no longer served"))
            # else: `_release` unloads it after its last request

    # -- time: keep-alive and the fallback ------------------------------------------------

    async def _tick(self) -> None:
        while not self._closing:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for instance in list(self._instances.values()):
                expires = instance.expires_in(now)
                if instance.state == "ready" and not instance.in_flight and expires == 0:
                    await self._unload(instance, "keep_alive expired")
            for slot in self._slots.values():
                if slot.fallback is not None and slot.fallback.update(now):
                    self._log_fallback(slot)

    def observe(self, record: Record) -> None:
        """A record sink: the primary's times to first token feed its fallback window."""
        slot = self._slots.get(record.model)
        fallback = slot.fallback if slot is not None else None
        if fallback is None or record.ttft_s is None or slot is None:
            return
        primary = self._instances.get(slot.target)
        if primary is None or record.version != primary.version or record.error is not None:
            return
        if record.first_output is None:
            return
        # from submission: the model's own latency, not a wait for its load
        fallback.add(record.first_output - (record.submitted or record.started))
        if fallback.update():
            self._log_fallback(slot)

    def _log_fallback(self, slot: Slot) -> None:
        fallback, deployment = slot.fallback, slot.deployment
        assert fallback is not None and deployment is not None
        state = fallback.describe()
        if fallback.active and deployment.fallback is not None:
            log.warning("%s: p99 time to first token %.3f s is over the objective %.3f s: new "
                        "requests go to version %s", slot.model_id, state["primary_ttft_p99_s"],
                        fallback.objective_s, deployment.fallback.short)  # fmt: skip
        else:
            log.warning("%s: p99 time to first token back to %.3f s (under 80%% of %.3f s for "
                        "a window): new requests go to the primary again", slot.model_id,
                        state["primary_ttft_p99_s"], fallback.objective_s)  # fmt: skip

    # -- description ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Served names and loaded instances, for /ready and the admin API."""
        now = time.monotonic()
        names = {}
        for slot in self._slots.values():
            deployment = slot.deployment
            entry: dict[str, Any] = {
                "ref": slot.ref,
                "version": self._short(slot.target),
                "loaded": slot.target in self._instances,
            }
            if slot.pending:
                entry["loading_version"] = self._short(slot.pending)
            if slot.problem:
                entry["problem"] = slot.problem
            if deployment is not None and deployment.candidate is not None:
                entry["canary"] = {
                    "version": deployment.candidate.short,
                    "weight": deployment.weight,
                    "mirror": deployment.mirror,
                }
            if deployment is not None and deployment.gate:
                entry["gate"] = deployment.gate
            if slot.fallback is not None and deployment is not None and deployment.fallback:
                entry["fallback"] = {"version": deployment.fallback.short,
                                     **slot.fallback.describe(now)}  # fmt: skip
            if slot.swaps:
                entry["swaps"] = slot.swaps
            names[slot.model_id] = entry
        loaded = [self.describe_instance(i, now) for i in self._instances.values()]
        policy = self.policy
        return {
            "models": names,
            "loaded": loaded,
            "budget": {
                "max_models": policy.max_models,
                "max_memory_bytes": policy.max_memory,
                "used_bytes": self.used_bytes(),
                "keep_alive_s": None if policy.keep_alive_s == FOREVER else policy.keep_alive_s,
            },
        }

    def describe_instance(self, instance: Instance, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        expires = instance.expires_in(now)
        return {
            "version": instance.version,
            "names": [s.model_id for s in self._slots.values() if self._routes_to(s, instance.key)],
            "state": instance.state,
            "in_flight": instance.in_flight,
            "requests": instance.requests,
            "size_bytes": instance.size_bytes,
            "estimate_bytes": instance.estimate_bytes,
            "measured_bytes": instance.measured_bytes,
            "expires_in_s": None if expires is None else round(expires, 1),
        }

    def _routes_to(self, slot: Slot, key: str) -> bool:
        return key == slot.target or any(version_key(v) == key for v in _routed(slot.deployment))

    def _short(self, key: str) -> str | None:
        if key in self._versions:
            return self._versions[key].short
        instance = self._instances.get(key)
        return instance.version if instance is not None else None


def _routed(deployment: Deployment | None) -> list[Version]:
    """The versions besides the target that a deployment may send requests to."""
    if deployment is None:
        return []
    return [v for v in (deployment.candidate, deployment.fallback) if v is not None]


def _full_ref(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _shown(ref: str) -> str:
    """A served name as clients send it: ":latest" dropped."""
    return ref.removesuffix(":latest")
