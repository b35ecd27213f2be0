"""`edgellm keys ...`: the API keys a server accepts, in the data directory's database
(`$EDGELLM_HOME/edgellm.db`). A running server sees a change within a second."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.cli.console import err, user_errors

if TYPE_CHECKING:  # the store loads only when a command runs
    from edgellm.keystore import KeyInfo, KeyStore

app = typer.Typer(
    name="keys",
    help="API keys with roles, model scopes and quotas: create, list, revoke.",
    no_args_is_help=True,
)
F = TypeVar("F", bound=Callable[..., Any])
FLAGS = {"max_concurrent": "--max-concurrent"}  # fields whose flag is not --<field>


def bad_input(fn: F) -> F:
    """A value the user typed that is not valid: one line naming the flag, exit 2 (the usage
    error code, as for an unknown flag)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            flag = FLAGS.get(field, f"--{field}") if field else "the options"
            message = str(first["msg"]).removeprefix("Value error, ")
            said = f"{flag} is required" if first["type"] == "missing" else f"{flag}: {message}"
            err.print(f"[red]error:[/red] {escape(said)}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _store() -> KeyStore:
    from edgellm.keystore import KeyStore

    return KeyStore.open()


@app.command()
@user_errors
@bad_input
def create(
    name: str | None = typer.Option(
        None, help="What the key is called (logs and the audit log name it).", show_default=False
    ),
    role: str | None = typer.Option(
        None,
        help="admin (everything), user (inference and listings), metrics (/metrics only).",
        show_default=False,
    ),
    models: str | None = typer.Option(
        None,
        help="Models a user key may use, comma-separated (default: every model).",
        show_default=False,
    ),
    rpm: str | None = typer.Option(None, metavar="N", help="Requests per minute at most."),
    tpm: str | None = typer.Option(
        None, metavar="N", help="Prompt + completion tokens per minute at most."
    ),
    max_concurrent: str | None = typer.Option(
        None, "--max-concurrent", metavar="N", help="Requests in flight at most."
    ),
    expires: str | None = typer.Option(
        None, metavar="YYYY-MM-DD", help="The last day (UTC) the key works (default: never)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the key and its settings as JSON."),
) -> None:
    """Create an API key and print it, once: only its hash is stored, it cannot be shown again.

    Example: edgellm keys create --name alice --role user --models smollm2-135m-instruct --rpm 60
    """
    from edgellm.keystore import KeySpec

    given = {"name": name, "role": role, "models": models, "rpm": rpm, "tpm": tpm}
    given |= {"max_concurrent": max_concurrent, "expires": expires}
    spec = KeySpec.model_validate({k: v for k, v in given.items() if v is not None})
    store = _store()
    try:
        key, info = store.create(spec)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({"key": key, **info.as_json()}))
    else:
        typer.echo(key)
    err.print(
        f"[yellow]warning:[/yellow] this is the only time the key '{escape(info.name)}' is "
        "shown: store it now (only its hash is kept)"
    )
    if info.state() == "expired":
        err.print(f"[yellow]warning:[/yellow] it expired on {info.expires}: it will not work")


@app.command("list")
@user_errors
def list_keys(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the keys (never their secrets): name, prefix, role, models, limits, state.

    Example: edgellm keys list --json
    """
    store = _store()
    try:
        keys = store.all_keys()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([k.as_json() for k in keys], indent=2))
        return
    wide = None if sys.stdout.isatty() else 200  # piped: no terminal's width to fit
    Console(highlight=False, width=wide).print(_table(keys))


def _table(keys: list[KeyInfo]) -> Table | str:
    if not keys:
        return "no keys: create one with `edgellm keys create --name NAME --role ROLE`"
    table = Table("name", "prefix", "role", "models", "rpm", "tpm", "concurrent", "expires",
                  "created", "state")  # fmt: skip
    colours = {"active": "green", "revoked": "red", "expired": "yellow"}

    def shown(value: object) -> str:
        return "-" if value is None else escape(str(value))

    for k in keys:
        state = k.state()
        table.add_row(
            escape(k.name), k.prefix + "...", k.role,
            escape(",".join(k.models)) if k.models is not None else "all",
            shown(k.rpm), shown(k.tpm), shown(k.max_concurrent), shown(k.expires),
            k.created_at, f"[{colours[state]}]{state}[/{colours[state]}]",
        )  # fmt: skip
    return table


@app.command()
@user_errors
def revoke(
    name: str | None = typer.Argument(None, help="The key's name.", show_default=False),
) -> None:
    """Revoke a key: a running server refuses it within a second. Its row stays (the audit log
    names it), so its name is never used again.

    Example: edgellm keys revoke alice
    """
    if name is None:
        err.print("[red]error:[/red] NAME is required: edgellm keys revoke NAME")
        raise typer.Exit(2)
    store = _store()
    try:
        info = store.revoke(name)
    finally:
        store.close()
    err.print(
        f"the key '{escape(info.name)}' ({info.prefix}...) is revoked since {info.revoked_at}"
    )
