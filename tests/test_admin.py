"""The admin API on a real registry (SQLite in a temporary $EDGELLM_HOME, tiny GGUF versions)
beside an in-process server whose versions load as scripted models: the operations change the
registry and the server follows at once; bad input is a 4xx naming the field, and changes
nothing; only admin keys get in."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.keystore import KeySpec, KeyStore
from edgellm.registry import Registry
from edgellm.registry.deploy import Deployment
from edgellm.server import create_app
from edgellm.server.auth import may_call
from edgellm.server.lifecycle import ModelTable, Policy
from edgellm.settings import ServerSettings
from tests.inprocess import scripted_server
from tests.lifecycle_fakes import ScriptedRegistry, live_server
from tests.test_models_deploy import record_eval
from tests.test_models_registry import cli_json, tiny_gguf

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class OnDisk(ScriptedRegistry):
    """Deployments from the real registry; versions load as scripted models."""

    def deployments(self) -> list[Deployment]:
        with Registry.open() as registry:
            return registry.deployments()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    versions = []
    for n in (1, 2, 3):
        gguf = tiny_gguf(tmp_path / f"{n}.gguf", n)
        versions.append(cli_json("models", "add", str(gguf), "--name", f"m:v{n}"))
    cli_json("models", "tag", "m:v1", "m:prod")
    yield versions


def served_version(r: Any) -> str:
    assert r.status_code == 200, r.text
    return str(r.headers["x-edgellm-model-version"])


async def test_operations_move_the_registry_and_the_server_follows(
    home: list[dict[str, Any]],
) -> None:
    v1, v2, v3 = (v["version"] for v in home)
    async with live_server(OnDisk(), ["m:prod"]) as srv:
        assert served_version(await srv.chat("m:prod")) == v1
        moved = await srv.client.post("/admin/promote", json={"model": "m:prod", "to": "v2"})
        assert moved.status_code == 200, moved.text
        assert (moved.json()["previous"], moved.json()["current"]) == (v1, v2)
        await srv.until(lambda: srv.table.slots()[0].target != "v1")
        assert served_version(await srv.chat("m:prod")) == v2

        back = await srv.client.post("/admin/rollback", json={"model": "m:prod"})
        assert back.json()["current"] == v1
        await srv.until(lambda: srv.table.describe()["models"]["m:prod"]["version"] == v1)

        canary = await srv.client.post(
            "/admin/canary", json={"model": "m:prod", "to": "v3", "weight": 100}
        )
        assert canary.status_code == 200, canary.text
        assert canary.json()["candidate"] == v3
        await srv.until(lambda: srv.table.slots()[0].deployment.candidate is not None)
        r = await srv.chat("m:prod")
        assert served_version(r) == v3 and r.headers["x-edgellm-route"] == "canary"
        ended = await srv.client.post("/admin/canary/end", json={"model": "m:prod"})
        assert ended.json()["candidate"] is None

        fallback = await srv.client.post(
            "/admin/fallback",
            json={"model": "m:prod", "to": "v2", "ttft_p99": "800ms", "window": 30},
        )
        assert fallback.status_code == 200, fallback.text
        assert (fallback.json()["ttft_p99_s"], fallback.json()["window_s"]) == (0.8, 30.0)
        await srv.until(lambda: srv.table.slots()[0].fallback is not None)
        off = await srv.client.post("/admin/fallback/off", json={"model": "m:prod"})
        assert off.json()["fallback"] is None

        described = (await srv.client.get("/admin/models")).json()
        assert described["models"]["m:prod"]["version"] == v1
        loaded = await srv.client.post("/admin/models/m:prod/unload")
        assert loaded.status_code == 200 and v1 in loaded.json()["unloaded"]
        again = await srv.client.post("/admin/models/m:prod/load")
        assert again.json()["version"] == v1 and again.json()["state"] == "ready"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/admin/promote", {"model": "m:prod", "to": "nosuch"}, 400, "to"),
        ("/admin/canary", {"model": "m:prod", "to": "v2", "weight": 0}, 400, "weight"),
        ("/admin/canary", {"model": "m:prod", "to": "v2", "weight": 101}, 400, "weight"),
        ("/admin/fallback", {"model": "m:prod", "to": "v1", "ttft_p99": "1s"}, 400, "to"),
        ("/admin/fallback", {"model": "m:prod", "to": "v2", "ttft_p99": "soon"}, 400, "ttft_p99"),
        ("/admin/rollback", {"model": "m:prod"}, 400, None),
        ("/admin/promote", {"model": "nosuch:tag", "to": "v2"}, 404, None),
    ],
)
async def test_bad_operations_are_4xx_and_change_nothing(
    home: list[dict[str, Any]], path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    async with live_server(OnDisk(), ["m:prod"]) as srv:
        before = srv.table.describe()["models"]
        r = await srv.client.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"]
        if param is not None:
            assert error["param"] == param
        with Registry.open() as registry:
            assert registry.deployment("m:prod").target.short == home[0]["version"]
        assert srv.table.describe()["models"] == before


async def test_a_failing_gate_is_409_and_force_goes_past_it(home: list[dict[str, Any]]) -> None:
    cli_json("models", "set", "m:prod", "gate=kl_mean<0.05")
    record_eval(Path(os.environ["EDGELLM_HOME"]), home[1]["sha256"], {"kl_mean": 0.2})
    async with live_server(OnDisk(), ["m:prod"]) as srv:
        refused = await srv.client.post("/admin/promote", json={"model": "m:prod", "to": "v2"})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "gate_failed"
        forced = await srv.client.post(
            "/admin/promote", json={"model": "m:prod", "to": "v2", "force": True}
        )
        assert forced.status_code == 200 and forced.json()["forced"] is True
    conn = sqlite3.connect(Path(os.environ["EDGELLM_HOME"]) / "edgellm.db")
    try:
        rows = conn.execute("SELECT route, method, model, finish_reason FROM audit_log").fetchall()
    finally:
        conn.close()
    assert ("models promote", "POST", "m:prod", "forced") in rows


async def test_only_admin_keys_reach_the_admin_api(home: list[dict[str, Any]]) -> None:
    assert not may_call("user", "/admin/promote") and not may_call("metrics", "/admin/models")
    settings = ServerSettings(api_key="admin-secret")
    async with live_server(OnDisk(), ["m:prod"], settings=settings) as srv:
        assert (await srv.client.get("/admin/models")).status_code == 401
        ok = await srv.client.get("/admin/models", headers={"Authorization": "Bearer admin-secret"})
        assert ok.status_code == 200


def make_keys(path: Path) -> tuple[KeyStore, dict[str, str]]:
    store = KeyStore.open(path)
    made = {
        role: store.create(KeySpec.model_validate({"name": name, "role": role}))[0]
        for name, role in (("root", "admin"), ("alice", "user"), ("prom", "metrics"))
    }
    return store, made


async def test_user_and_metrics_keys_get_403_and_no_key_401(
    home: list[dict[str, Any]], tmp_path: Path
) -> None:
    """With keys on, /admin is the admin role's: the others are refused by the key check,
    before any registry is touched; an admin's forced move names its key in the audit log."""
    cli_json("models", "set", "m:prod", "gate=kl_mean<0.05")
    store, keys = make_keys(tmp_path / "keys.db")
    table = ModelTable(loader=OnDisk(), policy=Policy(poll_s=0.05))
    table.open_registry(["m:prod"])
    app = create_app(ServerSettings(), table, keys=store)
    promote = {"model": "m:prod", "to": "v2", "force": True}
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1"
            ) as client:
                for path in ("/admin/models", "/admin/promote"):
                    for role, status in ((None, 401), ("user", 403), ("metrics", 403)):
                        headers = {"Authorization": f"Bearer {keys[role]}"} if role else {}
                        r = await client.request(
                            "GET" if path == "/admin/models" else "POST", path,
                            json=promote, headers=headers,
                        )  # fmt: skip
                        assert r.status_code == status, (path, role, r.text)
                        assert r.json()["error"]["message"]
                with Registry.open() as registry:
                    assert registry.deployment("m:prod").target.short == home[0]["version"]
                admin = {"Authorization": f"Bearer {keys['admin']}"}
                r = await client.post("/admin/promote", json=promote, headers=admin)
                assert r.status_code == 200 and r.json()["forced"] is True, r.text
    finally:
        store.close()
    conn = sqlite3.connect(Path(os.environ["EDGELLM_HOME"]) / "edgellm.db")
    try:
        rows = conn.execute("SELECT method, key_name, finish_reason FROM audit_log").fetchall()
    finally:
        conn.close()
    assert ("POST", "root", "forced") in rows


