"""Metrics and logs of a real `edgellm serve` (the default model) under real traffic from the
official `openai` and `ollama` clients: after good requests (streamed and not, both APIs), one
400, one 404, one queue rejection and one client that hangs up mid-stream, every counter and
histogram count of /metrics (read with prometheus-client's parser) has moved by exactly that;
the token counters equal the sums of the responses' usage; the JSON log has one parseable line
per request with its fields, and no prompt text."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_ID, ServerProcess, ollama_client, openai_client

pytestmark = pytest.mark.model

SECRET = "zebra quartz 7781"  # in every prompt: it must never reach the log
Samples = dict[str, float]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    # one sequence and no queue: a second request while one runs is refused at once
    proc = ServerProcess(
        "--ctx", "2048", "--parallel", "1", "--max-queue", "0", "--log-format", "json"
    )
    yield proc
    proc.stop()


def scrape(srv: ServerProcess) -> Samples:
    """Every sample of /metrics, keyed by name and its sorted labels."""
    text = httpx.get(srv.base + "/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def delta(before: Samples, after: Samples) -> dict[str, float]:
    """What moved, without the process's own and the engine's momentary series."""
    moved: dict[str, float] = defaultdict(float)
    for key, value in after.items():
        name = key.split("{")[0]
        if name.startswith(("process_", "edgellm_requests_running", "edgellm_requests_waiting")):
            continue
        if name.startswith(("edgellm_engine_up", "edgellm_model_loaded", "edgellm_kv_cache")):
            continue
        if name.endswith("_bucket") or name.endswith("_sum"):
            continue  # bucket and sum values depend on timings; counts do not
        change = value - before.get(key, 0.0)
        if change:
            moved[key] = change
    return dict(moved)


def series(name: str, **labels: str) -> str:
    return f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"


def chat(**fields: Any) -> dict[str, Any]:
    question = [{"role": "user", "content": f"{SECRET}: name three colours."}]
    return {"model": MODEL_ID, "messages": question, "max_tokens": 8, "temperature": 0, **fields}


def test_metrics_and_logs_follow_real_traffic(srv: ServerProcess) -> None:
    version = scrape(srv)  # the served version, from its gauge
    (loaded,) = [k for k in version if k.startswith("edgellm_model_loaded")]
    ver = loaded.split("version=")[1].rstrip("}")
    assert len(ver) == 12 and int(ver, 16) >= 0
    mine = {"model": MODEL_ID, "version": ver}
    before = scrape(srv)
    completions: list[int] = []  # completion tokens of each answered request
    prompt = cached = 0
    with openai_client(srv) as client:
        for i in range(2):  # the same prompt twice: the second finds it in the prefix cache
            raw = client.chat.completions.with_raw_response.create(
                **chat(), extra_headers={"X-Request-Id": f"observed-{i}"}
            )
            assert raw.headers["x-request-id"] == f"observed-{i}"
            answer = raw.parse()
            assert answer.id == f"chatcmpl-observed-{i}" and answer.usage is not None
            completions.append(answer.usage.completion_tokens)
            prompt += answer.usage.prompt_tokens
            details = answer.usage.prompt_tokens_details
            cached += details.cached_tokens or 0 if details else 0
        assert cached > 0, "the repeated prompt was not found in the prefix cache"
        for chunk in client.chat.completions.create(
            **chat(stream=True, stream_options={"include_usage": True})
        ):
            if chunk.usage is not None:
                completions.append(chunk.usage.completion_tokens)
                prompt += chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                cached += details.cached_tokens or 0 if details else 0
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**chat(temperature=5))  # refused by the wire model
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**chat(model="no-such-model"))
        # the only sequence is held by a stream: the next request is refused (queue full)
        holder = client.chat.completions.create(
            **chat(stream=True, max_tokens=40, stream_options={"include_usage": True})
        )
        next(iter(holder))
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**chat())
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"]
        for chunk in holder:
            if chunk.usage is not None:
                completions.append(chunk.usage.completion_tokens)
                prompt += chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                cached += details.cached_tokens or 0 if details else 0
    openai_phase = scrape(srv)
    moved = delta(before, openai_phase)
    assert moved.get(series("edgellm_prompt_tokens_total", **mine)) == prompt
    assert moved.get(series("edgellm_prompt_tokens_cached_total", **mine)) == cached
    assert moved.get(series("edgellm_generation_tokens_total", **mine)) == sum(completions)

    computed = 0  # Ollama reports the prompt tokens it computed (not those found cached)
    with ollama_client(srv) as olla:
        options = {"num_predict": 8, "temperature": 0}
        said = olla.chat(
            model=MODEL_ID, messages=[{"role": "user", "content": f"{SECRET}?"}], options=options
        )
        completions.append(said.eval_count or 0)
        computed += said.prompt_eval_count or 0
        for part in olla.generate(model=MODEL_ID, prompt=SECRET, stream=True, options=options):
            if part.done:
                completions.append(part.eval_count or 0)
                computed += part.prompt_eval_count or 0
    after = scrape(srv)

    moved = delta(before, after)
    answered = len(completions)  # 6: 2 + stream + the holder, Ollama's chat and generate
    gaps = sum(n - 1 for n in completions if n)
    expected = {
        series("edgellm_requests_total", **mine, api="openai", status="200"): 4,
        series("edgellm_requests_total", **mine, api="ollama", status="200"): 2,
        series("edgellm_requests_total", **mine, api="openai", status="503"): 1,
        series(
            "edgellm_requests_total", model="unknown", version="", api="openai", status="400"
        ): 1,
        series(
            "edgellm_requests_total", model="unknown", version="", api="openai", status="404"
        ): 1,
        series("edgellm_requests_rejected_total", reason="invalid"): 1,
        series("edgellm_requests_rejected_total", reason="not_found"): 1,
        series("edgellm_requests_rejected_total", reason="queue_full"): 1,
        series("edgellm_generation_tokens_total", **mine): sum(completions),
        series("edgellm_time_to_first_token_seconds_count", **mine): answered,
        series("edgellm_time_per_output_token_seconds_count", **mine): sum(
            1 for n in completions if n > 1
        ),
        series("edgellm_inter_token_latency_seconds_count", **mine): gaps,
        series("edgellm_e2e_request_latency_seconds_count", **mine): answered,
        series("edgellm_request_queue_time_seconds_count", **mine): answered,
        series("edgellm_request_prompt_tokens_count", **mine): answered,
        series("edgellm_request_generation_tokens_count", **mine): answered,
    }
    finished = {k: v for k, v in moved.items() if k.startswith("edgellm_requests_finished")}
    assert sum(finished.values()) == answered, finished
    assert set(finished) <= {
        series("edgellm_requests_finished_total", **mine, finish_reason=r)
        for r in ("stop", "length")
    }
    tokens = {k: v for k, v in moved.items() if k.startswith("edgellm_prompt_tokens")}
    total = series("edgellm_prompt_tokens_total", **mine)
    hits = series("edgellm_prompt_tokens_cached_total", **mine)
    assert tokens[total] - tokens.get(hits, 0) == prompt - cached + computed
    rest = {k: v for k, v in moved.items() if k not in finished and k not in tokens}
    assert rest == expected

    # a client that hangs up mid-stream: counted once as 499, its request aborted
    with httpx.stream(
        "POST", srv.base + "/v1/chat/completions", json=chat(stream=True, max_tokens=300)
    ) as response:
        next(response.iter_lines())
    gone = series("edgellm_requests_total", **mine, api="openai", status="499")
    aborted = series("edgellm_requests_finished_total", **mine, finish_reason="abort")
    deadline = time.monotonic() + 10
    while delta(after, scrape(srv)).get(gone) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    last = delta(after, scrape(srv))
    assert last.get(gone) == 1 and last.get(aborted) == 1, last

    _check_log(srv, ver)


def _check_log(srv: ServerProcess, version: str) -> None:
    """Every line of the log is a JSON object; each request has one line with its fields;
    the prompts' text is nowhere."""
    text = srv.output()
    assert SECRET not in text and "zebra" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert len(requests) == 10  # 6 answered, the 400, 404 and 503, the one that hung up
    by_id = {line["request_id"]: line for line in requests}
    first = by_id["observed-0"]
    assert first["model"] == MODEL_ID and first["version"] == version
    assert (first["api"], first["status"], first["route"]) == (
        "openai",
        200,
        "/v1/chat/completions",
    )
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "ttft_s", "e2e_s"):
        assert isinstance(first[name], int | float), name
    assert first["finish_reason"] in ("stop", "length")
    assert first["client"].startswith("127.0.0.1:")
    assert by_id["observed-1"]["cached_tokens"] > 0
    statuses = sorted(line["status"] for line in requests)
    assert statuses.count(200) == 6 and {400, 404, 499, 503} <= set(statuses)
    access = [line for line in lines if line.get("event") == "access"]
    assert any(line["path"] == "/metrics" and line["status"] == 200 for line in access)
