"""The model lifecycle with the real thing: `edgellm serve` on registry models of the real
default model, the official openai client, and the registry moved by the real CLI.

1. Hot swap: 8 streams for 60 s while the tag is promoted twice and rolled back once.
2. Memory: three models with a budget for two, measured as the server's resident growth.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import EDGELLM, ServerProcess
from tests.gguf_tools import copy_with_metadata

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Path]:
    """A registry holding m:v1 (the default model), m:v2 and m:v3 (copies under other names:
    the same weights, other bytes, so other versions)."""
    place = tmp_path_factory.mktemp("lifecycle")
    env = {**os.environ, "EDGELLM_HOME": str(place / "home")}
    files = [model_path]
    for n in (2, 3):
        files.append(copy_with_metadata(model_path, place / f"v{n}.gguf",
                                        {"general.name": f"SmolLM2 copy {n}"}))  # fmt: skip
    for n, path in enumerate(files, 1):
        cli(env, "models", "add", str(path), "--name", f"m:v{n}", "--link")
    cli(env, "models", "tag", "m:v1", "m:prod")
    yield place


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*EDGELLM, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def env_of(home: Path) -> dict[str, str]:
    return {**os.environ, "EDGELLM_HOME": str(home / "home")}


def short(env: dict[str, str], ref: str) -> str:
    shown = json.loads(cli(env, "models", "show", ref, "--json"))
    return str(shown["version"])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_hot_swap_under_8_streams_fails_nothing(home: Path) -> None:
    env = env_of(home)
    versions = {n: short(env, f"m:v{n}") for n in (1, 2, 3)}
    server = ServerProcess("m:prod", "--ctx", "2048", "--parallel", "8", env=env)
    try:
        results, moves = asyncio.run(_load_while_moving(server, env))
        swaps = httpx.get(server.base + "/ready", timeout=5).json()["models"]["m:prod"]["swaps"]
        loaded = httpx.get(server.base + "/ready", timeout=5).json()["loaded"]
        log = server.output()
    finally:
        server.stop()
    failed = [r for r in results if r["error"]]
    assert failed == [], failed[:3]
    assert len(results) > 100
    # the tag's target over time: v1, then v2, v3 and back to v2 as each flip happened
    flips = [(s["at"], s["to"]) for s in swaps]
    assert [to for _, to in flips] == [versions[2], versions[3], versions[2]]
    for r in results:
        target = versions[1]
        for at, to in flips:
            if r["sent"] > at + 0.25:  # sent well after the flip: the new target
                target = to
            elif r["sent"] > at - 0.25:
                target = r["version"]  # at the flip itself: either is right
        assert r["version"] == target, r
        assert r["fingerprints"] == {r["version"]}  # every chunk names the same version
    assert all(s["switch_ms"] < 500 for s in swaps)
    # each old version was unloaded after its last request: only the last target stays
    assert [i["version"] for i in loaded] == [versions[2]]
    assert log.count("no longer served") == 3
    report = {
        "requests": len(results),
        "failed": len(failed),
        "ready_to_switch_ms": [s["switch_ms"] for s in swaps],
        "load_s": [s["load_s"] for s in swaps],
        "command_to_first_response_s": [
            round(
                min(r["done"] for r in results if r["version"] == to and r["sent"] > start) - start,
                3,
            )
            for start, to in moves
        ],
    }
    print("hot swap:", json.dumps(report))


async def _load_while_moving(
    server: ServerProcess, env: dict[str, str]
) -> tuple[list[dict[str, object]], list[tuple[float, str]]]:
    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    results: list[dict[str, object]] = []
    start = time.time()
    stop = start + 60

    async def stream_until_stop() -> None:
        while time.time() < stop:
            sent = time.time()
            record: dict[str, object] = {"sent": sent, "error": None}
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m:prod",
                    messages=[{"role": "user", "content": "Count from one to ten."}],
                    max_tokens=24,
                    stream=True,
                )
                record["version"] = raw.headers.get("x-edgellm-model-version")
                fingerprints = set()
                async for chunk in raw.parse():
                    fingerprints.add(chunk.system_fingerprint)
                    assert chunk.model == "m:prod"  # the name stays the tag
                record["fingerprints"] = fingerprints
            except Exception as exc:  # counted: the test asserts there are none
                record["error"] = repr(exc)
            record["done"] = time.time()
            results.append(record)

    async def move(at: float, *args: str) -> tuple[float, str]:
        await asyncio.sleep(max(0.0, start + at - time.time()))
        began = time.time()
        proc = await asyncio.create_subprocess_exec(
            *EDGELLM, "models", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return began, err.decode()

    workers = [asyncio.create_task(stream_until_stop()) for _ in range(8)]
    moved = [
        await move(12, "promote", "m:prod", "--to", "m:v2"),
        await move(27, "promote", "m:prod", "--to", "v3"),
        await move(42, "rollback", "m:prod"),
    ]
    await asyncio.gather(*workers)
    await client.close()
    targets = [short(env, "m:v2"), short(env, "m:v3"), short(env, "m:v2")]
    return results, [(began, to) for (began, _), to in zip(moved, targets, strict=True)]


def test_three_models_in_a_budget_for_two(home: Path) -> None:
    env = env_of(home)
    names = ["m:v1", "m:v2", "m:v3"]
    budget = 700 * 2**20  # each is estimated ~290 MiB at this context: two fit, three do not
    server = ServerProcess(*names, "--ctx", "2048", "--max-memory", "700M", env=env)
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    try:
        baseline = rss(server.proc.pid)

        def ask(name: str, tokens: int = 4) -> None:
            answer = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=tokens
            )
            assert answer.model == name

        def loaded() -> list[str]:
            ps = httpx.get(server.base + "/api/ps", timeout=5).json()["models"]
            return sorted(p["name"] for p in ps)

        peak = 0
        for name in ["m:v1", "m:v2", "m:v3", "m:v1", "m:v2", "m:v3"]:
            ask(name)
            peak = max(peak, rss(server.proc.pid) - baseline)
            assert len(loaded()) <= 2
        # v1 v2 | v3 evicts v1 (least recent) | v1 evicts v2 | v2 evicts v3 | v3 evicts v1
        assert loaded() == ["m:v2", "m:v3"]
        assert peak <= budget, f"resident growth {peak} > budget {budget}"

        # a stream on v2 keeps it loaded while v1 needs room: v3 (idle) goes instead
        stream = client.chat.completions.create(
            model="m:v2",
            messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = iter(stream)
        next(pieces)
        ask("m:v1")
        assert loaded() == ["m:v1", "m:v2"]
        assert sum(1 for _ in pieces) > 100  # the stream ran to its end
        metrics = httpx.get(server.base + "/metrics", timeout=5).text
        assert "edgellm_model_memory_budget_bytes 7.340032e+08" in metrics
        assert metrics.count("edgellm_model_memory_bytes{") == 2
        describe = httpx.get(server.base + "/ready", timeout=5).json()
        print("memory:", json.dumps({"peak_growth_bytes": peak, "budget_bytes": budget,
                                     "loaded": describe["loaded"]}))  # fmt: skip
    finally:
        client.close()
        server.stop()


def test_a_model_over_the_budget_is_refused_in_one_line(home: Path) -> None:
    done = subprocess.run(
        [*EDGELLM, "serve", "m:v1", "m:v2", "--max-memory", "100M"],
        env=env_of(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "more than --max-memory" in lines[0], done.stderr
