"""`edgellm`: the app and its commands, each group in its own module."""

from __future__ import annotations

import sys

import typer

from edgellm import __version__
from edgellm.cli import (
    audit_command,
    bench,
    chat_command,
    compress,
    compress_command,
    distill_command,
    export_command,
    fleet_command,
    gateway_command,
    keys_command,
    models_command,
    plan,
    prune_command,
    serve,
    tls_command,
)

app = typer.Typer(
    name="edgellm",
    help="Run language models privately on hardware you own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


app.command()(serve.serve)
app.command()(chat_command.chat)
app.command()(bench.bench)
app.command()(compress.convert)
app.command()(compress.quantize)
app.command(name="eval")(compress.evaluate)
app.command()(distill_command.distill)
app.command()(compress_command.compress)
app.command()(plan.plan)
app.command()(export_command.export)
app.command()(prune_command.prune)
app.add_typer(keys_command.app)
app.add_typer(gateway_command.app)
app.add_typer(fleet_command.app)
app.add_typer(models_command.app)
app.add_typer(tls_command.app)
app.add_typer(audit_command.app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
