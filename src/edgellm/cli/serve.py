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
from edgellm.settings import EngineSettings, ServerSettings


def settings_from_cli(
    model_path: Path | None, config: Path | None, flags: Mapping[str, Any]
) -> tuple[ServerSettings, EngineSettings]:
    """The settings `serve` runs with: `flags` (None: not given) over `EDGELLM_*` variables,
    over the config file (`config`, else `$EDGELLM_CONFIG`), over the models' defaults."""
    if model_path is not None:
        if flags.get("model") is not None:
            raise ValidationError("give the model once: MODEL_PATH or --model", param="model")
        flags = {**flags, "model": model_path}
    server = {k: v for k, v in flags.items() if k in ServerSettings.model_fields}
    engine = {k: v for k, v in flags.items() if k not in server}
    return ServerSettings.load(config, **server), EngineSettings.load(config, **engine)


@settings_options((ServerSettings, "Server"), (EngineSettings, "Engine"))
@user_errors
def serve(
    model_path: Path | None = typer.Argument(None, help="GGUF file; default: the embedded model."),
    insecure: bool = typer.Option(False, help="Allow a non-loopback bind without API keys."),
    config: Path | None = typer.Option(
        None, help="TOML config file with \\[server] and \\[engine] tables."
    ),
    **flags: Any,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Every Server and Engine option is also an EDGELLM_<NAME> environment variable and a key of
    the config file's \\[server] or \\[engine] table; a flag beats the environment, which beats
    the file.

    Example: edgellm serve --port 8000 --parallel 8
    then: curl http://127.0.0.1:8000/v1/models
    """
    server_settings, engine_settings = settings_from_cli(model_path, config, flags)

    from edgellm.server import create_app
    from edgellm.server.app import is_loopback
    from edgellm.server.connections import raise_open_files_limit
    from edgellm.server.keys import KeyStore
    from edgellm.server.logs import configure as configure_logging
    from edgellm.server.tls import server_context, warn_if_key_readable
    from edgellm.serving import prepare_model

    keys = KeyStore.open()  # the data directory's keys; a running server sees changes
    if not is_loopback(server_settings.host) and not insecure:
        check_keys_for_public_bind(server_settings, keys)
    tls = server_context(server_settings.tls_cert, server_settings.tls_key)  # checked first
    model = prepare_model(server_settings, engine_settings)
    configure_logging(server_settings.log_format, server_settings.log_level)
    warn_if_key_readable(server_settings.tls_key)
    app_ = create_app(server_settings, [model], keys=keys)
    raise_open_files_limit()
    uv = _uvicorn(app_, server_settings, tls)
    scheme = "https" if tls else "http"
    base = f"{scheme}://{server_settings.host}:{server_settings.port}/v1"

    def announce() -> None:
        model.engine.wait_loaded()
        if model.engine.load_error is not None:
            uv.should_exit = True
        elif server_settings.log_format == "json":  # every line of the log parses
            logging.getLogger("edgellm.server").info(
                "serving %s (version %s) at %s", model.model_id, model.version, base
            )
        else:
            err.print(f"edgellm: serving [bold]{model.model_id}[/bold] at {base}")

    threading.Thread(target=announce, daemon=True).start()
    gc.freeze()  # what start-up made lives on: the collector never rescans it (shorter pauses)
    uv.run()
    if model.engine.load_error is not None:
        raise EdgeLLMError(f"model failed to load: {model.engine.load_error}")
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
