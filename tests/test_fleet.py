"""`edgellm fleet` through the real CLI against a fleet of workers in this process: each one
the real app on its own uvicorn socket, its own data directory (registry and keys), versions
that load as scripted models. The rollout's order is read from what the workers saw, and each
worker's agent line is taken while it swaps; the refusals are one line and change nothing; a
worker that fails mid-rollout stops it with a report of what is where."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import ModelFileError
from edgellm.keystore import PREFIX_CHARS, KeySpec, KeyStore, key_digest, new_key
from edgellm.registry import Registry, Version
from edgellm.registry.deploy import Deployment
from edgellm.server import create_app
from edgellm.server.agent import agent_line
from edgellm.server.lifecycle import ModelTable, Policy, Prepared
from edgellm.settings import ServerSettings
from tests.conftest import free_port
from tests.lifecycle_fakes import ScriptedRegistry
from tests.test_models_registry import cli, one_line_error, tiny_gguf

KEY = new_key()  # the fleet's admin key (--api-key on every worker)
WATCHED = ("/admin/drain", "/admin/promote", "/admin/rollback", "/admin/canary",
           "/admin/canary/end", "/ready")  # fmt: skip


@dataclass
class OnDisk(ScriptedRegistry):
    """A worker's own registry (its `home`); versions load as scripted models, except those
    in `broken`, whose load fails."""

    home: Path = Path()
    broken: set[int] = field(default_factory=set)

    def deployments(self) -> list[Deployment]:
        with Registry.open(self.home) as registry:
            return registry.deployments()

    def prepare(self, version: Version, model_id: str) -> Prepared:
        if version.id in self.broken:
            raise ModelFileError(f"version {version.short} is broken")
        return super().prepare(version, model_id)


@dataclass
class Box:
    """One worker, serving on a real socket."""

    url: str
    home: Path
    app: Any
    table: ModelTable
    server: uvicorn.Server
    thread: threading.Thread
    store: KeyStore

    def agent(self) -> str:
        return agent_line(self.table, self.app.state.drain)

    def target(self, ref: str = "m:prod") -> str:
        with Registry.open(self.home) as registry:
            return registry.deployment(ref).target.short

    def chat(self, key: str = KEY) -> httpx.Response:
        body = {"model": "m:prod", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2}  # fmt: skip
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers)


@dataclass
class Fleet:
    boxes: list[Box]
    workers_file: Path
    events: list[tuple[int, str, list[str]]]  # (worker, what, every worker's agent line then)
    versions: dict[str, str]  # tag -> version short (the same bytes on every worker)

    def run(self, *args: str, key: str = KEY) -> Any:
        return cli("fleet", "--workers", str(self.workers_file), "--api-key", key, *args)

    def posts(self) -> list[tuple[int, str]]:
        return [(n, what) for n, what, _ in self.events if what != "ready"]


def _registry(home: Path, tmp: Path, tags: dict[str, int]) -> dict[str, str]:
    shorts = {}
    with Registry.open(home) as registry:
        for tag, seed in tags.items():
            shorts[tag] = registry.add_file(tiny_gguf(tmp / f"{seed}.gguf", seed), f"m:{tag}").short
        registry.tag("m:v1", "m:prod")
    return shorts


def _watch(app: ASGIApp, n: int, fleet: Fleet) -> ASGIApp:
    """Record the admin calls worker `n` answers: a drain as it is after the call; the
    operations with every worker's agent line as the call arrives; /ready when it is 200."""

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in WATCHED:
            await app(scope, receive, send)
            return
        agents = [box.agent() for box in fleet.boxes]

        async def sent(message: Any) -> None:
            if message["type"] == "http.response.start":  # before the client can see it
                ok = message["status"] == 200
                if path == "/admin/drain":
                    on = fleet.boxes[n].app.state.drain.maintenance
                    fleet.events.append((n, "drain on" if on else "drain off", agents))
                elif ok:
                    fleet.events.append((n, path.removeprefix("/admin/").lstrip("/"), agents))
            await send(message)

        await app(scope, receive, sent)

    return watched


