"""The model table's lifecycle in process: loading on demand, keep_alive, the budget and LRU
unloading, hot swap under load, canary buckets and stickiness, mirroring, the SLO fallback.
Real table, pipeline and app; versions load as scripted models (tests/lifecycle_fakes.py)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgellm.errors import ModelFileError, ValidationError
from edgellm.server.lifecycle import Policy
from edgellm.server.lifecycle.compare import histogram_quantile, summarize
from edgellm.server.lifecycle.keep_alive import parse_keep_alive
from edgellm.server.lifecycle.memory import parse_size
from edgellm.server.lifecycle.routing import Fallback
from tests.lifecycle_fakes import MIB, ScriptedRegistry, live_server, version

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def registry(*refs: tuple[str, int]) -> ScriptedRegistry:
    reg = ScriptedRegistry()
    for ref, n in refs:
        reg.point(ref, target=version(n, ref.split(":")[0]))
    return reg


async def test_a_model_loads_on_its_first_request_and_keep_alive_0_unloads_it() -> None:
    reg = registry(("a:prod", 1), ("b:prod", 2))
    async with live_server(reg, ["a:prod", "b:prod"]) as srv:
        tags = (await srv.client.get("/api/tags")).json()["models"]
        assert [t["name"] for t in tags] == ["a:prod", "b:prod"]  # listed, not loaded
        assert (await srv.client.get("/api/ps")).json()["models"] == []
        ready = await srv.client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["models"]["a:prod"]["status"] == "unloaded"

        r = await srv.chat("a:prod")
        assert r.status_code == 200, r.text
        assert r.headers["x-edgellm-model-version"] == version(1).short
        assert r.json()["system_fingerprint"] == version(1).short
        assert r.json()["model"] == "a:prod"
        ps = (await srv.client.get("/api/ps")).json()["models"]
        assert [p["name"] for p in ps] == ["a:prod"]
        assert ps[0]["size"] == reg.estimate  # the estimate: more than the growth measured

        unload = await srv.client.post("/api/generate", json={"model": "a:prod", "keep_alive": 0})
        assert unload.json()["done_reason"] == "unload"
        await srv.until(lambda: not srv.table.loaded())
        assert (await srv.chat("a:prod")).status_code == 200  # loads again
        assert reg.loads == [1, 1]


async def test_keep_alive_expires_an_idle_model() -> None:
    reg = registry(("a:prod", 1), ("b:prod", 2))
    async with live_server(reg, ["a:prod", "b:prod"], policy=Policy(poll_s=0.05)) as srv:
        body = {"model": "a:prod", "prompt": "hi", "stream": False, "keep_alive": "1s"}
        r = await srv.client.post("/api/generate", json=body)
        assert r.status_code == 200, r.text
        ps = (await srv.client.get("/api/ps")).json()["models"]
        assert ps and ps[0]["expires_at"] < "9999"
        await srv.until(lambda: not srv.table.loaded(), timeout=5)


async def test_three_models_with_room_for_two_unload_the_least_recently_used() -> None:
    reg = registry(("a:x", 1), ("b:x", 2), ("c:x", 3))
    policy = Policy(max_memory=250 * MIB, poll_s=0.05)  # each is charged 100 MiB
    async with live_server(reg, ["a:x", "b:x", "c:x"], policy=policy) as srv:
        for name in ["a:x", "b:x", "a:x", "c:x", "a:x", "b:x"]:
            r = await srv.chat(name)
            assert r.status_code == 200, r.text
            assert srv.table.used_bytes() <= 250 * MIB
            assert len(srv.table.loaded()) <= 2
        # a, b, a, c (b was least recent: unloaded), a, b (c unloaded)
        assert reg.loads == [1, 2, 3, 2]


async def test_a_model_with_a_running_stream_is_not_unloaded() -> None:
    reg = registry(("a:x", 1), ("b:x", 2), ("c:x", 3))
    reg.step_s[1] = 0.05
    async with live_server(reg, ["a:x", "b:x", "c:x"], policy=Policy(max_models=2)) as srv:
        assert (await srv.chat("b:x")).status_code == 200
        long = asyncio.create_task(srv.chat("a:x", max_tokens=40))  # ~2 s of steps
        await srv.until(lambda: any(i.in_flight for i in srv.table.loaded()))
        r = await srv.chat("c:x")  # b is idle: b goes, a stays
        assert r.status_code == 200, r.text
        assert (await long).status_code == 200
        assert reg.loads == [2, 1, 3]


async def test_a_model_larger_than_the_budget_is_refused_at_start() -> None:
    reg = registry(("a:x", 1))
    reg.estimate = 1000 * MIB
    with pytest.raises(Exception, match="more than --max-memory"):
        async with live_server(reg, ["a:x"], policy=Policy(max_memory=500 * MIB)):
            pass


async def test_a_swap_to_a_version_over_the_budget_is_refused_and_the_old_one_serves() -> None:
    reg = registry(("m:prod", 1))
    reg.sizes[2] = 900 * MIB
    async with live_server(
        reg, ["m:prod"], policy=Policy(max_memory=500 * MIB, poll_s=0.05)
    ) as srv:
        assert (await srv.chat("m:prod")).status_code == 200
        reg.point("m:prod", target=version(2))
        await srv.until(lambda: srv.table.slots()[0].problem is not None)
        ready = (await srv.client.get("/ready")).json()["models"]["m:prod"]
        assert "more than the memory budget" in ready["problem"]
        r = await srv.chat("m:prod")
        assert r.status_code == 200 and r.headers["x-edgellm-model-version"] == version(1).short
        reg.point("m:prod", target=version(3))  # a later move that fits is taken
        await srv.until(lambda: srv.table.slots()[0].target == "v3")
        assert (await srv.chat("m:prod")).headers["x-edgellm-model-version"] == version(3).short


async def test_hot_swap_under_load_fails_nothing_and_unloads_the_old_version() -> None:
    reg = registry(("m:prod", 1))
    reg.step_s[1] = reg.step_s[2] = 0.01
    reg.load_s = 0.3
    async with live_server(reg, ["m:prod"], preload=["m:prod"]) as srv:
        await srv.until(lambda: any(i.state == "ready" for i in srv.table.loaded()))
        seen: list[tuple[float, str]] = []
        failures = []
        stop = time.monotonic() + 3.0

        async def stream_forever() -> None:
            while time.monotonic() < stop:
                admitted = time.monotonic()
                r = await srv.chat("m:prod", max_tokens=8, stream=True)
                if r.status_code != 200 or "error" in r.text:
                    failures.append(r.text)
                seen.append((admitted, r.headers.get("x-edgellm-model-version", "")))

        workers = [asyncio.create_task(stream_forever()) for _ in range(8)]
        await asyncio.sleep(0.5)
        reg.point("m:prod", target=version(2))
        await srv.until(lambda: srv.table.slots()[0].target == "v2")
        flipped = time.monotonic()
        await asyncio.gather(*workers)
        assert failures == []
        swap = srv.table.slots()[0].swaps[-1]
        assert swap["to"] == version(2).short and swap["switch_ms"] < 500
        # admitted well after the flip: the new version; the old one is gone
        assert {v for t, v in seen if t > flipped + 0.1} == {version(2).short}
        assert {v for _, v in seen} == {version(1).short, version(2).short}
        await srv.until(lambda: [i.version for i in srv.table.loaded()] == [version(2).short])


async def test_canary_share_is_within_binomial_bounds_and_conversations_stick() -> None:
    reg = registry(("m:prod", 1))
    reg.point("m:prod", candidate=version(2), weight=20.0)
    async with live_server(reg, ["m:prod"]) as srv:
        n, to_candidate = 500, 0
        for i in range(n):
            first = await srv.chat("m:prod", messages=[{"role": "user", "content": f"q{i}"}])
            chosen = first.headers["x-edgellm-model-version"]
            assert first.headers["x-edgellm-route"] == (
                "canary" if chosen == version(2).short else "primary"
            )
            to_candidate += chosen == version(2).short
            if i % 50 == 0:  # later turns of the same conversation: the same version
                turns = [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "more"},
                ]
                again = await srv.chat("m:prod", messages=turns)
                assert again.headers["x-edgellm-model-version"] == chosen
        # 99.9% two-sided normal bound of a binomial(500, 0.2): 100 +- 3.29 * sqrt(80)
        half = 3.29 * math.sqrt(n * 0.2 * 0.8)
        assert n * 0.2 - half <= to_candidate <= n * 0.2 + half
        by_user = {
            (
                await srv.chat("m:prod", user="alice", messages=[{"role": "user", "content": q}])
            ).headers["x-edgellm-model-version"]
            for q in ("one", "two", "three", "four")
        }
        assert len(by_user) == 1  # one user, one version, whatever the messages


async def test_mirroring_copies_every_request_without_changing_answers() -> None:
    reg = registry(("m:prod", 1))
    async with live_server(reg, ["m:prod"]) as srv:
        plain = [(await srv.chat("m:prod", seed=i)).json()["choices"] for i in range(10)]
        reg.point("m:prod", candidate=version(2), mirror=100.0)
        await srv.until(lambda: srv.table.slots()[0].deployment.mirror == 100.0)
        mirrored = [(await srv.chat("m:prod", seed=i)).json()["choices"] for i in range(10)]
        assert mirrored == plain
        await srv.until(lambda: srv.table.slots()[0].shadows == 0)
        client = [r for r in srv.records if r.api == "openai"]
        assert {r.version for r in client} == {version(1).short}
        assert len(client) == 20
        families = {
            f.name: f
            for f in text_string_to_metric_families((await srv.client.get("/metrics")).text)
        }
        counts: dict[tuple[str, str], float] = {}
        for sample in families["edgellm_requests"].samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["version"], sample.labels["api"])
                counts[key] = counts.get(key, 0) + sample.value
        # the candidate took a copy of each of the 10 mirrored requests: as many as the primary
        assert counts[(version(2).short, "mirror")] == 10
        assert counts[(version(1).short, "openai")] == 20
        agreement = {
            s.labels["result"]: s.value
            for s in families["edgellm_mirror_requests"].samples
            if s.name.endswith("_total")
        }
        assert agreement == {"match": 10.0}  # the same scripted model: the same answers


async def test_fallback_takes_traffic_when_the_primary_is_slow_and_gives_it_back() -> None:
    reg = registry(("m:prod", 1))
    reg.point("m:prod", fallback=version(2), ttft_p99_s=0.15, window_s=1.0)
    async with live_server(reg, ["m:prod"], policy=Policy(poll_s=0.05)) as srv:
        routes: list[str] = []

        async def send(n: int) -> None:
            for _ in range(n):
                r = await srv.chat("m:prod", max_tokens=2)
                assert r.status_code == 200, r.text
                routes.append(r.headers["x-edgellm-route"])
                await asyncio.sleep(0.02)

        await send(8)
        assert set(routes) == {"primary"}
        reg.runners[1].step_s = 0.3  # the primary slows down: TTFT ~0.3 s > 0.15
        routes.clear()
        await send(12)
        assert "fallback" in routes
        first = routes.index("fallback")
        assert set(routes[first:]) == {"fallback"}  # no flapping while it is slow
        metrics = (await srv.client.get("/metrics")).text
        assert 'edgellm_fallback_active{model="m:prod"} 1.0' in metrics
        reg.runners[1].step_s = 0.0  # recovered: probes see it under 80% for a window
        routes.clear()
        for _ in range(200):
            await send(1)
            if routes[-1] == "primary":
                break
        assert routes[-1] == "primary"
        back = routes.index("primary")
        assert set(routes[:back]) == {"fallback"}
        assert srv.table.slots()[0].fallback.transitions == 2
        metrics = (await srv.client.get("/metrics")).text
        assert 'edgellm_fallback_active{model="m:prod"} 0.0' in metrics
        assert 'edgellm_fallback_transitions_total{model="m:prod"} 2.0' in metrics


def test_fallback_hysteresis_does_not_flap() -> None:
    fb = Fallback(objective_s=1.0, window_s=10.0)
    for t in range(5):
        fb.add(2.0, now=t)
    assert fb.update(now=5) and fb.active
    for t in range(6, 14):  # fast again, but not yet for a whole window
        fb.add(0.5, now=t)
        assert not fb.update(now=t)
    fb.add(0.9, now=16)  # under the objective but over 80% of it: stays on
    assert not fb.update(now=16) and fb.active
    for t in range(27, 33):
        fb.add(0.5, now=t)
    assert fb.update(now=33) and not fb.active


def test_sizes_and_keep_alive_parse_as_peers_write_them() -> None:
    assert parse_size("8G") == 8 * 2**30
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive(None) is None
    for bad in ("", "lots", "-"):
        with pytest.raises(ValidationError, match="not a size"):
            parse_size(bad)
    with pytest.raises(ValidationError, match="not a duration"):
        parse_keep_alive("soon")


def test_several_model_arguments_and_the_models_table_name_what_is_served(tmp_path: Path) -> None:
    from edgellm.cli.serve import settings_from_cli

    _, _, models = settings_from_cli(["a:prod", "b:q4"], None, {})
    assert models.names == ["a:prod", "b:q4"]
    config = tmp_path / "edgellm.toml"
    config.write_text('[models]\nnames = ["a:prod"]\nmax_memory = "6G"\nmodel_keep_alive = "1m"\n')
    server, _, models = settings_from_cli(None, config, {})
    assert (models.names, models.max_memory, models.model_keep_alive) == (["a:prod"], "6G", "1m")
    assert server.model is None
    with pytest.raises(ValidationError, match="not a size"):
        settings_from_cli(None, None, {"max_memory": "lots"})
    with pytest.raises(ValidationError, match="not a duration"):
        settings_from_cli(None, None, {"model_keep_alive": "soon"})


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--all"], "no tagged model to serve"),
        (["nothing:here", "other:one"], "nothing"),
        (["m:x", "--model-id", "y"], "--model-id"),
        (["--max-memory", "12 parsecs"], "not a size"),
    ],
)
def test_serve_refuses_bad_model_arguments_in_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    env = {**os.environ, "EDGELLM_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "edgellm.cli", "serve", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


async def test_keep_alive_0_without_input_unloads_without_loading() -> None:
    reg = registry(("a:prod", 1), ("b:prod", 2))
    async with live_server(reg, ["a:prod", "b:prod"]) as srv:
        r = await srv.client.post("/api/generate", json={"model": "a:prod", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"
        assert reg.loads == []


async def test_a_failed_swap_in_place_leaves_the_old_version_serving() -> None:
    reg = registry(("a:prod", 1))
    async with live_server(reg, ["a:prod"], policy=Policy(max_models=1, poll_s=0.05)) as srv:
        assert (await srv.chat("a:prod")).status_code == 200
        prepare = reg.prepare

        def broken_v2(v: Any, model_id: str) -> Any:
            prepared = prepare(v, model_id)
            if v.id == 2:
                prepared.model.engine._load = _raise_bad_blob
            return prepared

        reg.prepare = broken_v2  # type: ignore[method-assign]
        reg.point("a:prod", target=version(2, "a"))
        await srv.until(lambda: srv.table.slot("a:prod").failed is not None, timeout=5)
        r = await srv.chat("a:prod")
        assert r.status_code == 200, r.text
        assert r.headers["x-edgellm-model-version"] == version(1).short
        ready = (await srv.client.get("/ready")).json()["models"]["a:prod"]
        assert "bad blob" in ready["problem"]


def _raise_bad_blob() -> Any:
    raise ModelFileError("bad blob")


async def test_a_canary_that_cannot_load_sends_its_conversations_to_the_primary() -> None:
    reg = registry(("a:prod", 1))
    reg.sizes[2] = 900 * MIB
    reg.point("a:prod", candidate=version(2, "a"), weight=100.0)
    async with live_server(reg, ["a:prod"], policy=Policy(max_memory=500 * MIB)) as srv:
        for _ in range(3):
            r = await srv.chat("a:prod")
            assert r.status_code == 200, r.text
            assert r.headers["x-edgellm-route"] == "primary"


async def test_compare_summarizes_each_version_from_the_metrics() -> None:
    reg = registry(("m:prod", 1))
    reg.point("m:prod", candidate=version(2), weight=50.0, mirror=100.0)
    async with live_server(reg, ["m:prod"]) as srv:
        for i in range(40):
            r = await srv.chat("m:prod", seed=i, messages=[{"role": "user", "content": f"q{i}"}])
            assert r.status_code == 200
        await srv.until(lambda: srv.table.slots()[0].shadows == 0)
        exposition = (await srv.client.get("/metrics")).text
    routed = {
        v: sum(r.version == v for r in srv.records) for v in (version(1).short, version(2).short)
    }
    summaries = {s.version: s for s in summarize(exposition, "m:prod")}
    primary, candidate = summaries[version(1).short], summaries[version(2).short]
    assert primary.requests == routed[version(1).short]
    assert candidate.requests == routed[version(2).short]
    assert candidate.mirrored == primary.requests  # every primary request copied to it
    assert candidate.agreement == 1.0 and primary.agreement is None
    for s in (primary, candidate):
        p50, p99 = s.quantile("ttft", 0.5), s.quantile("ttft", 0.99)
        assert p50 is not None and p99 is not None and 0 < p50 <= p99
        assert s.tokens_per_s and s.tokens_per_s > 0 and s.errors == 0


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (10 / 20))
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, {1.0: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {1.0: 1.0, math.inf: 5.0}) == 1.0  # past the last bound


def test_compare_against_no_server_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgellm.cli", "models", "compare", "m:prod", "--url",
         "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0], done.stderr


async def test_a_tag_removed_and_made_again_is_served_again() -> None:
    reg = registry(("a:prod", 1), ("b:prod", 2))
    async with live_server(reg, ["a:prod", "b:prod"]) as srv:
        assert (await srv.chat("a:prod")).status_code == 200
        del reg.tags["a:prod"]  # models rm a:prod
        await srv.until(lambda: [s.model_id for s in srv.table.slots()] == ["b:prod"])
        assert (await srv.chat("a:prod")).status_code == 404
        await srv.until(lambda: not any(i.version == version(1).short for i in srv.table.loaded()))
        reg.point("a:prod", target=version(3, "a"))  # models tag ... a:prod
        await srv.until(lambda: len(srv.table.slots()) == 2)
        r = await srv.chat("a:prod")
        assert r.status_code == 200 and r.headers["x-edgellm-model-version"] == version(3).short


def test_embeddings_take_turns_with_the_engines() -> None:
    from edgellm.engine.turns import StepTurns
    from tests.inprocess import TextRunner, scripted_model

    class Counting(StepTurns):
        taken = 0

        def turn(self):  # type: ignore[no-untyped-def]
            Counting.taken += 1
            return super().turn()

    model = scripted_model(TextRunner())
    model.turns = Counting()
    model.engine.start(asyncio.new_event_loop())
    try:
        model.engine.wait_loaded()
        vectors, _ = model._embed(["one", "two"], False, "input", threading.Event())
    finally:
        model.engine.shutdown()
    assert len(vectors) == 2 and Counting.taken == 2
