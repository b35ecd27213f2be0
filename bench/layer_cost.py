"""CPU time a request-path layer adds per request, measured in-process on records like a real
request's (128 generated tokens): the metrics sink, the request log line, the quota sink, and
the model table's lease (route, acquire and release) for a file and for a registry name with a
canary. The
side-by-side throughput runs (bench/compare.py) carry the shared machine's noise; this is the
layer's own cost, to set against a request's seconds of engine time.

    python bench/layer_cost.py
"""

from __future__ import annotations

import asyncio
import logging
import time
import timeit

from edgellm.server.lifecycle import ModelTable, Policy
from edgellm.server.logs import RequestLog
from edgellm.server.metrics import Metrics
from edgellm.server.pipeline import Record
from edgellm.server.quotas import Quotas
from tests.inprocess import TextRunner, scripted_model  # a served model without weights


def record() -> Record:
    now = time.monotonic()
    r = Record("id", "openai", "/v1/chat/completions", "m", True, version="0123456789ab")
    r.key, r.submitted, r.first_output, r.ended = "k", now, now + 0.2, now + 3.0
    r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.queued_s = 40, 128, 20, 0.01
    r.finish_reason, r.token_gaps = "length", [0.02] * 127
    return r


def per_call_us(fn: object, n: int = 2000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]


def lease_us(table: ModelTable, name: str, n: int = 20000) -> float:
    """One acquire + release of `name` (the instance loaded), in microseconds."""

    async def run() -> float:
        table.start()
        (await table.acquire(name, conversation="c")).release()  # loads it
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for i in range(n):
                (await table.acquire(name, conversation=f"conversation {i}")).release()
            best = min(best, (time.perf_counter() - started) / n * 1e6)
        await table.shutdown()
        return best

    return asyncio.run(run())


def conversation_us() -> float:
    from edgellm.server.pipeline import ChatInput, GenerationRequest, sampling_params

    system = {"role": "system", "content": "You are brief." * 20}
    chat = ChatInput([system, {"role": "user", "content": "What is the capital of France?" * 10}])
    request = GenerationRequest("openai", "/v1/chat/completions", "m", chat, sampling_params(), 16)
    return per_call_us(request.conversation)


def main() -> None:
    runner = TextRunner(n_ctx=2048, seq_cells=512)
    metrics = Metrics(ModelTable([scripted_model(runner, model_id="m")]))
    sample = record()
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])
    log = RequestLog()
    quotas = Quotas()
    rows = {
        "metrics sink (observe, 128 tokens)": per_call_us(lambda: metrics.observe(sample)),
        "request log line (json fields, null handler)": per_call_us(lambda: log(sample)),
        "quota sink (observe)": per_call_us(lambda: quotas.observe(sample)),
        "GET /metrics exposition": per_call_us(metrics.exposition, n=200),
        "lease of a file's model (acquire + release)": lease_us(
            ModelTable([scripted_model(TextRunner(n_ctx=2048, seq_cells=512), model_id="m")]), "m"
        ),
        "lease of a registry name with a 20% canary": lease_us(_registry_table(), "m:prod"),
        "conversation key (system + first user message)": conversation_us(),
    }
    for name, us in rows.items():
        print(f"{name:48s} {us:9.1f} us")


def _registry_table() -> ModelTable:
    from tests.lifecycle_fakes import ScriptedRegistry, version

    registry = ScriptedRegistry()
    registry.point("m:prod", target=version(1), candidate=version(2), weight=20.0)
    table = ModelTable(loader=registry, policy=Policy(poll_s=3600))
    table.open_registry(["m:prod"])
    return table


if __name__ == "__main__":
    main()
