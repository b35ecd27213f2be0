"""`edgellm bench`: drive any OpenAI-compatible server and report latency and throughput.
The command declares the options; `run_bench` does the work."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgellm.bench.report import print_report, write_json, write_plot
from edgellm.bench.runner import (
    BenchError,
    LevelResult,
    LoadConfig,
    discover_model,
    normalize_url,
    run_level,
)
from edgellm.bench.stats import parse_slo
from edgellm.bench.workloads import (
    LengthRange,
    Workload,
    chat_workload,
    file_workload,
    random_workload,
)
from edgellm.cli.console import err, user_errors
from edgellm.errors import EdgeLLMError, ValidationError

WORKLOADS = ("random", "chat", "file")


@dataclass(slots=True, frozen=True)
class BenchOptions:
    """The command line, as given."""

    url: str
    model: str | None
    api_key: str | None
    workload: str
    file: Path | None
    text_file: Path | None
    concurrency: str | None  # "8" or "1,2,4,8"
    rate: str  # "inf" or requests per second
    requests: int | None
    warmup: int
    seed: int
    input_len: str
    output_len: str
    system_len: int
    turns: int
    temperature: float | None
    ignore_eos: bool
    extra_body: str | None
    slo: str | None
    timeout: float
    json_out: Path | None
    plot: Path | None


@user_errors
def bench(
    url: str = typer.Option("http://127.0.0.1:8000/v1", help="The server's /v1 base URL."),
    model: str | None = typer.Option(None, help="Model name (default: the first one served)."),
    api_key: str | None = typer.Option(None, envvar="EDGELLM_API_KEY", help="Bearer key."),
    workload: str = typer.Option("random", help="random, chat or file."),
    file: Path | None = typer.Option(None, help="file workload: JSONL, one request per line."),
    text_file: Path | None = typer.Option(
        None, help="Draw prompt text from this file (default: random common words)."
    ),
    concurrency: str | None = typer.Option(
        None, help="Requests in flight (chat: conversations); a list such as 1,4,8 runs each."
    ),
    rate: str = typer.Option("inf", help="Arrivals per second (Poisson); inf = all at once."),
    requests: int | None = typer.Option(
        None, min=1, help="Requests per level (default: max(16, 4 x concurrency))."
    ),
    warmup: int = typer.Option(1, min=0, help="Requests sent first and not counted."),
    seed: int = typer.Option(0, help="Seed for prompts, lengths and arrivals."),
    input_len: str = typer.Option("128", help="Prompt words (about tokens): N or LOW:HIGH."),
    output_len: str = typer.Option("128", help="max_tokens: N or LOW:HIGH."),
    system_len: int = typer.Option(500, min=0, help="chat: words of the shared system prompt."),
    turns: int = typer.Option(4, help="chat: turns per conversation."),
    temperature: float | None = typer.Option(0.0, help="Sampling temperature sent."),
    ignore_eos: bool = typer.Option(
        False, help="Ask the server to generate max_tokens (ignore_eos: true)."
    ),
    extra_body: str | None = typer.Option(None, help="JSON object merged into every request."),
    slo: str | None = typer.Option(
        None, help="Goodput targets, e.g. ttft=500ms,tpot=50ms,e2e=10s."
    ),
    timeout: float = typer.Option(600.0, min=1, help="Seconds per request."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write the summary and every request here."
    ),
    plot: Path | None = typer.Option(None, help="Write a PNG of latency and throughput."),
) -> None:
    """Benchmark a running OpenAI-compatible server (edgellm or any other): TTFT, TPOT,
    inter-token latency, E2E percentiles, throughput and goodput.

    Example: edgellm bench --url http://127.0.0.1:8000/v1 --concurrency 1,4,8 --ignore-eos
    """
    opts = BenchOptions(**locals())  # the parameters are BenchOptions' fields, one to one
    if not run_bench(opts, Console(highlight=False), err):
        raise EdgeLLMError("every request failed at some level; see the errors above")


def run_bench(opts: BenchOptions, console: Console, progress_console: Console) -> bool:
    """Run every level; True when each level had at least one successful request. Tables go
    to `console`, the live progress bar to `progress_console` (stderr)."""
    url = normalize_url(opts.url)
    levels = _concurrency_levels(opts.concurrency)
    rate = _rate(opts.rate)
    if levels == [None] and math.isinf(rate):
        levels = [1]  # neither given: one request at a time
    slo = parse_slo(opts.slo) if opts.slo else None
    body = _body_extras(opts)
    workload = _workload(opts, max(c or 1 for c in levels))
    model = opts.model or asyncio.run(discover_model(url, opts.api_key))
    title = f"{model} at {url}: {workload.name} workload, {workload.requests} requests"
    results: list[LevelResult] = []
    for concurrency in levels:
        cfg = LoadConfig(
            url=url,
            model=model,
            concurrency=concurrency,
            rate=rate,
            warmup=opts.warmup,
            seed=opts.seed,
            body=body,
            timeout=opts.timeout,
            api_key=opts.api_key,
            slo=slo,
        )
        results.append(_run_with_progress(workload, cfg, progress_console))
    print_report(console, title, results)
    if opts.json_out:
        config = {**asdict(opts), "url": url, "model": model, "body": body}
        write_json(opts.json_out, json.loads(json.dumps(config, default=str)), results)
        console.print(f"wrote {opts.json_out}", markup=False)
    if opts.plot:
        write_plot(opts.plot, title, results)
        console.print(f"wrote {opts.plot}", markup=False)
    return all(level.summary.completed > 0 for level in results)


def _run_with_progress(workload: Workload, cfg: LoadConfig, console: Console) -> LevelResult:
    label = f"c={cfg.concurrency or 'inf'}" + ("" if math.isinf(cfg.rate) else f" @{cfg.rate}/s")
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[errors]} errors"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=workload.requests, errors=0)
        failed = 0

        def on_record(record: Any) -> None:
            nonlocal failed
            failed += not record.ok
            progress.update(task, advance=1, errors=failed)

        return asyncio.run(run_level(workload, cfg, on_record))


def _concurrency_levels(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValidationError(
            f"bad --concurrency {text!r}: give N or a list such as 1,2,4,8", param="concurrency"
        )
    return list(levels)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0:
        raise ValidationError(f"bad --rate {text!r}: requests per second > 0, or inf", param="rate")
    return rate


def _body_extras(opts: BenchOptions) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.extra_body:
        try:
            extra = json.loads(opts.extra_body)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"bad --extra-body: not JSON ({exc.msg})", param="extra_body"
            ) from None
        if not isinstance(extra, dict):
            raise ValidationError("bad --extra-body: expected a JSON object", param="extra_body")
        body.update(extra)
    return body


def _workload(opts: BenchOptions, top_concurrency: int) -> Workload:
    if opts.workload not in WORKLOADS:
        raise ValidationError(
            f"unknown workload {opts.workload!r}; choose one of {', '.join(WORKLOADS)}",
            param="workload",
        )
    input_len = LengthRange.parse(opts.input_len, "input_len")
    output_len = LengthRange.parse(opts.output_len, "output_len")
    if opts.workload == "file":
        if opts.file is None:
            raise ValidationError("the file workload needs --file REQUESTS.jsonl", param="file")
        return file_workload(opts.file, opts.requests, output_len.high)
    if opts.workload == "chat":
        if opts.turns < 1:
            raise ValidationError("--turns must be at least 1", param="turns")
        requests = opts.requests or opts.turns * max(8, top_concurrency)
        conversations = max(1, math.ceil(requests / opts.turns))
        return chat_workload(
            conversations,
            opts.turns,
            opts.system_len,
            input_len,
            output_len,
            opts.seed,
            opts.text_file,
        )
    requests = opts.requests or max(16, 4 * top_concurrency)
    return random_workload(requests, input_len, output_len, opts.seed, opts.text_file)


__all__ = ["BenchError", "BenchOptions", "run_bench"]
