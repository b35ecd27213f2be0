"""The model table over a scripted registry: versions that load as scripted models, and
deployments a test moves by hand. The table, the pipeline and the app are the real ones."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from edgellm.modelfile import default_model_path
from edgellm.registry import Version
from edgellm.registry.deploy import Deployment
from edgellm.server import create_app
from edgellm.server.lifecycle import ModelTable, Policy, Prepared
from edgellm.server.pipeline import Record
from edgellm.settings import ServerSettings
from tests.inprocess import TextRunner, scripted_model

MIB = 2**20


def version(n: int, model: str = "m") -> Version:
    """A registry version whose SHA-256 starts with its number."""
    sha = f"{n:02d}" * 32
    return Version(
        id=n, model=model, sha256=sha, size=1000, format="gguf", architecture="llama",
        parameters=1, file_type="Q8_0", context_length=2048, template_sha256=None,
        parent_sha256=None, operation="external", operation_params={}, source=None,
        evals=[], gates=[], params={}, encrypted=False, blob=default_model_path(),
        created="2026-01-01T00:00:00Z",
    )  # fmt: skip


@dataclass
class ScriptedRegistry:
    """A Loader: each version loads as a scripted model whose step takes `step_s[version]`."""

    tags: dict[str, Deployment] = field(default_factory=dict)
    step_s: dict[int, float] = field(default_factory=dict)  # by version id
    estimate: int = 100 * MIB  # each load's measured growth here is far less
    sizes: dict[int, int] = field(default_factory=dict)  # estimates by version id, else `estimate`
    load_s: float = 0.0  # how long a load takes
    runners: dict[int, TextRunner] = field(default_factory=dict)  # the latest load's
    loads: list[int] = field(default_factory=list)  # version ids, in load order

    def prepare(self, version: Version, model_id: str) -> Prepared:
        runner = TextRunner(n_ctx=2048, seq_cells=512, eos_at=None)
        runner.step_s = self.step_s.get(version.id, 0.0)
        self.runners[version.id] = runner
        model = scripted_model(runner, model_id=model_id)
        model.version_of = lambda: version.short
        load, delay = model.engine._load, self.load_s

        def slow_load() -> Any:
            import time

            time.sleep(delay)
            self.loads.append(version.id)
            return load()

        model.engine._load = slow_load
        return Prepared(model, self.sizes.get(version.id, self.estimate))

    def deployments(self) -> list[Deployment]:
        return list(self.tags.values())

    def point(self, ref: str, **changes: Any) -> None:
        """Move a tag (target=...) or change its deployment, as the registry's commands do."""
        name, tag = ref.split(":")
        current = self.tags.get(ref) or Deployment(name, tag, changes["target"])
        self.tags[ref] = dataclasses.replace(current, **changes)


@dataclass
class LiveServer:
    app: FastAPI
    client: httpx.AsyncClient
    table: ModelTable
    registry: ScriptedRegistry
    records: list[Record]

    async def chat(self, model: str, **body: Any) -> httpx.Response:
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            **body,
        }
        headers = body.pop("headers", None)
        payload.pop("headers", None)
        return await self.client.post("/v1/chat/completions", json=payload, headers=headers)

    async def until(self, check: Any, timeout: float = 10.0) -> None:
        """Wait until `check()` is true (the watcher polls every 50 ms here)."""
        for _ in range(int(timeout / 0.02)):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out waiting")


@asynccontextmanager
async def live_server(
    registry: ScriptedRegistry,
    refs: Iterable[str],
    *,
    policy: Policy | None = None,
    preload: Iterable[str] = (),
    settings: ServerSettings | None = None,
) -> AsyncIterator[LiveServer]:
    table = ModelTable(loader=registry, policy=policy or Policy(poll_s=0.05))
    table.open_registry(list(refs), preload=preload)
    records: list[Record] = []
    app = create_app(settings or ServerSettings(), table, sinks=[records.append])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield LiveServer(app, client, table, registry, records)
