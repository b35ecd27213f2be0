"""Prometheus metrics at GET /metrics. Request metrics are fed by the pipeline's final records
(a record sink: nothing on the engine's step path); engine gauges are read from each engine's
last published stats when Prometheus scrapes.

Label values come from bounded sets only: `model` is a served model's name or "unknown" (never
a name a client sent), `api` is openai | ollama | cli, `status` an HTTP status, `finish_reason`
one of the engine's reasons. docs/operations.md lists every series with its vLLM and
llama-server counterparts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgellm.server.models import ModelTable
from edgellm.server.pipeline import Record

# Seconds: from a GPU's milliseconds to a 2-core box's tens of seconds for a long answer.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 320.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "abort", "error"})

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The registry of one server and the sink that feeds it."""

    def __init__(self, table: ModelTable):
        self.table = table
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "edgellm_requests",
            "Generation requests by the HTTP status they got (499: the client went away).",
            ["model", "api", "status"],
            registry=registry,
        )
        self.finished = Counter(
            "edgellm_requests_finished",
            "Generation requests by how they ended.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.prompt_tokens = self._counter("edgellm_prompt_tokens", "Prompt tokens of requests.")
        self.cached_tokens = self._counter(
            "edgellm_prompt_tokens_cached",
            "Prompt tokens reused from the prefix cache instead of computed.",
        )
        self.generation_tokens = self._counter("edgellm_generation_tokens", "Tokens generated.")
        self.ttft = self._histogram(
            "edgellm_time_to_first_token_seconds",
            "Arrival to the first output, per request.",
            LATENCY_BUCKETS,
        )
        self.tpot = self._histogram(
            "edgellm_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = self._histogram(
            "edgellm_e2e_request_latency_seconds",
            "Arrival to the last output, per request.",
            LATENCY_BUCKETS,
        )
        self.prompt_sizes = self._histogram(
            "edgellm_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.generation_sizes = self._histogram(
            "edgellm_request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        registry.register(_EngineGauges(table))

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ["model"], registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, documentation, ["model"], registry=self.registry, buckets=buckets)

    def observe(self, record: Record) -> None:
        """The record sink: count one finished generation request."""
        served = {m.model_id for m in self.table}
        model = record.model if record.model in served else "unknown"
        self.requests.labels(model, record.api, str(record.status)).inc()
        reason = record.finish_reason if record.finish_reason in FINISH_REASONS else "error"
        self.finished.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.cached_tokens.labels(model).inc(record.cached_tokens)
        self.generation_tokens.labels(model).inc(record.completion_tokens)
        if record.error is not None and record.first_output is None:
            return  # refused or failed before any output: no latency to speak of
        self.prompt_sizes.labels(model).observe(record.prompt_tokens)
        self.generation_sizes.labels(model).observe(record.completion_tokens)
        if record.ttft_s is not None:
            self.ttft.labels(model).observe(record.ttft_s)
        if record.e2e_s is not None:
            self.e2e.labels(model).observe(record.e2e_s)
        if record.ttft_s is not None and record.e2e_s is not None and record.completion_tokens > 1:
            per_token = (record.e2e_s - record.ttft_s) / (record.completion_tokens - 1)
            self.tpot.labels(model).observe(per_token)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges(Collector):
    """Gauges read from each served engine's last stats, at scrape time."""

    def __init__(self, table: ModelTable):
        self.table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "edgellm_engine_up",
            "1 while the model's engine serves; 0 loading or stopped.",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "edgellm_num_requests_running", "Requests decoding now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "edgellm_num_requests_waiting", "Requests queued for a slot.", labels=["model"]
        )
        kv = GaugeMetricFamily(
            "edgellm_kv_cache_usage_ratio",
            "KV cache cells held by requests, as a fraction of all cells (0-1).",
            labels=["model"],
        )
        for model in self.table:
            engine = model.engine
            alive = engine.ready and engine.failure is None and engine.load_error is None
            up.add_metric([model.model_id], 1.0 if alive else 0.0)
            stats = engine.stats()
            if stats is None:
                continue
            running.add_metric([model.model_id], stats.running)
            waiting.add_metric([model.model_id], stats.waiting)
            kv.add_metric([model.model_id], stats.cells_used / stats.n_ctx if stats.n_ctx else 0)
        yield from (up, running, waiting, kv)
