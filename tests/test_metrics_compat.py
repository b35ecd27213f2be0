"""`metrics_compat = "vllm"`: the load gauges under vLLM's names, for routers that read only
those (llm-d's endpoint picker, the production-stack router), in-process and parsed with
prometheus-client's parser as the production-stack router parses a scrape."""

from __future__ import annotations

import asyncio

import pytest

from edgellm.settings import ServerSettings
from tests.inprocess import MODEL, ScriptedServer, TextRunner, scripted_server
from tests.test_metrics import Samples, _scrape

pytestmark = pytest.mark.anyio

VLLM_GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
)


def _one(samples: Samples, name: str, label: str) -> float:
    """The value of `name`'s only series, which must be the served model's."""
    assert list(samples[name]) == [((label, MODEL),)], samples[name]
    return samples[name][((label, MODEL),)]


async def _scrape_when_queued(srv: ScriptedServer) -> Samples:
    """A scrape once the engine has published one request running and two waiting (its
    gauges as edgellm names them)."""
    for _ in range(500):
        samples = await _scrape(srv)
        load = [samples[f"edgellm_requests_{state}"].get((("model", MODEL),)) for state in
                ("running", "waiting")]  # fmt: skip
        if load == [1, 2]:
            return samples
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never showed one request running and two waiting")


async def test_vllm_names_carry_the_engine_gauges() -> None:
    runner = TextRunner(n_ctx=1024, seq_cells=1024, eos_at=None, step_s=0.02)
    settings = ServerSettings(metrics_compat="vllm")
    async with scripted_server(settings, runner=runner, parallel=1) as srv:
        first = asyncio.create_task(srv.chat(max_tokens=80))
        await asyncio.to_thread(runner.stepping.wait, 10)
        queued = [asyncio.create_task(srv.chat(max_tokens=2)) for _ in range(2)]
        samples = await _scrape_when_queued(srv)
        for request in (first, *queued):
            assert (await request).status_code == 200
        idle = await _scrape(srv)
    assert _one(samples, "vllm:num_requests_running", "model_name") == 1
    assert _one(samples, "vllm:num_requests_waiting", "model_name") == 2
    kv = _one(samples, "vllm:kv_cache_usage_perc", "model_name")
    assert 0 < kv <= 1  # vLLM's unit: a fraction, not a percentage
    assert kv == _one(samples, "edgellm_kv_cache_usage_ratio", "model")
    assert _one(samples, "vllm:gpu_cache_usage_perc", "model_name") == kv
    assert _one(idle, "vllm:num_requests_running", "model_name") == 0
    assert _one(idle, "vllm:num_requests_waiting", "model_name") == 0


async def test_without_the_setting_no_vllm_name_is_exported() -> None:
    async with scripted_server() as srv:
        assert (await srv.chat()).status_code == 200
        response = await srv.client.get("/metrics")
    assert "vllm:" not in response.text
    assert "edgellm_requests_waiting{" in response.text
    for name in VLLM_GAUGES:
        assert name not in response.text
