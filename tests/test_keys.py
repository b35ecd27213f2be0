"""API keys enforced, in-process: the real app and key check on a real SQLite key store in the
test's own directory, one rule per test (roles, model scopes, listings, /metrics, /ready, hot
reload, the records), and the key ring's lookups on a scripted clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from edgellm.cli.serve import check_keys_for_public_bind
from edgellm.errors import AuthError, EdgeLLMError
from edgellm.keystore import KeySpec, KeyStore
from edgellm.server.auth import may_call
from edgellm.server.keys import API_KEY_PRINCIPAL, KeyRing, Principal
from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, ScriptedServer, TextRunner, scripted_model, scripted_server

pytestmark = pytest.mark.anyio

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OLLAMA_CHAT = {**CHAT, "stream": False}


def spec(name: str, role: str = "user", **fields: object) -> KeySpec:
    return KeySpec.model_validate({"name": name, "role": role, **fields})


@dataclass
class Keys:
    store: KeyStore
    admin: str
    user: str
    scoped: str  # a user key for MODEL only
    other: str  # a user key for another model only
    metrics: str
    revoked: str
    expired: str


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[Keys]:
    store = KeyStore.open(tmp_path / "edgellm.db")
    made = {
        "admin": store.create(spec("root", "admin"))[0],
        "user": store.create(spec("alice"))[0],
        "scoped": store.create(spec("bob", models=MODEL))[0],
        "other": store.create(spec("carol", models="other-model"))[0],
        "metrics": store.create(spec("prom", "metrics"))[0],
        "revoked": store.create(spec("gone"))[0],
        "expired": store.create(spec("old", expires="2000-01-01"))[0],
    }
    store.revoke("gone")
    yield Keys(store, **made)
    store.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def keyed_server(
    keys: KeyStore, settings: ServerSettings | None = None
) -> AsyncIterator[ScriptedServer]:
    async with scripted_server(settings, keys=keys) as srv:
        yield srv


async def test_no_key_ever_made_means_no_auth(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "edgellm.db")
    try:
        async with keyed_server(store) as srv:
            assert (await srv.client.get("/v1/models")).status_code == 200
            assert (await srv.chat()).status_code == 200
            ready = (await srv.client.get("/ready")).json()
            assert ready["status"] == "ready" and MODEL in ready["models"]
            assert srv.records[-1].key is None
    finally:
        store.close()


async def test_only_expired_keys_left_keeps_auth_on(tmp_path: Path) -> None:
    """Auth fails closed: outliving (or revoking) the last key refuses everyone."""
    store = KeyStore.open(tmp_path / "edgellm.db")
    store.create(spec("old", expires="2000-01-01"))  # expired: not active
    try:
        async with keyed_server(store) as srv:
            assert (await srv.client.get("/v1/models")).status_code == 401
            assert (await srv.chat()).status_code == 401
    finally:
        store.close()


async def test_a_request_without_a_valid_key_is_401_in_its_api_envelope(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        http = srv.client
        for headers, says in [
            ({}, "no API key"),
            (bearer("edg-nope"), "not valid"),
            (bearer(keys.revoked), "not valid"),  # revoked reads as unknown
            ({"Authorization": f"Basic {keys.admin}"}, "no API key"),
        ]:
            r = await http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["type"] == "authentication_error" and says in error["message"]
            assert error["code"] == "invalid_api_key"
            o = await http.post("/api/chat", json=OLLAMA_CHAT, headers=headers)
            assert o.status_code == 401 and o.json() == {"error": error["message"]}
        expired = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.expired))
        assert expired.status_code == 401
        assert expired.json()["error"]["code"] == "expired_api_key"
        assert "expired" in expired.json()["error"]["message"]
        for path in ("/", "/health", "/ready"):
            assert (await http.get(path)).status_code == 200, path


async def test_either_header_carries_the_key(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        assert (await srv.client.get("/v1/models", headers=bearer(keys.user))).status_code == 200
        r = await srv.client.get("/v1/models", headers={"X-Api-Key": keys.user})
        assert r.status_code == 200


async def test_roles(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        http = srv.client
        for key, path, status in [
            (keys.admin, "/metrics", 200),
            (keys.admin, "/v1/models", 200),
            (keys.admin, "/openapi.json", 200),
            (keys.user, "/v1/models", 200),
            (keys.user, "/api/tags", 200),
            (keys.user, "/api/version", 200),
            (keys.user, "/openapi.json", 200),
            (keys.user, "/metrics", 403),
            (keys.metrics, "/metrics", 200),
            (keys.metrics, "/v1/models", 403),
            (keys.metrics, "/api/tags", 403),
            (keys.metrics, "/openapi.json", 403),
        ]:
            r = await http.get(path, headers=bearer(key))
            assert r.status_code == status, (key, path, r.text)
        denied = await http.get("/metrics", headers=bearer(keys.user))
        assert denied.json()["error"] == {
            "message": "this API key (role user) may not read /metrics",
            "type": "permission_error",
            "param": None,
            "code": "role_not_allowed",
        }
        ollama = await http.post("/api/chat", json=OLLAMA_CHAT, headers=bearer(keys.metrics))
        assert ollama.status_code == 403
        assert ollama.json() == {"error": "this API key (role metrics) may only read /metrics"}


def test_the_role_table() -> None:
    assert may_call("admin", "/admin/models") and not may_call("user", "/admin/models")
    assert not may_call("metrics", "/ready/extra") and not may_call("user", "/v1")
    assert may_call("user", "/v1/embeddings") and may_call("user", "/api/embed")


async def test_metrics_public_opens_metrics_only(keys: Keys) -> None:
    async with keyed_server(keys.store, ServerSettings(metrics_public=True)) as srv:
        assert (await srv.client.get("/metrics")).status_code == 200
        assert (await srv.client.get("/metrics", headers=bearer("edg-junk"))).status_code == 200
        assert (await srv.client.get("/v1/models")).status_code == 401


async def test_ready_shows_engine_statistics_to_key_holders_only(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        bare = await srv.client.get("/ready")
        assert bare.status_code == 200 and bare.json() == {"status": "ready"}
        wrong = await srv.client.get("/ready", headers=bearer("edg-junk"))
        assert wrong.json() == {"status": "ready"}  # a probe never fails on a bad key
        for key in (keys.metrics, keys.user, keys.admin):
            full = (await srv.client.get("/ready", headers=bearer(key))).json()
            assert "kv_cells_total" in full["models"][MODEL]


async def add_model(srv: ScriptedServer, model_id: str) -> None:
    """Serve a second scripted model beside the first, its engine running."""
    model = scripted_model(TextRunner(n_ctx=2048, seq_cells=512, eos_at=None), model_id=model_id)
    model.engine.start(asyncio.get_running_loop())
    await asyncio.to_thread(model.engine.wait_loaded)
    srv.app.state.models.add(model)


async def test_a_scoped_key_sees_and_uses_only_its_models(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        await add_model(srv, "other-model")
        http = srv.client
        try:
            for key, seen in [
                (keys.scoped, [MODEL]),
                (keys.other, ["other-model"]),
                (keys.user, [MODEL, "other-model"]),
            ]:
                v1 = (await http.get("/v1/models", headers=bearer(key))).json()
                assert [m["id"] for m in v1["data"]] == seen
                tags = (await http.get("/api/tags", headers=bearer(key))).json()
                assert [m["name"] for m in tags["models"]] == [f"{m}:latest" for m in seen]
                ps = (await http.get("/api/ps", headers=bearer(key))).json()
                assert [m["name"] for m in ps["models"]] == [f"{m}:latest" for m in seen]
            mine = await http.get(f"/v1/models/{MODEL}", headers=bearer(keys.scoped))
            assert mine.status_code == 200
            other = bearer(keys.other)
            card = await http.get(f"/v1/models/{MODEL}", headers=other)
            assert card.status_code == 403 and card.json()["error"]["param"] == "model"
            chat = await http.post("/v1/chat/completions", json=CHAT, headers=other)
            assert chat.status_code == 403
            assert chat.json()["error"] == {
                "message": f"this API key may not use the model '{MODEL}'",
                "type": "permission_error",
                "param": "model",
                "code": "model_not_allowed",
            }
            ollama = await http.post("/api/chat", json=OLLAMA_CHAT, headers=other)
            assert ollama.status_code == 403
            assert ollama.json() == {
                "error": f"model: this API key may not use the model '{MODEL}'"
            }
            for path, body in [
                ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
                ("/v1/embeddings", {"model": MODEL, "input": "hi"}),
                ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
                ("/api/embed", {"model": MODEL, "input": "hi"}),
                ("/api/embeddings", {"model": MODEL, "prompt": "hi"}),
                ("/api/show", {"model": f"{MODEL}:latest"}),
            ]:
                r = await http.post(path, json=body, headers=other)
                assert r.status_code == 403, (path, r.text)
            # a model that does not exist is refused the same way: no probing for names
            unknown = await http.post(
                "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=other
            )
            assert unknown.status_code == 403
            assert (
                await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.scoped))
            ).status_code == 200
            tagged = {**OLLAMA_CHAT, "model": f"{MODEL}:latest"}
            assert (
                await http.post("/api/chat", json=tagged, headers=bearer(keys.scoped))
            ).status_code == 200
        finally:
            await asyncio.to_thread(srv.app.state.models.lookup("other-model").engine.shutdown)


async def test_records_name_the_key_also_when_refused(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:
        assert (await srv.chat(headers=bearer(keys.scoped))).status_code == 200
        assert (await srv.chat(headers=bearer(keys.other))).status_code == 403
        assert (await srv.chat(headers=bearer(keys.metrics))).status_code == 403
        assert (await srv.chat()).status_code == 401
        seen = [(r.key, r.role, r.status) for r in srv.records]
        assert seen == [("bob", "user", 200), ("carol", "user", 403), ("prom", "metrics", 403),
                        (None, None, 401)]  # fmt: skip


async def test_keys_made_and_revoked_elsewhere_count_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    cli, served = KeyStore.open(path), KeyStore.open(path)  # `edgellm keys`, and the server's
    try:
        async with keyed_server(served) as srv:
            assert (await srv.client.get("/v1/models")).status_code == 200  # no key yet: open
            key, _ = cli.create(spec("late"))
            made = time.monotonic()
            while (await srv.client.get("/v1/models")).status_code == 200:
                assert time.monotonic() - made < 1.0
                await asyncio.sleep(0.02)
            assert (await srv.client.get("/v1/models", headers=bearer(key))).status_code == 200
            cli.create(spec("keeper"))  # so that revoking "late" leaves auth on
            cli.revoke("late")
            revoked = time.monotonic()
            while (await srv.client.get("/v1/models", headers=bearer(key))).status_code == 200:
                assert time.monotonic() - revoked < 1.0
                await asyncio.sleep(0.02)
    finally:
        cli.close()
        served.close()


async def test_the_api_key_flag_works_beside_stored_keys(keys: Keys) -> None:
    async with keyed_server(keys.store, ServerSettings(api_key="s3cret")) as srv:
        assert (await srv.client.get("/metrics", headers=bearer("s3cret"))).status_code == 200
        assert (await srv.chat(headers=bearer("s3cret"))).status_code == 200
        assert srv.records[-1].key == "api-key" and srv.records[-1].role == "admin"
        assert (await srv.client.get("/v1/models", headers=bearer(keys.user))).status_code == 200


async def test_start_up_says_whether_auth_is_on(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgellm.server"):
        async with keyed_server(keys.store):
            pass
        async with scripted_server():
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth:")]
    assert lines == [
        "auth: enforced (5 active keys)",
        "auth: off (no API key made, no --api-key): every request is served",
    ]


async def test_the_official_client_reads_401_and_403(keys: Keys) -> None:
    async with keyed_server(keys.store) as srv:

        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(
                base_url="http://127.0.0.1/v1",
                api_key=key,
                max_retries=0,
                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=srv.app)),
            )

        messages: Any = CHAT["messages"]
        async with client(keys.revoked) as c:
            with pytest.raises(openai.AuthenticationError, match="not valid"):
                await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        async with client(keys.other) as c:
            with pytest.raises(openai.PermissionDeniedError, match="may not use the model"):
                await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        async with client(keys.scoped) as c:
            done = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            assert done.choices[0].finish_reason == "length"


def test_a_public_bind_needs_an_active_key_or_the_flag(keys: Keys, tmp_path: Path) -> None:
    public = ServerSettings(host="0.0.0.0")
    check_keys_for_public_bind(public, keys.store)  # five active keys
    check_keys_for_public_bind(ServerSettings(host="0.0.0.0", api_key="x"), None)
    empty = KeyStore.open(tmp_path / "empty.db")
    try:
        with pytest.raises(EdgeLLMError, match="edgellm keys create"):
            check_keys_for_public_bind(public, empty)
    finally:
        empty.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_ring_looks_keys_up_and_reloads_only_when_due(tmp_path: Path) -> None:
    path = tmp_path / "edgellm.db"
    writer, reader = KeyStore.open(path), KeyStore.open(path)  # the CLI's and the server's
    clock = Clock()
    try:
        ring = KeyRing(reader, clock=clock, reload_s=0.5)
        assert not ring.enforced and ring.active == 0
        alice, _ = writer.create(spec("alice", models="m", rpm="5", tpm="100", max_concurrent="2"))
        ring.refresh()
        assert not ring.enforced  # not due yet: the last look was at this very time
        clock.now += 0.5
        ring.refresh()
        assert ring.enforced and ring.active == 1
        assert ring.authenticate(alice.encode()) == Principal(
            "alice", "user", frozenset({"m"}), 5, 100, 2
        )
        with pytest.raises(AuthError, match="not valid"):
            ring.authenticate((alice[:12] + "x" * 35).encode())  # its prefix, not its secret
        with pytest.raises(AuthError, match="not valid"):
            ring.authenticate(b"edg-unknown-unknown-unknown")
        writer.revoke("alice")
        clock.now += 0.5
        ring.refresh()
        with pytest.raises(AuthError, match="not valid") as raised:  # as an unknown key
            ring.authenticate(alice.encode())
        assert raised.value.code == "invalid_api_key"
        assert ring.enforced and ring.active == 0  # the last active key is gone: closed
    finally:
        writer.close()
        reader.close()


def test_expired_keys_say_so_and_do_not_count_as_active(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "edgellm.db")
    try:
        old, _ = store.create(spec("old", expires="2000-01-01"))
        ring = KeyRing(store)
        assert ring.enforced and ring.active == 0  # an expired key counts for auth, not as active
        with pytest.raises(AuthError, match="expired") as raised:
            ring.authenticate(old.encode())
        assert raised.value.code == "expired_api_key"
    finally:
        store.close()


def test_the_api_key_flag_is_an_admin_key_beside_the_store(keys: Keys) -> None:
    ring = KeyRing(keys.store, api_key="s3cret")
    assert ring.enforced and ring.active == 5
    assert ring.authenticate(b"s3cret") is API_KEY_PRINCIPAL
    assert ring.authenticate(keys.metrics.encode()).role == "metrics"
    assert ring.describe() == "auth: enforced (5 active keys, and --api-key)"
    assert KeyRing(api_key="x").describe() == "auth: enforced (0 active keys, and --api-key)"


def test_a_database_that_cannot_be_read_keeps_the_keys_there_were(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = KeyStore.open(tmp_path / "edgellm.db")
    key, _ = store.create(spec("a"))
    clock = Clock()
    ring = KeyRing(store, clock=clock)
    store.close()  # every later read fails
    for _ in range(3):
        clock.now += 1
        ring.refresh()
    assert ring.authenticate(key.encode()).name == "a"
    assert sum("cannot read the API keys" in r.getMessage() for r in caplog.records) == 1


def test_losing_the_last_active_key_keeps_auth_on_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = KeyStore.open(tmp_path / "edgellm.db")
    try:
        store.create(spec("a"))
        clock = Clock()
        ring = KeyRing(store, clock=clock)
        other = KeyStore.open(tmp_path / "edgellm.db")
        other.revoke("a")
        other.close()
        clock.now += 1
        with caplog.at_level(logging.INFO, logger="edgellm.server"):
            ring.refresh()
        assert ring.enforced  # fails closed: a revoked last key must not open the server
        warned = [r.levelname for r in caplog.records if "no active API key" in r.getMessage()]
        assert warned == ["WARNING"]
    finally:
        store.close()
