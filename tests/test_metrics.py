"""GET /metrics, in-process: real traffic on both APIs, then the exposition parsed with
prometheus-client's own parser; counters move by exactly what happened."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, VERSION, ScriptedServer, TextRunner, scripted_server

pytestmark = pytest.mark.anyio

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def _scrape(srv: ScriptedServer) -> Samples:
    response = await srv.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of `name` with exactly these labels (the served model's version added to
    per-model series of the served model)."""
    if (
        labels.get("model") == MODEL
        and "version" not in labels
        and not name.startswith(
            (
                "edgellm_engine_up",
                "edgellm_requests_running",
                "edgellm_requests_waiting",
                "edgellm_kv",
            )
        )
    ):
        labels = {**labels, "version": VERSION}
    return samples[name].get(tuple(sorted(labels.items())), 0.0)


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include these."""
    return sum(
        value
        for key, value in samples[name].items()
        if all((k, v) in key for k, v in labels.items())
    )


async def test_counters_follow_real_traffic() -> None:
    runner = TextRunner(n_ctx=2048, seq_cells=512)
    async with scripted_server(runner=runner) as srv:
        usage: list[dict[str, Any]] = []
        for stream in (False, True):
            r = await srv.chat(max_tokens=5, stream=stream, stream_options={"include_usage": True})
            assert r.status_code == 200
        r = await srv.chat(max_tokens=5)
        usage.append(r.json()["usage"])  # the same prompt again: its prefix is cached
        generate = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
        ollama = (await srv.client.post("/api/generate", json=generate)).json()
        too_long = await srv.chat(messages=[{"role": "user", "content": "x" * 2000}])
        assert too_long.status_code == 400
        assert (await srv.chat(temperature=5)).status_code == 400  # refused by the wire model
        assert (await srv.chat(model="nope")).status_code == 404
        assert (await srv.client.get("/v1/nothing")).status_code == 404  # not a generation
        samples = await _scrape(srv)
    ok = _value(samples, "edgellm_requests_total", model=MODEL, api="openai", status="200")
    assert ok == 3
    assert _value(samples, "edgellm_requests_total", model=MODEL, api="ollama", status="200") == 1
    assert _value(samples, "edgellm_requests_total", model=MODEL, api="openai", status="400") == 1
    unknown = {"model": "unknown", "version": "", "api": "openai"}
    assert _value(samples, "edgellm_requests_total", **unknown, status="400") == 1
    assert _value(samples, "edgellm_requests_total", **unknown, status="404") == 1
    assert _value(samples, "edgellm_requests_rejected_total", reason="invalid") == 2
    assert _value(samples, "edgellm_requests_rejected_total", reason="not_found") == 2
    assert _value(samples, "edgellm_model_loaded", model=MODEL) == 1
    length = _value(samples, "edgellm_requests_finished_total", model=MODEL, finish_reason="length")
    assert length == 4
    generated = _value(samples, "edgellm_generation_tokens_total", model=MODEL)
    assert generated == 5 * 3 + ollama["eval_count"]
    records = srv.records
    assert _value(samples, "edgellm_prompt_tokens_total", model=MODEL) == sum(
        r.prompt_tokens for r in records if r.submitted is not None
    )
    assert (
        _value(samples, "edgellm_prompt_tokens_cached_total", model=MODEL)
        >= usage[0]["prompt_tokens_details"]["cached_tokens"]
        > 0
    )
    assert _value(samples, "edgellm_time_to_first_token_seconds_count", model=MODEL) == 4
    assert _value(samples, "edgellm_e2e_request_latency_seconds_count", model=MODEL) == 4
    assert _value(samples, "edgellm_request_generation_tokens_count", model=MODEL) == 4
    assert _value(samples, "edgellm_request_queue_time_seconds_count", model=MODEL) == 4
    gaps = sum(r.completion_tokens - 1 for r in records if r.completion_tokens)
    assert _value(samples, "edgellm_inter_token_latency_seconds_count", model=MODEL) == gaps
    assert _total(samples, "process_resident_memory_bytes") > 0
    assert _value(samples, "edgellm_engine_up", model=MODEL) == 1
    assert _value(samples, "edgellm_requests_running", model=MODEL) == 0


async def test_queue_rejections_and_dead_engines_show() -> None:
    runner = TextRunner(n_ctx=1024, seq_cells=1024, step_s=0.02)
    async with scripted_server(runner=runner, parallel=1, max_queue=0) as srv:
        first = asyncio.create_task(srv.chat(max_tokens=60))
        await asyncio.to_thread(runner.stepping.wait, 10)
        assert (await srv.chat()).status_code == 503
        running = await _scrape(srv)
        assert (await first).status_code == 200
        while srv.model.engine.engine.has_work():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # and the last step (it frees the finished request) is over
        runner.fail_with = RuntimeError("broken")
        broken = await srv.chat()
        assert broken.status_code == 500, broken.text
        after = await _scrape(srv)
    assert _value(running, "edgellm_requests_running", model=MODEL) == 1
    assert _value(after, "edgellm_requests_total", model=MODEL, api="openai", status="503") == 1
    assert _value(after, "edgellm_requests_rejected_total", reason="queue_full") == 1
    assert _value(after, "edgellm_requests_total", model=MODEL, api="openai", status="500") == 1
    assert _value(after, "edgellm_engine_up", model=MODEL) == 0


async def test_metrics_can_be_turned_off() -> None:
    async with scripted_server(ServerSettings(metrics=False)) as srv:
        assert (await srv.client.get("/metrics")).status_code == 404
