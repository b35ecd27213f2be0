"""`edgellm serve`: its flags are the settings models' fields (edgellm.cli.options)."""

from __future__ import annotations

import gc
import logging
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from edgellm.cli.console import err, user_errors
from edgellm.cli.options import settings_options
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.settings import EngineSettings, ModelsSettings, ServerSettings


def settings_from_cli(
    model_path: list[str] | str | Path | None, config: Path | None, flags: Mapping[str, Any]
) -> tuple[ServerSettings, EngineSettings, ModelsSettings]:
    """The settings `serve` runs with: `flags` (None: not given) over `EDGELLM_*` variables,
    over the config file (`config`, else `$EDGELLM_CONFIG`), over the models' defaults.
    `model_path`: the command's arguments (one: the model, as --model; several: names)."""
    given = [str(model_path)] if isinstance(model_path, str | Path) else list(model_path or [])
    if given:
        if flags.get("model") is not None or flags.get("names") is not None:
            raise ValidationError("give the model once: MODEL_PATH or --model", param="model")
        if len(given) == 1:
            flags = {**flags, "model": Path(given[0])}
        else:
            flags = {**flags, "names": ",".join(given)}
    server = {k: v for k, v in flags.items() if k in ServerSettings.model_fields}
    models = {k: v for k, v in flags.items() if k in ModelsSettings.model_fields}
    engine = {k: v for k, v in flags.items() if k not in server and k not in models}
    return (
        ServerSettings.load(config, **server),
        EngineSettings.load(config, **engine),
        ModelsSettings.load(config, **models),
    )


@settings_options(
    (ServerSettings, "Server"), (EngineSettings, "Engine"), (ModelsSettings, "Models")
)
@user_errors
def serve(
    model_path: list[str] | None = typer.Argument(
        None,
        help="GGUF file or registry NAME[:TAG]; several registry names to serve them all; "
        "default: the embedded model.",
        show_default=False,
    ),
    insecure: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    config: Path | None = typer.Option(
        None, help="TOML config file with \\[server] and \\[engine] tables."
    ),
    **flags: Any,
) -> None:
    """Serve models over OpenAI- and Ollama-compatible HTTP APIs with continuous batching.

    Registry models (edgellm models) load on their first request and follow their tags: a
    promote, rollback or canary takes effect within a second, without failing a request.

    Every Server, Engine and Models option is also an EDGELLM_<NAME> environment variable and
    a key of the config file's \\[server], \\[engine] or \\[models] table; a flag beats the
    environment, which beats the file.

    Example: edgellm serve --port 8000 --parallel 8; edgellm serve smollm2:prod r1:q4
    --max-memory 6G
    then: curl http://127.0.0.1:8000/v1/models
    """
    server_settings, engine_settings, models_settings = settings_from_cli(model_path, config, flags)

    from edgellm.server import create_app
    from edgellm.server.app import is_loopback
    from edgellm.server.connections import raise_open_files_limit
    from edgellm.server.keys import KeyStore
    from edgellm.server.logs import configure as configure_logging
    from edgellm.server.tls import server_context, warn_if_key_readable
    from edgellm.serving import model_table

    keys = KeyStore.open()  # the data directory's keys; a running server sees changes
    if not is_loopback(server_settings.host) and not insecure:
        check_keys_for_public_bind(server_settings, keys)
    tls = server_context(server_settings.tls_cert, server_settings.tls_key)  # checked first
    table = model_table(server_settings, engine_settings, models_settings)
    configure_logging(server_settings.log_format, server_settings.log_level)
    warn_if_key_readable(server_settings.tls_key)
    app_ = create_app(server_settings, table, keys=keys)
    raise_open_files_limit()
    uv = _uvicorn(app_, server_settings, tls)
    scheme = "https" if tls else "http"
    base = f"{scheme}://{server_settings.host}:{server_settings.port}/v1"

    failure: list[str] = []

    def announce() -> None:
        problem = table.wait_preloaded()
        if problem is not None:
            failure.append(problem)
            uv.should_exit = True
            return
        names = [s.model_id for s in table.slots()]
        versions = [table.card(s).version for s in table.slots()]
        if server_settings.log_format == "json":  # every line of the log parses
            logging.getLogger("edgellm.server").info(
                "serving %s (version %s) at %s", ", ".join(names), ", ".join(versions), base
            )
        else:
            shown = ", ".join(f"[bold]{n}[/bold]" for n in names)
            err.print(f"edgellm: serving {shown} at {base}")

    threading.Thread(target=announce, daemon=True).start()
    gc.freeze()  # what start-up made lives on: the collector never rescans it (shorter pauses)
    uv.run()
    if failure:
        raise EdgeLLMError(f"model failed to load: {failure[0]}")
    if not uv.started:
        raise typer.Exit(1)


def check_keys_for_public_bind(settings: ServerSettings, keys: Any) -> None:
    """A bind other than loopback needs auth on: an active key in `keys` (a KeyStore) or
    --api-key; else EdgeLLMError."""
    from edgellm.server.keys import KeyRing

    if not KeyRing(keys, api_key=settings.api_key).enforced:
        raise EdgeLLMError(
            f"refusing to bind {settings.host} without API keys; bind 127.0.0.1, create one "
            "(edgellm keys create), set --api-key, or pass --insecure"
        )


def _uvicorn(app: Any, settings: ServerSettings, tls: ssl.SSLContext | None) -> Any:
    """The uvicorn server for `app`, with the connection limits of `settings`, over `tls`
    (None: plain HTTP)."""
    import uvicorn

    from edgellm.server import tls as server_tls
    from edgellm.server.connections import uvicorn_options
    from edgellm.server.process import DrainingServer

    return DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,  # keep the handlers of edgellm.server.logs.configure
            timeout_graceful_shutdown=settings.shutdown_timeout,
            **uvicorn_options(
                header_timeout_s=settings.header_timeout,
                keep_alive_s=settings.keep_alive,
                max_connections=settings.max_connections,
            ),
            **server_tls.uvicorn_options(tls),
        ),
        drain=app.state.drain,
        drain_timeout_s=settings.drain_timeout,
    )
