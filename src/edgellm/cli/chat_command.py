"""`edgellm chat`'s options; the chat itself is `edgellm.cli.chat.run_chat`."""

from __future__ import annotations

import typer

from edgellm.cli.console import user_errors


@user_errors
def chat(
    url: str | None = typer.Option(None, help="A running server's /v1 URL; default: in-process."),
    model: str | None = typer.Option(None, help="Model name (with --url) or GGUF path."),
    system: str | None = typer.Option(None, help="System prompt."),
    temperature: float | None = typer.Option(
        None, min=0.0, max=2.0, help="Sampling temperature.", show_default="the model's"
    ),
    max_tokens: int | None = typer.Option(
        None, min=1, max=1 << 20, help="Most tokens per reply.", show_default="the model's"
    ),
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
