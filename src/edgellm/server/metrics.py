"""Prometheus metrics at GET /metrics. Request metrics are fed by the pipeline's final records
(a record sink: nothing on the engine's step path) and by the error renderer (rejections);
engine gauges are read from each engine's last published stats when Prometheus scrapes, GPU
gauges from NVML then (`edgellm.server.gpu`).

Label values come from bounded sets only: `model` is a served model's name or "unknown" (never
a name a client sent), `version` a served model's version (its weights' SHA-256 prefix) or "",
`api` is openai | ollama | cli, `status` an HTTP status, `finish_reason` one of the engine's
reasons, `reason` a rejection reason of `edgellm.errors`. docs/operations.md lists every series
with its vLLM and llama-server counterparts; with `metrics_compat="vllm"` the engine gauges are
also exported under vLLM's own names, for routers that read only those.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from edgellm.errors import EdgeLLMError
from edgellm.server.gpu import GpuGauges
from edgellm.server.lifecycle import ModelTable
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
UNKNOWN = "unknown"

CONTENT_TYPE = CONTENT_TYPE_LATEST
MetricsCompat = Literal["off", "vllm"]  # ServerSettings.metrics_compat


class Metrics:
    """The registry of one server and the sink that feeds it."""

    def __init__(self, table: ModelTable, compat: MetricsCompat = "off"):
        self.table = table
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: noise to dashboards, 2x the samples
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "edgellm_requests",
            "Generation requests by the HTTP status they got (499: the client went away).",
            ["model", "version", "api", "status"],
            registry=registry,
        )
        self.finished = Counter(
            "edgellm_requests_finished",
            "Generation requests by how they ended.",
            ["model", "version", "finish_reason"],
            registry=registry,
        )
        self.mirrored = Counter(
            "edgellm_mirror_requests",
            "Requests copied to a canary candidate (--mirror), by whether its answer was the "
            "client's: match, differ, error (the copy failed) or unknown (the client's did).",
            ["model", "version", "result"],
            registry=registry,
        )
        self.rejected = Counter(
            "edgellm_requests_rejected",
            "Requests refused before any work on them (any route), by reason.",
            ["reason"],
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
        self.itl = self._histogram(
            "edgellm_inter_token_latency_seconds",
            "Time between consecutive output tokens, as the server delivered them.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.queue_time = self._histogram(
            "edgellm_request_queue_time_seconds",
            "Submitted to first given a sequence by the scheduler, per request.",
            LATENCY_BUCKETS,
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
        registry.register(_EngineGauges(table, vllm_names=compat == "vllm"))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, open fds
        gpus = GpuGauges.open()
        if gpus is not None:
            registry.register(gpus)

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ["model", "version"], registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        labels = ["model", "version"]
        return Histogram(name, documentation, labels, registry=self.registry, buckets=buckets)

    def _labels(self, record: Record) -> tuple[str, str]:
        """(model, version) of a record, from the served set only."""
        if any(slot.model_id == record.model for slot in self.table.slots()):
            return record.model, record.version
        return UNKNOWN, ""

    def observe(self, record: Record) -> None:
        """The record sink: count one generation request that reached the pipeline."""
        labels = self._labels(record)
        self.requests.labels(*labels, record.api, str(record.status)).inc()
        if record.api == "mirror":
            match = record.mirror_match
            if record.error:
                result = "error"
            else:
                result = "unknown" if match is None else "match" if match else "differ"
            self.mirrored.labels(*labels, result).inc()
        if record.submitted is None:
            return  # refused before the engine saw it (counted as a rejection too)
        reason = record.finish_reason if record.finish_reason in FINISH_REASONS else "error"
        self.finished.labels(*labels, reason).inc()
        self.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        self.cached_tokens.labels(*labels).inc(record.cached_tokens)
        self.generation_tokens.labels(*labels).inc(record.completion_tokens)
        if record.queued_s is not None:
            self.queue_time.labels(*labels).observe(record.queued_s)
        if record.first_output is None:
            return  # ended before any output: no latency to speak of
        self.prompt_sizes.labels(*labels).observe(record.prompt_tokens)
        self.generation_sizes.labels(*labels).observe(record.completion_tokens)
        if record.ttft_s is not None:
            self.ttft.labels(*labels).observe(record.ttft_s)
        if record.e2e_s is not None:
            self.e2e.labels(*labels).observe(record.e2e_s)
        if record.ttft_s is not None and record.e2e_s is not None and record.completion_tokens > 1:
            per_token = (record.e2e_s - record.ttft_s) / (record.completion_tokens - 1)
            self.tpot.labels(*labels).observe(per_token)
        itl = self.itl.labels(*labels)
        for gap in record.token_gaps:
            itl.observe(gap)

    def on_error(self, scope: Scope, exc: EdgeLLMError, recorded: bool) -> None:
        """The error observer: count a refusal (of any route) by its reason."""
        if exc.rejection is not None:
            self.rejected.labels(exc.rejection).inc()

    def exposition(self) -> bytes:
        self._zero_failures()
        return generate_latest(self.registry)

    def _zero_failures(self) -> None:
        """Make the failure series of each loaded model exist at 0, so that its first failure
        is an increase `rate()` sees (a series born at 1 is not) and alerts fire on it."""
        table = self.table
        for slot in table.slots():
            instance = next((i for i in table.loaded() if i.key == slot.target), None)
            if instance is not None and instance.model.engine.ready:
                version = instance.version or instance.model.version
                for api in ("openai", "ollama"):
                    for status in ("500", "503"):
                        self.requests.labels(slot.model_id, version, api, status)


# The load gauges: (name, help, the _EngineLoad field each shows), edgellm's and vLLM's names.
LOAD_GAUGES = (
    ("edgellm_requests_running", "Requests holding a sequence now.", "running"),
    ("edgellm_requests_waiting", "Requests queued for a sequence.", "waiting"),
    (
        "edgellm_kv_cache_usage_ratio",
        "KV cache cells held by requests, as a fraction of all cells (0-1).",
        "kv_usage",
    ),
)
# What routers that read only vLLM's names find (`metrics_compat="vllm"`, label `model_name`):
# the Gateway API Inference Extension's endpoint picker (llm-d's scheduler) reads
# num_requests_waiting, num_requests_running and kv_cache_usage_perc by default; the vLLM
# production-stack router reads the two request gauges and gpu_cache_usage_perc, the KV usage's
# name before vLLM's v1 engine.
VLLM_LOAD_GAUGES = (
    ("vllm:num_requests_running", "Requests holding a sequence now.", "running"),
    ("vllm:num_requests_waiting", "Requests queued for a sequence.", "waiting"),
    ("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (1 means 100 percent).", "kv_usage"),
    (
        "vllm:gpu_cache_usage_perc",
        "KV cache usage, 0-1: vllm:kv_cache_usage_perc under its older name.",
        "kv_usage",
    ),
)


@dataclass(slots=True)
class _EngineLoad:
    """One loaded engine's load, from its last published stats."""

    model: str  # the first served name the engine serves
    running: int  # requests holding a sequence
    waiting: int  # requests queued for one
    kv_usage: float  # KV cells held / all cells, 0-1


