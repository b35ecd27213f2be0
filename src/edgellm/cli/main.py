"""`edgellm`: serve, chat, bench, convert, quantize, eval (and later plan)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.markup import escape

from edgellm import __version__
from edgellm.errors import EdgeLLMError, ValidationError

app = typer.Typer(
    name="edgellm",
    help="Run language models privately on hardware you own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one clear line and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeLLMError as exc:
            err.print(f"[red]error:[/red] {escape(exc.message)}")
            raise typer.Exit(1) from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            err.print(f"[red]error:[/red] invalid setting {escape(where)}: {escape(first['msg'])}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgellm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run language models privately on hardware you own."""


@app.command()
@user_errors
def serve(
    model_path: Path | None = typer.Argument(None, help="GGUF file; default: the embedded model."),
    host: str | None = typer.Option(None, help="Address to bind (default: 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default: 8000)."),
    ctx: int | None = typer.Option(
        None, help="KV cache cells in all; split layout: ctx/parallel each (default: 16384)."
    ),
    parallel: int | None = typer.Option(None, help="Most requests decoding at once (default: 8)."),
    batch: int | None = typer.Option(
        None, help="Most tokens per step; prefill chunk (default: 256)."
    ),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
    max_queue: int | None = typer.Option(
        None, help="Most waiting requests before 503 (default: 64)."
    ),
    flash_attn: bool | None = typer.Option(
        None,
        "--flash-attn/--no-flash-attn",
        help="Flash attention (default: on).",
    ),
    kv_layout: str | None = typer.Option(
        None,
        help="split: a KV stream of ctx/parallel cells per request, batch-invariant; shared: one "
        "pool any request may fill (default: split).",
    ),
    prefix_cache: bool | None = typer.Option(
        None,
        "--prefix-cache/--no-prefix-cache",
        help="Reuse the KV cells of earlier requests' matching prefix (default: on).",
    ),
    model_id: str | None = typer.Option(None, help="Model name for clients (default: from file)."),
    reasoning: str | None = typer.Option(
        None,
        help="auto|on|off: split <think> reasoning from answers; auto: when the chat template "
        "uses it (default: auto).",
    ),
    pooling: str | None = typer.Option(
        None, help="auto|mean|cls|last: embedding pooling; auto: the model file's, else mean."
    ),
    api_key: str | None = typer.Option(
        None,
        envvar="EDGELLM_API_KEY",
        help="Require this key (Authorization: Bearer KEY or X-Api-Key: KEY).",
    ),
    allowed_origins: str | None = typer.Option(
        None,
        help="Web origins whose pages may call the API, comma-separated (default: none but "
        "the server's own).",
    ),
    allowed_hosts: str | None = typer.Option(
        None, help="Host names accepted besides loopback names and the bound address."
    ),
    insecure: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    config: Path | None = typer.Option(None, help="TOML config file with [server] and [engine]."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Example: edgellm serve --port 8000 --parallel 8
    then: curl http://127.0.0.1:8000/v1/models
    """
    import uvicorn

    from edgellm.server import create_app
    from edgellm.server.app import is_loopback
    from edgellm.server.connections import raise_open_files_limit, uvicorn_options
    from edgellm.serving import prepare_model
    from edgellm.settings import EngineSettings, ServerSettings

    server_settings = ServerSettings.load(
        config,
        model=model_path,
        host=host,
        port=port,
        model_id=model_id,
        reasoning=reasoning,
        api_key=api_key,
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
    )
    engine_settings = EngineSettings.load(
        config,
        ctx=ctx,
        parallel=parallel,
        batch=batch,
        threads=threads,
        max_queue=max_queue,
        flash_attn=flash_attn,
        kv_layout=kv_layout,
        prefix_cache=prefix_cache,
        pooling=pooling,
    )
    if not is_loopback(server_settings.host) and not insecure and not server_settings.api_key:
        raise EdgeLLMError(
            f"refusing to bind {server_settings.host} without API keys; "
            "bind 127.0.0.1, set --api-key, or pass --insecure"
        )
    model = prepare_model(server_settings, engine_settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app_ = create_app(server_settings, [model])
    raise_open_files_limit()
    uv = uvicorn.Server(
        uvicorn.Config(
            app_,
            host=server_settings.host,
            port=server_settings.port,
            log_level=server_settings.log_level,
            timeout_graceful_shutdown=5,
            **uvicorn_options(
                header_timeout_s=server_settings.header_timeout,
                keep_alive_s=server_settings.keep_alive,
                max_connections=server_settings.max_connections,
            ),
        )
    )
    base = f"http://{server_settings.host}:{server_settings.port}/v1"

    def announce() -> None:
        model.engine.wait_loaded()
        if model.engine.load_error is not None:
            uv.should_exit = True
        else:
            err.print(f"edgellm: serving [bold]{model.model_id}[/bold] at {base}")

    threading.Thread(target=announce, daemon=True).start()
    uv.run()
    if model.engine.load_error is not None:
        raise EdgeLLMError(f"model failed to load: {model.engine.load_error}")
    if not uv.started:
        raise typer.Exit(1)


@app.command()
@user_errors
def chat(
    url: str | None = typer.Option(None, help="A running server's /v1 URL; default: in-process."),
    model: str | None = typer.Option(None, help="Model name (with --url) or GGUF path."),
    system: str | None = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.7, help="Sampling temperature."),
    max_tokens: int = typer.Option(512, help="Most tokens per reply."),
    api_key: str | None = typer.Option(
        None, envvar="EDGELLM_API_KEY", help="Bearer key for --url."
    ),
) -> None:
    """Chat in the terminal, streaming replies. Empty line or Ctrl-D quits.

    Example: edgellm chat --url http://127.0.0.1:8000/v1
    """
    from edgellm.cli.chat import run_chat

    run_chat(
        url=url,
        model=model,
        system=system,
        temperature=temperature,
        max_tokens=max_tokens,
        api_key=api_key,
    )


@app.command()
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
    from edgellm.cli.bench import BenchOptions, run_bench

    opts = BenchOptions(
        url=url,
        model=model,
        api_key=api_key,
        workload=workload,
        file=file,
        text_file=text_file,
        concurrency=concurrency,
        rate=rate,
        requests=requests,
        warmup=warmup,
        seed=seed,
        input_len=input_len,
        output_len=output_len,
        system_len=system_len,
        turns=turns,
        temperature=temperature,
        ignore_eos=ignore_eos,
        extra_body=extra_body,
        slo=slo,
        timeout=timeout,
        json_out=json_out,
        plot=plot,
    )
    if not run_bench(opts, Console(highlight=False), err):
        raise EdgeLLMError("every request failed at some level; see the errors above")


def _threads() -> int:
    import os

    return max(1, os.cpu_count() or 1)


@app.command()
@user_errors
def convert(
    source: Path = typer.Argument(..., help="GGUF file (any type)."),
    to: str = typer.Option("f16", help="f16, bf16 or f32."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
) -> None:
    """Dequantize a GGUF to F16, BF16 or F32 (1-D tensors stay F32).

    Example: edgellm convert model.Q4_1.gguf --to f16 -o model.f16.gguf
    """
    from edgellm.cli.compress import run_convert

    run_convert(source, to, output, err)


@app.command()
@user_errors
def quantize(
    source: Path = typer.Argument(..., help="GGUF file; a quantized one is dequantized first."),
    qtype: str | None = typer.Option(None, "--type", "-t", help="Q8_0, Q6_K, Q4_K_M, ..."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="File to write (with --sweep: a directory)."
    ),
    imatrix: Path | None = typer.Option(None, help="Importance matrix (imatrix GGUF)."),
    calibrate: Path | None = typer.Option(
        None, help="Compute the importance matrix from this text first."
    ),
    calib_ctx: int = typer.Option(512, min=8, help="--calibrate: tokens per window."),
    calib_chunks: int | None = typer.Option(100, min=1, help="--calibrate: most windows."),
    sweep: str | None = typer.Option(
        None, help="Several types, e.g. Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K: quantize and compare."
    ),
    ref: Path | None = typer.Option(None, help="--sweep: reference model (default: SOURCE)."),
    data: Path | None = typer.Option(None, help="--sweep: evaluation text."),
    ctx: int = typer.Option(512, help="--sweep: tokens per evaluation window."),
    chunks: int | None = typer.Option(None, min=1, help="--sweep: most windows (default: all)."),
    plot: Path | None = typer.Option(None, help="--sweep: write a PNG of the frontier."),
    json_out: bool = typer.Option(False, "--json", help="--sweep: print JSON, not a table."),
    threads: int = typer.Option(_threads(), min=1, help="CPU threads."),
) -> None:
    """Quantize a GGUF with llama.cpp's quantizer; a manifest (parent SHA-256, type,
    parameters) goes beside it. IQ types need --imatrix or --calibrate. With --sweep, make
    several types and print their size / speed / quality table.

    Example: edgellm quantize model.f16.gguf --type Q4_K_M -o model.Q4_K_M.gguf

    Example: edgellm quantize model.f16.gguf --sweep Q8_0,Q4_K_M,Q2_K --data wiki.txt -o out/
    """
    from edgellm.cli.compress import QuantizeOptions, run_quantize

    opts = QuantizeOptions(
        source=source,
        qtype=qtype,
        output=output,
        imatrix=imatrix,
        calibrate=calibrate,
        calib_ctx=calib_ctx,
        calib_chunks=calib_chunks,
        sweep=sweep,
        ref=ref,
        data=data,
        ctx=ctx,
        chunks=chunks,
        plot=plot,
        json_out=json_out,
        threads=threads,
    )
    run_quantize(opts, Console(highlight=False), err)


@app.command(name="eval")
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="GGUF file to evaluate."),
    data: Path = typer.Option(..., help="Text file (e.g. WikiText-2's test split)."),
    ref: Path | None = typer.Option(None, help="Reference model (same tokenizer) for KL etc."),
    ctx: int = typer.Option(512, help="Tokens per window; the second half of each is scored."),
    chunks: int | None = typer.Option(None, min=1, help="Most windows (default: all)."),
    gate: str | None = typer.Option(
        None, help='Quality gate, e.g. "kl_mean<0.05,ppl_ratio<1.05"; exit 3 when it fails.'
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON, not a table."),
    record: bool = typer.Option(True, help="Write results and verdict into the manifest."),
    threads: int = typer.Option(_threads(), min=1, help="CPU threads."),
) -> None:
    """Perplexity as llama.cpp computes it and, against --ref, KL divergence, top-1 agreement
    and the change of the correct token's probability. Results (and the --gate verdict) go
    into the model's manifest. Exit codes: 0 ok, 1 error, 3 gate failed.

    Example: edgellm eval m.Q4_K_M.gguf --ref m.f16.gguf --data wiki.txt --gate "kl_mean<0.05"
    """
    from edgellm.cli.compress import EvalOptions, run_eval

    opts = EvalOptions(
        model=model,
        ref=ref,
        data=data,
        ctx=ctx,
        chunks=chunks,
        gate=gate,
        json_out=json_out,
        record=record,
        threads=threads,
    )
    code = run_eval(opts, Console(highlight=False), err)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def plan(
    model: str = typer.Argument(
        "", help="GGUF file or a known size, e.g. deepseek-r1-distill-qwen-7b."
    ),
    device: str | None = typer.Option(None, help="A device from the catalog (--list-devices)."),
    here: bool = typer.Option(False, "--here", help="Measure this machine and run the model."),
    ctx: int = typer.Option(4096, help="Context per sequence, tokens."),
    concurrency: int = typer.Option(1, help="Sequences served at once."),
    qtype: str | None = typer.Option(None, "--type", "-t", help="Only this weight type."),
    cache_type: str = typer.Option("f16", help="KV cache type: f16, q8_0 or q4_0."),
    catalog: Path | None = typer.Option(None, help="Your own devices (TOML, as devices.toml)."),
    calibration: Path | None = typer.Option(None, help="Use a saved calibration."),
    save_calibration: Path | None = typer.Option(
        None, help="--here: save this machine's numbers and efficiency factors."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON, not a table."),
    plot: Path | None = typer.Option(None, help="Write a PNG of memory vs the device's."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List the catalog."),
    threads: int = typer.Option(_threads(), min=1, help="CPU threads for --here."),
) -> None:
    """Will MODEL run on a device, how fast, with which quantization: weight, KV cache and
    runtime memory per type, decode / aggregate / prefill tokens/s from the bandwidth and
    compute rooflines, and the best type that fits. --here measures this machine and a real
    run of the model, and reports estimate vs measured.

    Example: edgellm plan deepseek-r1-distill-qwen-7b --device jetson-orin-nano-8gb --ctx 8192

    Example: edgellm plan model.Q8_0.gguf --here --save-calibration here.json
    """
    from edgellm.cli.plan import PlanOptions, run_plan
    from edgellm.cli.plan import list_devices as show_devices

    if cache_type not in ("f16", "q8_0", "q4_0"):
        raise ValidationError("--cache-type must be f16, q8_0 or q4_0", param="cache_type")
    if list_devices:
        show_devices(catalog, Console(highlight=False))
        return
    if not model:
        raise ValidationError("plan needs a MODEL: a GGUF file or a known size", param="model")
    opts = PlanOptions(
        model=model,
        device=device,
        here=here,
        ctx=ctx,
        concurrency=concurrency,
        qtype=qtype,
        cache_type=cache_type,
        catalog=catalog,
        calibration=calibration,
        save_calibration=save_calibration,
        json_out=json_out,
        plot=plot,
        threads=threads,
    )
    run_plan(opts, Console(highlight=False), err)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
