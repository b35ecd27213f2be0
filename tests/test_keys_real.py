"""Acceptance: API keys against a real `edgellm serve` (the default model), its keys made with the
real `edgellm keys` command in a data directory of the test's own. Every route against every
key state, with the exact status and error body in each API's envelope; secrets only as
hashes in the database; file modes; keys made and revoked while it runs counting within a
second; the official `openai` and `ollama` clients reading the refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import EDGELLM, MODEL_ID, ServerProcess

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "Say hi."}]
ONE = {"num_predict": 1}
STATES = ["none", "unknown", "revoked", "expired", "user", "other", "metrics", "admin"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    body: dict[str, Any] | None = None
    model: bool = False  # names a model: a key scoped to another one gets 403
    listing: bool = False  # lists models: a key scoped to another one sees none

    @property
    def ollama(self) -> bool:
        return self.path.startswith("/api/")


ROUTES = [
    Route("GET", "/v1/models", listing=True),
    Route("GET", f"/v1/models/{MODEL_ID}", model=True),
    Route(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 1},
        model=True,
    ),
    Route(
        "POST", "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}, model=True
    ),
    Route("POST", "/v1/embeddings", {"model": MODEL_ID, "input": "hi"}, model=True),
    Route("GET", "/api/tags", listing=True),
    Route("GET", "/api/ps", listing=True),
    Route("GET", "/api/version"),
    Route("POST", "/api/show", {"model": MODEL_ID}, model=True),
    Route(
        "POST",
        "/api/chat",
        {"model": MODEL_ID, "messages": MESSAGES, "stream": False, "options": ONE},
        model=True,
    ),
    Route(
        "POST",
        "/api/generate",
        {"model": MODEL_ID, "prompt": "Hi", "stream": False, "options": ONE},
        model=True,
    ),
    Route("POST", "/api/embed", {"model": MODEL_ID, "input": "hi"}, model=True),
    Route("GET", "/metrics"),
    Route("GET", "/openapi.json"),
    Route("GET", "/"),
    Route("GET", "/health"),
    Route("GET", "/ready"),
]
OPEN = {"/", "/health", "/ready"}


def keys_cli(home: Path, *args: str) -> str:
    """The real `edgellm keys ...` in its own process; its stdout."""
    result = subprocess.run(
        [*EDGELLM, "keys", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGELLM_HOME": str(home)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def create(home: Path, name: str, *args: str) -> str:
    return str(json.loads(keys_cli(home, "create", "--name", name, *args, "--json"))["key"])


@dataclass
class Keyed:
    home: Path
    server: ServerProcess
    keys: dict[str, str]  # key state -> the key a request of that state sends ("" for none)


@pytest.fixture(scope="module")
def keyed(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    home = tmp_path_factory.mktemp("keys-home")
    keys = {
        "none": "",
        "unknown": "edg-" + "x" * 43,
        "revoked": create(home, "gone", "--role", "user"),
        "expired": create(home, "old", "--role", "user", "--expires", "2000-01-01"),
        "user": create(home, "alice", "--role", "user"),
        "other": create(home, "carol", "--role", "user", "--models", "another-model"),
        "metrics": create(home, "prom", "--role", "metrics"),
        "admin": create(home, "root", "--role", "admin"),
    }
    keys_cli(home, "revoke", "gone")
    server = ServerProcess("--ctx", "2048", "--parallel", "2", env={"EDGELLM_HOME": str(home)})
    yield Keyed(home, server, keys)
    server.stop()


def expected(state: str, route: Route) -> tuple[int, tuple[str, str, str | None, str] | None]:
    """The status, and the error (type, code, param, message) when it is one."""
    if route.path in OPEN or state == "admin":
        return 200, None
    if state in ("none", "unknown", "revoked", "expired"):
        message = {
            "none": "no API key: send Authorization: Bearer KEY or X-Api-Key: KEY",
            "expired": "the API key has expired",
        }.get(state, "the API key is not valid")
        code = "expired_api_key" if state == "expired" else "invalid_api_key"
        return 401, ("authentication_error", code, None, message)
    if state == "metrics":
        if route.path == "/metrics":
            return 200, None
        message = "this API key (role metrics) may only read /metrics"
        return 403, ("permission_error", "role_not_allowed", None, message)
    if route.path == "/metrics":  # a user key
        message = f"this API key (role user) may not read {route.path}"
        return 403, ("permission_error", "role_not_allowed", None, message)
    if state == "other" and route.model:
        message = f"this API key may not use the model '{MODEL_ID}'"
        return 403, ("permission_error", "model_not_allowed", "model", message)
    return 200, None


def envelope(route: Route, error: tuple[str, str, str | None, str]) -> dict[str, Any]:
    kind, code, param, message = error
    if route.ollama:
        return {"error": f"{param}: {message}" if param else message}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def test_every_route_against_every_key_state(keyed: Keyed) -> None:
    cells = []
    with httpx.Client(base_url=keyed.server.base, timeout=60) as http:
        for state in STATES:
            headers = {"Authorization": f"Bearer {keyed.keys[state]}"} if keyed.keys[state] else {}
            for route in ROUTES:
                r = http.request(route.method, route.path, json=route.body, headers=headers)
                status, error = expected(state, route)
                cells.append((state, route.path, r.status_code))
                assert r.status_code == status, (state, route.path, r.text)
                if error is not None:
                    assert r.json() == envelope(route, error), (state, route.path)
                if status == 401:
                    assert r.headers["www-authenticate"] == "Bearer"
                if state == "other" and route.listing:
                    assert r.json() in ({"object": "list", "data": []}, {"models": []})
                if route.path == "/ready":
                    shown = set(r.json())
                    assert shown == ({"status"} if state in STATES[:4] else {"status", "models"})
    assert len(cells) == len(STATES) * len(ROUTES)


def test_the_official_clients_read_the_refusals(keyed: Keyed) -> None:
    base = keyed.server.base

    def chat(key: str) -> Any:
        with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
            return client.chat.completions.create(
                model=MODEL_ID,
                messages=MESSAGES,
                max_tokens=2,  # type: ignore[arg-type]
            )

    with pytest.raises(openai.AuthenticationError, match="not valid") as unauthorized:
        chat(keyed.keys["revoked"])
    assert unauthorized.value.status_code == 401
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model") as denied:
        chat(keyed.keys["other"])
    assert denied.value.status_code == 403
    with pytest.raises(openai.PermissionDeniedError, match="role metrics"):
        chat(keyed.keys["metrics"])
    assert chat(keyed.keys["user"]).usage.completion_tokens == 2
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {keyed.keys['other']}"})
    try:
        with pytest.raises(ollama.ResponseError, match="may not use the model") as refused:
            client.chat(model=MODEL_ID, messages=MESSAGES, options=ONE)
        assert refused.value.status_code == 403
        assert client.list().models == []
    finally:
        client.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_holds_no_key_and_only_its_owner_reads_it(keyed: Keyed) -> None:
    files = sorted(keyed.home.glob("edgellm.db*"))
    assert keyed.home / "edgellm.db" in files and keyed.home / "edgellm.db-wal" in files
    raw = b"".join(path.read_bytes() for path in files)
    for state, key in keyed.keys.items():
        if key and state != "unknown":
            assert key.encode() not in raw and key[12:].encode() not in raw, state
    assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}
    assert mode(keyed.home) == 0o700


def test_start_up_says_auth_is_enforced_with_how_many_keys(keyed: Keyed) -> None:
    assert "auth: enforced (4 active keys)" in keyed.server.output()


def status_with(server: ServerProcess, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(server.base + "/v1/models", headers=headers, timeout=10).status_code


def test_a_key_made_or_revoked_while_serving_counts_within_a_second(keyed: Keyed) -> None:
    late = create(keyed.home, "late", "--role", "user")
    made = time.monotonic()
    while status_with(keyed.server, late) != 200:
        assert time.monotonic() - made < 1.0, "a new key was not taken within a second"
        time.sleep(0.02)
    keys_cli(keyed.home, "revoke", "late")
    revoked = time.monotonic()
    while status_with(keyed.server, late) != 401:
        assert time.monotonic() - revoked < 1.0, "a revoked key still worked after a second"
        time.sleep(0.02)