class _EngineGauges(Collector):
    """Gauges read from each served engine's last stats, at scrape time; `vllm_names`: the
    load gauges also under vLLM's names (VLLM_LOAD_GAUGES)."""

    def __init__(self, table: ModelTable, vllm_names: bool = False):
        self.table = table
        self.vllm_names = vllm_names

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "edgellm_engine_up",
            "1 while the model's engine serves; 0 loading or stopped.",
            labels=["model"],
        )
        loaded = GaugeMetricFamily(
            "edgellm_model_loaded",
            "1 for each version of a model whose weights are loaded and serving.",
            labels=["model", "version"],
        )
        memory = GaugeMetricFamily(
            "edgellm_model_memory_bytes",
            "Memory a loaded version is charged: the larger of its estimate and its measured "
            "resident growth.",
            labels=["model", "version"],
        )
        budget = GaugeMetricFamily(
            "edgellm_model_memory_budget_bytes", "The loaded models' memory budget (--max-memory)."
        )
        transitions = CounterMetricFamily(
            "edgellm_fallback_transitions",
            "Times a served name's SLO fallback switched on or off.",
            labels=["model"],
        )
        fallback = GaugeMetricFamily(
            "edgellm_fallback_active",
            "1 while a served name's SLO fallback takes its new requests; 0 on its primary.",
            labels=["model"],
        )
        table = self.table
        loads: list[_EngineLoad] = []
        for slot in table.slots():
            instance = next((i for i in table.loaded() if i.key == slot.target), None)
            engine = instance.model.engine if instance is not None else None
            alive = engine is not None and engine.ready and engine.failure is None
            up.add_metric([slot.model_id], 1.0 if alive else 0.0)
            if slot.fallback is not None:
                fallback.add_metric([slot.model_id], 1.0 if slot.fallback.active else 0.0)
                transitions.add_metric([slot.model_id], slot.fallback.transitions)
        for instance in table.loaded():
            engine = instance.model.engine
            names = [s.model_id for s in table.slots() if s.target == instance.key]
            names = names or [instance.model.model_id]
            if instance.state == "ready" and not instance.pinned:
                memory.add_metric([names[0], instance.version], instance.size_bytes)
            if engine.ready and engine.failure is None:
                for name in names:
                    loaded.add_metric([name, instance.version or instance.model.version], 1.0)
            stats = engine.stats()
            if stats is not None:
                kv_usage = stats.cells_used / stats.n_ctx if stats.n_ctx else 0.0
                loads.append(_EngineLoad(names[0], stats.running, stats.waiting, kv_usage))
        if table.policy.max_memory is not None:
            budget.add_metric([], table.policy.max_memory)
            yield budget
        yield from (up, loaded, *_load_gauges(LOAD_GAUGES, "model", loads))
        yield from (fallback, transitions, memory)
        if self.vllm_names:
            yield from _load_gauges(VLLM_LOAD_GAUGES, "model_name", loads)


def _load_gauges(
    gauges: tuple[tuple[str, str, str], ...], label: str, loads: list[_EngineLoad]
) -> Iterator[Metric]:
    for name, documentation, field in gauges:
        family = GaugeMetricFamily(name, documentation, labels=[label])
        for load in loads:
            family.add_metric([load.model], getattr(load, field))
        yield family
