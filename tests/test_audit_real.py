"""Acceptance: the audit log of a real `edgellm serve` (the default model), its keys made with the
real `edgellm keys` command in a data directory of the test's own. A mixed run (served by both
APIs and streamed, 400, 401, 403, 429, a client that disconnects mid-stream, listings,
/metrics) leaves exactly one record per request with the right fields, the output hashes
recomputed from what the client received; the real `edgellm audit verify` passes, then
finds each kind of tampering with the database file (sqlite3 UPDATE, DELETE, INSERT, a swap)
and names the record; without the key it cannot check and does not pass."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import EDGELLM, MODEL_ID, ServerProcess

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGELLM, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGELLM_HOME": str(home)},
        timeout=120,
    )


def create_key(home: Path, name: str, *args: str) -> str:
    made = cli(home, "keys", "create", "--name", name, *args, "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


@dataclass
class Run:
    home: Path
    keys: dict[str, str]
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> what we know
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> its record
    count: int = 0  # records in the database


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mixed_run(base: str, keys: dict[str, str], sent: dict[str, dict[str, Any]]) -> None:
    """Send the mix; note for each request id what its record must say."""

    def note(ident: str, status: int, key: str | None, **more: Any) -> None:
        sent[ident] = {"status": status, "key": key, **more}

    def bearer(name: str, ident: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}", "X-Request-Id": ident}

    with openai.OpenAI(base_url=base + "/v1", api_key=keys["alice"], max_retries=0) as client:
        answer = client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            extra_headers={"X-Request-Id": "served"},
        )
        note(
            "served",
            200,
            "alice",
            text=answer.choices[0].message.content or "",
            usage=answer.usage,
            finish=answer.choices[0].finish_reason,
        )
        received, finish = "", None
        chunks = client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            stream=True,
            extra_headers={"X-Request-Id": "streamed"},
        )
        for chunk in chunks:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        note("streamed", 200, "alice", text=received, finish=finish)
    with httpx.Client(base_url=base, timeout=120) as http:
        answer = http.post(
            "/api/generate",
            json={
                "model": MODEL_ID,
                "prompt": "Hi",
                "stream": False,
                "options": {"num_predict": 5},
            },
            headers=bearer("alice", "ollama"),
        )
        done = answer.json()
        note(
            "ollama", answer.status_code, "alice", text=done["response"], finish=done["done_reason"]
        )
        bad = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "temperature": 9}).encode()
        answer = http.post("/v1/chat/completions", content=bad, headers=bearer("alice", "invalid"))
        note("invalid", answer.status_code, "alice", body=bad, finish="error")
        body = json.dumps({"model": MODEL_ID, "messages": MESSAGES}).encode()
        answer = http.post(
            "/v1/chat/completions",
            content=body,
            headers={"Authorization": "Bearer edg-nope", "X-Request-Id": "unauthorized"},
        )
        note("unauthorized", answer.status_code, None, body=body, finish="error")
        answer = http.post(
            "/v1/chat/completions", content=body, headers=bearer("carol", "forbidden")
        )
        note("forbidden", answer.status_code, "carol", body=body, finish="error")
        for ident in ("limited-1", "limited-2"):
            answer = http.post(
                "/v1/completions",
                json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1},
                headers=bearer("slow", ident),
            )
            note(ident, answer.status_code, "slow")
        answer = http.get("/v1/models", headers=bearer("alice", "listing"))
        note("listing", answer.status_code, "alice")
        answer = http.get("/metrics", headers=bearer("prom", "metrics"))
        note("metrics", answer.status_code, "prom")
        long = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 400, "stream": True}
        long["stream_options"] = {"include_usage": False}
        long["ignore_eos"] = True
        got = ""
        with http.stream(
            "POST", "/v1/chat/completions", json=long, headers=bearer("alice", "gone")
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(got) > 5:
                    break  # leaving the block closes the connection mid-stream
        note("gone", 499, "alice", text=got, finish="abort")


@pytest.fixture(scope="module")
def run(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("audit-home")
    keys = {
        "alice": create_key(home, "alice", "--role", "user"),
        "carol": create_key(home, "carol", "--role", "user", "--models", "another-model"),
        "slow": create_key(home, "slow", "--role", "user", "--rpm", "1"),
        "prom": create_key(home, "prom", "--role", "metrics"),
    }
    server = ServerProcess(
        "--ctx", "2048", "--parallel", "2", "--audit-text", env={"EDGELLM_HOME": str(home)}
    )
    result = Run(home, keys)
    try:
        _mixed_run(server.base, keys, result.sent)
    finally:
        server.stop()  # the writer writes what it holds before the process exits
    conn = sqlite3.connect(home / "edgellm.db")
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq")]
    finally:
        conn.close()
    result.count = len(rows)
    result.records = {r["request_id"]: r for r in rows}
    yield result


def test_each_request_has_exactly_one_record(run: Run) -> None:
    assert run.count == len(run.sent) == len(run.records)
    assert set(run.records) == set(run.sent)


def test_records_say_who_what_and_how_it_ended(run: Run) -> None:
    roles = {"alice": "user", "carol": "user", "slow": "user", "prom": "metrics", None: None}
    assert run.sent["limited-1"]["status"] == 200 and run.sent["limited-2"]["status"] == 429
    for ident, sent in run.sent.items():
        record = run.records[ident]
        assert record["status"] == sent["status"], ident
        assert (record["key_name"], record["role"]) == (sent["key"], roles[sent["key"]]), ident
        assert record["client"].startswith("127.0.0.1:"), ident
        assert record["time"].endswith("Z") and record["e2e_s"] > 0, ident
        if "finish" in sent:
            assert record["finish_reason"] == sent["finish"], ident
    assert {i: run.records[i]["status"] for i in ("invalid", "unauthorized", "forbidden")} == {
        "invalid": 400,
        "unauthorized": 401,
        "forbidden": 403,
    }
    assert run.records["limited-2"]["error"] == "rate_limit_exceeded"
    assert run.records["metrics"]["api"] is None and run.records["listing"]["api"] == "openai"
    assert run.records["ollama"]["api"] == "ollama"
    served = run.records["served"]
    assert (served["model"], served["route"], served["method"]) == (
        MODEL_ID,
        "/v1/chat/completions",
        "POST",
    )
    assert len(served["version"]) == 12
    usage = run.sent["served"]["usage"]
    assert (served["prompt_tokens"], served["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert served["cached_tokens"] == usage.prompt_tokens_details.cached_tokens
    assert 0 < served["ttft_s"] <= served["e2e_s"]


def test_hashes_match_what_was_sent_and_received(run: Run) -> None:
    for ident in ("served", "streamed", "ollama"):
        record = run.records[ident]
        assert record["output_sha256"] == _sha256(run.sent[ident]["text"]), ident
        assert record["output_text"] == run.sent[ident]["text"], ident  # --audit-text
        assert record["input_kind"] == "prompt" and len(record["input_sha256"]) == 64
        assert json.loads(record["prompt_text"])  # the prompt as given
    for ident in ("invalid", "unauthorized", "forbidden"):  # refused before the prompt was made
        record = run.records[ident]
        assert record["input_kind"] == "body", ident
        assert record["input_sha256"] == hashlib.sha256(run.sent[ident]["body"]).hexdigest()
        assert record["output_sha256"] is None
    gone = run.records["gone"]  # the server sent more than the client read before it left
    assert gone["output_text"].startswith(run.sent["gone"]["text"])
    assert gone["output_sha256"] == _sha256(gone["output_text"])
    assert 0 < gone["completion_tokens"] < 400
    assert run.records["served"]["input_sha256"] == run.records["streamed"]["input_sha256"]


def _copy(run: Run, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.db"
    shutil.copy(run.home / "edgellm.db", copy)
    return copy


def verify(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(run.home, "audit", "verify", *args)


def test_verify_passes_and_finds_each_tampering_naming_the_record(run: Run, tmp_path: Path) -> None:
    intact = verify(run)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert f"records 1 to {run.count} ({run.count})" in intact.stdout
    seq = {ident: record["seq"] for ident, record in run.records.items()}
    middle = seq["forbidden"]
    tamperings = {
        "changed": (f"UPDATE audit_log SET status = 200 WHERE seq = {middle}", middle),
        "deleted": (f"DELETE FROM audit_log WHERE seq = {middle}", middle),
        "inserted": (
            "INSERT INTO audit_log SELECT seq + 1000, time, 'forged', key_name, role, client, "
            "api, route, method, model, version, status, finish_reason, error, prompt_tokens, "
            "cached_tokens, completion_tokens, ttft_s, e2e_s, input_sha256, input_kind, "
            "output_sha256, prompt_text, output_text, prev_mac, mac FROM audit_log "
            f"WHERE seq = {run.count}",
            run.count + 1000,
        ),
        "reordered": (
            "UPDATE audit_log SET seq = -1 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE "
            "seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = -1",
            2,
        ),
    }
    for kind, (sql, named) in tamperings.items():
        copy = _copy(run, tmp_path)
        conn = sqlite3.connect(copy)
        conn.executescript(sql)
        conn.close()
        found = verify(run, "--db", str(copy), "--json")
        assert found.returncode == 3, (kind, found.stdout, found.stderr)
        problem = json.loads(found.stdout)["problem"]
        assert (problem["seq"], problem["kind"]) == (named, kind), problem
        said = verify(run, "--db", str(copy))
        assert said.returncode == 3 and f"record {named}" in said.stdout, said.stdout
        copy.unlink()


def test_verify_without_the_key_cannot_check(run: Run, tmp_path: Path) -> None:
    missing = verify(run, "--key", str(tmp_path / "no.key"))
    assert missing.returncode == 1
    assert "cannot check the audit log" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