async def test_a_server_of_model_files_refuses_registry_operations() -> None:
    async with scripted_server() as srv:
        listed = await srv.client.get("/admin/models")
        assert listed.status_code == 200 and "scripted" in listed.json()["models"]
        for path, body in (
            ("/admin/promote", {"model": "scripted", "to": "v2"}),
            ("/admin/rollback", {"model": "scripted"}),
            ("/admin/canary", {"model": "scripted", "to": "v2", "weight": 5}),
            ("/admin/canary/end", {"model": "scripted"}),
            ("/admin/fallback", {"model": "scripted", "to": "v2", "ttft_p99": 1}),
            ("/admin/fallback/off", {"model": "scripted"}),
        ):
            r = await srv.client.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "no_registry" and "no registry models" in error["message"]
        unload = await srv.client.post("/admin/models/scripted/unload")
        assert unload.status_code == 400 and "static model" in unload.json()["error"]["message"]
        assert (await srv.client.post("/admin/models/nosuch/load")).status_code == 404
        assert (await srv.chat()).status_code == 200  # still serving


async def test_with_auth_off_no_key_can_be_planted_and_nothing_pulled(tmp_path: Path) -> None:
    """A server with no key at all: storing the first key would turn auth on for whoever
    stored it, and a pull makes the server fetch any URL; both want an admin key."""
    store = KeyStore.open(tmp_path / "keys.db")
    body = {"name": "mallory", "role": "admin", "prefix": "edg-abcdefgh", "sha256": "00" * 32}
    try:
        async with scripted_server(keys=store) as srv:
            planted = await srv.client.post("/admin/keys", json=body)
            pulled = await srv.client.post(
                "/admin/models/pull", json={"source": "http://127.0.0.1:9/m.gguf", "name": "m"}
            )
        assert store.all_keys() == []
    finally:
        store.close()
    for r in (planted, pulled):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "auth_off"