def _start(fleet: Fleet, n: int, home: Path, *, refs: list[str], settings: ServerSettings,
           user_key: bool, broken: set[int]) -> Box:  # fmt: skip
    table = ModelTable(loader=OnDisk(home=home, broken=broken), policy=Policy(poll_s=0.05))
    table.open_registry(refs, preload=refs)
    store = KeyStore.open(home / "edgellm.db")
    if user_key:  # the fleet's key is a user key here
        spec = KeySpec.model_validate({"name": "ops", "role": "user"})
        store.add_hashed(spec, KEY[:PREFIX_CHARS], key_digest(KEY.encode()))
    app = create_app(settings, table, keys=store)
    port = free_port()
    config = uvicorn.Config(_watch(app, n, fleet), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    box = Box(f"http://127.0.0.1:{port}", home, app, table, server, thread, store)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(box.url + "/health").status_code == 200 and not table.preloading:
                return box
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise AssertionError("the worker did not start")


@contextmanager
def fleet_of(tmp_path: Path, n: int = 3, *, extra: str = "", **per_worker: Any) -> Iterator[Fleet]:
    """`n` workers serving m:prod (at m:v1; m:v2 is there too). `per_worker`: option ->
    {worker index: value}: refs (served names), tags (tag -> seed), api_key, user_key, broken.
    `extra`: lines added to the workers file."""
    fleet = Fleet([], tmp_path / "workers.txt", [], {})
    try:
        for i in range(n):
            home = tmp_path / f"w{i}"
            options = {k: v[i] for k, v in per_worker.items() if i in v}
            tags = options.get("tags", {"v1": 1, "v2": 2})
            fleet.versions = _registry(home, tmp_path, tags) if i == 0 else fleet.versions
            if i:
                _registry(home, tmp_path, tags)
            settings = ServerSettings(api_key=options.get("api_key", KEY))
            if options.get("user_key"):
                settings = ServerSettings()
            fleet.boxes.append(_start(
                fleet, i, home, refs=options.get("refs", ["m:prod"]), settings=settings,
                user_key=bool(options.get("user_key")), broken=options.get("broken", set()),
            ))  # fmt: skip
        urls = "\n".join(b.url for b in fleet.boxes)
        fleet.workers_file.write_text(f"# the test fleet\n{urls}\n\n{extra}")
        yield fleet
    finally:
        for box in fleet.boxes:
            box.server.should_exit = True
        for box in fleet.boxes:
            box.thread.join(10)
            box.store.close()


def nothing_changed(fleet: Fleet) -> None:
    assert fleet.posts() == []
    for box in fleet.boxes:
        assert box.target() == fleet.versions["v1"]
        assert not box.app.state.drain.maintenance and box.agent().startswith("up")


# -- status ----------------------------------------------------------------------------------


def test_status_is_a_table_and_json_and_names_the_worker_that_does_not_answer(
    tmp_path: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with fleet_of(tmp_path, 2) as fleet:
        v1 = fleet.versions["v1"]
        r = httpx.post(fleet.boxes[1].url + "/admin/drain", json={"on": True},
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200 and r.json() == {"maintenance": True}
        ready = httpx.get(fleet.boxes[1].url + "/ready", headers={"Authorization": f"Bearer {KEY}"})
        assert ready.status_code == 200 and ready.json()["maintenance"] is True
        assert fleet.boxes[1].agent() == "drain" and fleet.boxes[0].agent() == "up 100%"

        table = fleet.run("status")
        assert table.exit_code == 0, table.stderr
        rows = [line for line in table.stdout.splitlines() if "127.0.0.1" in line]
        assert len(rows) == 2
        assert "ready" in rows[0] and f"m:prod {v1}" in rows[0]
        assert "maintenance" in rows[1]

        as_json = fleet.run("status", "--json")
        found = json.loads(as_json.stdout)
        assert [w["health"] for w in found] == ["ready", "maintenance"]
        assert found[0]["models"]["m:prod"]["version"] == v1 and found[0]["loaded"]
        assert found[0]["kv_cells_total"] > 0 and found[0]["running"] == 0
        assert found[0]["edgellm"] and found[1]["maintenance"] is True

        fleet.workers_file.write_text(f"{fleet.boxes[0].url}\n{dead}\n")
        partly = fleet.run("status", "--json")
        assert partly.exit_code == 1
        found = json.loads(partly.stdout)
        assert found[1]["health"] == "unreachable" and dead in found[1]["error"]
        assert found[0]["health"] == "ready"


# -- keys ------------------------------------------------------------------------------------


def test_one_key_works_on_every_worker_is_stored_only_as_a_hash_and_revokes_everywhere(
    tmp_path: Path,
) -> None:
    with fleet_of(tmp_path, 3) as fleet:
        made = fleet.run("keys", "create", "alice", "--role", "user", "--rpm", "60")
        assert made.exit_code == 0, made.stderr
        secret = made.stdout.strip()
        assert secret.startswith("edg-") and "only time" in made.stderr
        for box in fleet.boxes:
            assert box.chat(secret).status_code == 200
            db = box.home / "edgellm.db"
            conn = sqlite3.connect(db)
            try:
                row = conn.execute(
                    "SELECT key_sha256, prefix, role, rpm FROM api_keys WHERE name = 'alice'"
                ).fetchone()
            finally:
                conn.close()
            assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
            assert row[1:] == (secret[:PREFIX_CHARS], "user", 60)
            assert secret[PREFIX_CHARS:].encode() not in db.read_bytes()

        again = fleet.run("keys", "create", "alice", "--role", "user")
        assert "exists already" in one_line_error(again)
        assert fleet.boxes[0].url in again.stderr

        # a name taken on one worker only: refused before anything is stored anywhere
        fleet.boxes[2].store.create(KeySpec(name="bob", role="user"))
        taken = fleet.run("keys", "create", "bob", "--role", "user")
        line = one_line_error(taken)
        assert fleet.boxes[2].url in line and "nothing was stored" in line
        for box in fleet.boxes[:2]:
            assert "bob" not in {k.name for k in box.store.all_keys()}

        revoked = fleet.run("keys", "revoke", "alice")
        assert revoked.exit_code == 0, revoked.stderr
        assert revoked.stderr.count("revoked since") == 3
        for box in fleet.boxes:
            assert box.chat(secret).status_code == 401

        unknown = fleet.run("keys", "revoke", "nobody")
        line = one_line_error(unknown)
        assert "not revoked on 3 of 3" in line and "no key named 'nobody'" in line


# -- rolling ---------------------------------------------------------------------------------


def test_a_rolling_promote_goes_worker_by_worker_drained_while_it_swaps(tmp_path: Path) -> None:
    with fleet_of(tmp_path, 3) as fleet:
        v1, v2 = fleet.versions["v1"], fleet.versions["v2"]
        for box in fleet.boxes:
            assert box.chat().headers["x-edgellm-model-version"] == v1
        fleet.events.clear()
        done = fleet.run("models", "promote", "m:prod", "--to", "v2", "--settle", "0.05")
        assert done.exit_code == 0, done.stderr

        order = []
        for n, what, _ in fleet.events:  # the first /ready 200 after its promote: healthy
            if what != "ready" or (order and order[-1] == (n, "promote")):
                order.append((n, "healthy" if what == "ready" else what))
        assert order == [(n, step) for n in range(3)
                         for step in ("drain on", "promote", "healthy", "drain off")]  # fmt: skip
        for n, what, agents in fleet.events:
            if what == "promote":  # its agent says drain while it swaps; the others take load
                assert agents[n] == "drain"
                assert all(a.startswith("up") for i, a in enumerate(agents) if i != n)
        for box in fleet.boxes:
            assert box.target() == v2 and box.agent() == "up 100%"
            assert box.chat().headers["x-edgellm-model-version"] == v2
        lines = done.stderr.splitlines()
        assert f"[1/3] {fleet.boxes[0].url}: promote m:prod: {v1} -> {v2}" in lines
        assert f"[3/3] {fleet.boxes[2].url}: healthy: m:prod serves {v2}, /ready 200" in lines
        assert "promote m:prod: done on 3 workers" in done.stderr

        fleet.events.clear()
        again = fleet.run("models", "promote", "m:prod", "--to", v2, "--settle", "0", "--json")
        assert again.exit_code == 0, again.stderr
        assert [w["state"] for w in json.loads(again.stdout)["workers"]] == ["skipped"] * 3
        assert fleet.posts() == []

        back = fleet.run("models", "rollback", "m:prod", "--settle", "0")
        assert back.exit_code == 0, back.stderr
        assert all(box.target() == v1 for box in fleet.boxes)

        canary = fleet.run("models", "canary", "m:prod", "--to", "v2", "--weight", "100",
                           "--settle", "0")  # fmt: skip
        assert canary.exit_code == 0, canary.stderr
        for box in fleet.boxes:
            r = box.chat()
            assert r.headers["x-edgellm-model-version"] == v2
            assert r.headers["x-edgellm-route"] == "canary"
        ended = fleet.run("models", "canary", "m:prod", "--end", "--settle", "0")
        assert ended.exit_code == 0, ended.stderr
        assert all(box.chat().headers["x-edgellm-model-version"] == v1 for box in fleet.boxes)


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("models", "serve different models"),
        ("unreachable", "does not answer"),
        ("wrong key", "refused the API key (401)"),
        ("user key", "refused the API key (403"),
        ("no version", "v2"),
        ("bad file", "is not a worker URL"),
    ],
)
def test_preflight_refuses_in_one_line_naming_the_worker_and_changes_nothing(
    tmp_path: Path, case: str, said: str
) -> None:
    per_worker: dict[str, dict[int, Any]] = {
        "models": {"refs": {2: ["m:prod", "m:v1"]}},
        "wrong key": {"api_key": {1: "another-admin-key"}},
        "user key": {"user_key": {1: True}},
        "no version": {"tags": {1: {"v1": 1}}},
    }.get(case, {})
    dead = f"http://127.0.0.1:{free_port()}"
    extra = {"unreachable": dead, "bad file": "ftp://10.0.0.1/"}.get(case, "")
    with fleet_of(tmp_path, 3, extra=extra, **per_worker) as fleet:
        fleet.events.clear()
        result = fleet.run("models", "promote", "m:prod", "--to", "v2", "--settle", "0")
        line = one_line_error(result)
        assert said in line
        named = {"models": fleet.boxes[2].url, "unreachable": dead, "bad file": "workers.txt:6"}
        assert named.get(case, fleet.boxes[1].url) in line
        if case != "bad file":
            assert "nothing was changed" in line
        nothing_changed(fleet)


def test_a_worker_failing_mid_rollout_stops_it_and_the_report_says_what_is_where(
    tmp_path: Path,
) -> None:
    """Worker 2 cannot load v2 (its registry has it; the load fails): worker 1 is done, the
    rollout stops at worker 2's healthy step with its drain off again, worker 3 untouched."""
    with fleet_of(tmp_path, 3, broken={1: {2}}) as fleet:
        v1, v2 = fleet.versions["v1"], fleet.versions["v2"]
        first, failed, last = (box.url for box in fleet.boxes)
        fleet.events.clear()
        result = fleet.run("models", "promote", "m:prod", "--to", "v2", "--settle", "0",
                           "--timeout", "1.5s", "--json")  # fmt: skip
        assert result.exit_code == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and failed in errors[0] and "step 'healthy'" in errors[0]
        assert "drain is off again" in errors[0] and "Traceback" not in result.stderr
        assert f"done: {first} (at {v2})" in result.stderr
        assert f"not touched: {last}" in result.stderr
        report = json.loads(result.stdout)
        assert [w["state"] for w in report["workers"]] == ["done", "failed", "untouched"]
        assert report["ok"] is False and report["workers"][1]["step"] == "healthy"

        assert (fleet.boxes[0].chat().headers["x-edgellm-model-version"]) == v2
        assert fleet.boxes[1].chat().headers["x-edgellm-model-version"] == v1  # the old one
        assert fleet.boxes[2].target() == v1 and (2, "drain on") not in fleet.posts()
        assert not any(box.app.state.drain.maintenance for box in fleet.boxes)


# -- pull ------------------------------------------------------------------------------------


@contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Files of `root` over HTTP on a free loopback port (what the workers pull from)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_pull_puts_the_same_bytes_in_every_workers_registry(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    gguf = tiny_gguf(served / "m3.gguf", 3)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    with fleet_of(tmp_path, 2) as fleet, file_server(served) as base:
        pulled = fleet.run("models", "pull", f"{base}/m3.gguf", "--name", "m:v3",
                           "--sha256", digest, "--json")  # fmt: skip
        assert pulled.exit_code == 0, pulled.stderr
        assert [p["sha256"] for p in json.loads(pulled.stdout)] == [digest, digest]
        for box in fleet.boxes:
            with Registry.open(box.home) as registry:
                assert registry.resolve("m:v3").sha256 == digest
            assert box.target() == fleet.versions["v1"]  # serving did not change

        wrong = fleet.run("models", "pull", f"{base}/m3.gguf", "--name", "m:v4",
                          "--sha256", "0" * 64)  # fmt: skip
        line = one_line_error(wrong)
        assert fleet.boxes[0].url in line and "answered 400" in line and "--sha256" in line
        assert "pulled on: none" in line

        missing = fleet.run("models", "pull", f"{base}/nosuch.gguf", "--name", "m:v4")
        line = one_line_error(missing)
        assert "answered 502: the pull failed" in line and "404" in line
