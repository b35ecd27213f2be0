"""`edgellm`: serve, chat, and (later) plan, quantize, eval, bench."""

from __future__ import annotations

import ipaddress
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

from edgellm import __version__
from edgellm.errors import EdgeLLMError

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
            err.print(f"[red]error:[/red] {exc.message}")
            raise typer.Exit(1) from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            err.print(f"[red]error:[/red] invalid setting {where}: {first['msg']}")
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
@user_errors
def serve(
    model_path: Path | None = typer.Argument(None, help="GGUF file; default: the embedded model."),
    host: str | None = typer.Option(None, help="Address to bind [default: 127.0.0.1]."),
    port: int | None = typer.Option(None, help="Port [default: 8000]."),
    ctx: int | None = typer.Option(
        None, help="KV cache cells shared by all requests [default: 4096]."
    ),
    parallel: int | None = typer.Option(None, help="Most requests decoding at once [default: 8]."),
    batch: int | None = typer.Option(
        None, help="Most tokens per step; prefill chunk [default: 256]."
    ),
    threads: int | None = typer.Option(None, help="CPU threads [default: all cores]."),
    max_queue: int | None = typer.Option(
        None, help="Most waiting requests before 503 [default: 64]."
    ),
    flash_attn: bool | None = typer.Option(
        None, "--flash-attn/--no-flash-attn", help="Flash attention."
    ),
    deterministic: bool | None = typer.Option(
        None,
        "--deterministic/--shared-kv",
        help="One KV stream of ctx/parallel cells per sequence: greedy output independent of "
        "batching [default: shared pool].",
    ),
    model_id: str | None = typer.Option(None, help="Model name for clients [default: from file]."),
    insecure: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    config: Path | None = typer.Option(None, help="TOML config file with [server] and [engine]."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Example: edgellm serve --port 8000 --parallel 8
    then: curl http://127.0.0.1:8000/v1/models
    """
    import uvicorn

    from edgellm.server import create_app
    from edgellm.serving import prepare_model
    from edgellm.settings import EngineSettings, ServerSettings

    server_settings = ServerSettings.load(
        config, model=model_path, host=host, port=port, model_id=model_id
    )
    engine_settings = EngineSettings.load(
        config,
        ctx=ctx,
        parallel=parallel,
        batch=batch,
        threads=threads,
        max_queue=max_queue,
        flash_attn=flash_attn,
        deterministic=deterministic,
    )
    if not _is_loopback(server_settings.host) and not insecure:
        raise EdgeLLMError(
            f"refusing to bind {server_settings.host} without API keys; "
            "bind 127.0.0.1 or pass --insecure"
        )
    model = prepare_model(server_settings, engine_settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app_ = create_app(server_settings, [model])
    uv = uvicorn.Server(
        uvicorn.Config(
            app_,
            host=server_settings.host,
            port=server_settings.port,
            log_level=server_settings.log_level,
            timeout_graceful_shutdown=5,
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
