"""`edgellm models promote | rollback | canary | fallback`: move a tag and say how it is
served beside its target (edgellm.registry.deploy). A running `edgellm serve` notices within a
second. Errors are one line, exit 1; a quality gate's refusal exits 3."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.markup import escape

from edgellm.cli.console import err, user_errors
from edgellm.cli.models_command import JSON, _echo_json, _registry, app
from edgellm.errors import ValidationError

if TYPE_CHECKING:
    from edgellm.registry import Deployment, Move

GATE_REFUSED = 3  # the exit status of a promote or canary the tag's gate refused
F = TypeVar("F", bound=Callable[..., Any])
TO = typer.Option(
    None, "--to", help="A version (SHA-256 prefix), another tag of the model, or NAME:TAG."
)
FORCE = typer.Option(
    False, "--force", help="Go past a failing quality gate (recorded in the audit log)."
)
DURATION_HELP = "800ms, 0.8s, 60s, 5m; a plain number is seconds."


def gate_exit(fn: F) -> F:
    """A gate's refusal as one line and exit 3 (inside user_errors, which makes others 1)."""
    from edgellm.registry.deploy import GateRefused

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GateRefused as exc:
            err.print(f"[red]error:[/red] {escape(exc.message)}")
            raise typer.Exit(GATE_REFUSED) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
@gate_exit
def promote(
    name: str = typer.Argument(..., help="NAME:TAG to move."),
    to: str | None = typer.Option(
        None,
        "--to",
        help="A version (SHA-256 prefix), another tag, or NAME:TAG; default: the "
        "running canary's candidate.",
    ),
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Point a tag at another version, ending its canary; a running server swaps to it with no
    failed request. Refused (exit 3) when the version fails the tag's gate, unless --force.

    Example: edgellm models promote smollm2:prod --to smollm2:q8
    """
    from edgellm.registry.deploy import promote as do_promote

    with _registry() as reg:
        move = do_promote(reg, name, to, force=force)
    _said_move(move, as_json)


@app.command()
@user_errors
def rollback(
    name: str = typer.Argument(..., help="NAME:TAG to move back."),
    as_json: bool = JSON,
) -> None:
    """Point a tag back at its previous version; again, and it goes one further back.

    Example: edgellm models rollback smollm2:prod
    """
    from edgellm.registry.deploy import rollback as do_rollback

    with _registry() as reg:
        move = do_rollback(reg, name)
    _said_move(move, as_json)


def _said_move(move: Move, as_json: bool) -> None:
    if as_json:
        _echo_json(move.as_json())
        return
    before = move.previous.short if move.previous else "-"
    done = {"promote": "promoted", "rollback": "rolled back"}.get(move.operation, move.operation)
    err.print(f"{done} [bold]{escape(move.ref)}[/bold]: {before} -> "
              f"{move.current.short}")  # fmt: skip
    if move.forced:
        err.print(f"[yellow]forced[/yellow] past the gate ({escape(move.gate_failure or '')}): "
                  "recorded in the audit log")  # fmt: skip


@app.command()
@user_errors
@gate_exit
def canary(
    name: str = typer.Argument(..., help="NAME:TAG."),
    to: str | None = TO,
    weight: float | None = typer.Option(
        None, "--weight", help="Percent of conversations sent to it, sticky per conversation."
    ),
    mirror: float | None = typer.Option(
        None, "--mirror", help="Percent of requests also copied to it; its answers discarded."
    ),
    end: bool = typer.Option(False, "--end", help="Stop the canary (and mirror)."),
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Send a share of a tag's conversations to another version (--weight) or copy a share
    of its requests to it (--mirror), beside its target, until `promote` or `canary --end`.

    Example: edgellm models canary smollm2:prod --to smollm2:q8 --weight 5
    """
    from edgellm.registry.deploy import check_percent, end_canary, start_canary

    if end:
        if to is not None or weight is not None or mirror is not None:
            raise ValidationError("--end takes no --to, --weight or --mirror")
        with _registry() as reg:
            deployment = end_canary(reg, name)
    else:
        if to is None:
            raise ValidationError("give --to VERSION|TAG (or --end)", param="to")
        if weight is None and mirror is None:
            raise ValidationError("give --weight PERCENT or --mirror PERCENT", param="weight")
        for value, param in ((weight, "weight"), (mirror, "mirror")):
            if value is not None:
                check_percent(value, param, allow_zero=False)
        with _registry() as reg:
            deployment = start_canary(reg, name, to, weight=weight or 0.0, mirror=mirror or 0.0,
                                      force=force)  # fmt: skip
    _said_deployment(deployment, as_json)


@app.command()
@user_errors
def fallback(
    name: str = typer.Argument(..., help="NAME:TAG."),
    to: str | None = TO,
    ttft_p99: str | None = typer.Option(
        None, "--ttft-p99", help=f"The objective: p99 time to first token. {DURATION_HELP}"
    ),
    window: str = typer.Option(
        "60s", "--window", help=f"The window the p99 is taken over. {DURATION_HELP}"
    ),
    off: bool = typer.Option(False, "--off", help="Remove the fallback."),
    as_json: bool = JSON,
) -> None:
    """Send new requests to a lighter version while the target's p99 time to first token
    over the window exceeds the objective, back once it stays under 80% of it for a window.

    Example: edgellm models fallback smollm2:prod --to smollm2:q4 --ttft-p99 800ms --window 60s
    """
    from edgellm.registry.deploy import clear_fallback, parse_duration, set_fallback

    if off:
        if to is not None or ttft_p99 is not None:
            raise ValidationError("--off takes no --to or --ttft-p99")
        with _registry() as reg:
            deployment = clear_fallback(reg, name)
    else:
        if to is None or ttft_p99 is None:
            raise ValidationError("give --to VERSION|TAG and --ttft-p99 DURATION (or --off)",
                                  param="to" if to is None else "ttft_p99")  # fmt: skip
        objective = parse_duration(ttft_p99, "--ttft-p99")
        span = parse_duration(window, "--window")
        with _registry() as reg:
            deployment = set_fallback(reg, name, to, ttft_p99_s=objective, window_s=span)
    _said_deployment(deployment, as_json)


def _said_deployment(deployment: Deployment, as_json: bool) -> None:
    if as_json:
        _echo_json(deployment.as_json())
        return
    for line in deployment_lines(deployment):
        err.print(f"{escape(deployment.ref)}: {escape(line)}")


def deployment_lines(d: Deployment) -> list[str]:
    """What `show` and these commands print of a deployment, one fact a line."""
    lines = [f"target {d.target.short}", f"gate {d.gate or 'none'}"]
    if d.candidate is None:
        lines.append("canary none")
    else:
        shares = [f"{d.weight:g}% of conversations" if d.weight else "",
                  f"a copy of {d.mirror:g}% of requests (mirror)" if d.mirror else ""]  # fmt: skip
        lines.append(f"canary {d.candidate.short}: " + ", ".join(s for s in shares if s))
    if d.fallback is None:
        lines.append("fallback none")
    else:
        lines.append(f"fallback {d.fallback.short} while the p99 TTFT over {d.window_s:g}s "
                     f"exceeds {d.ttft_p99_s or 0:g}s")  # fmt: skip
    return lines


@app.command()
@user_errors
def compare(
    name: str = typer.Argument(..., help="The served name, as clients send it (NAME:TAG)."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The running server."),
    api_key: str | None = typer.Option(
        None, help="A metrics or admin key, when the server has keys; else $EDGELLM_API_KEY."
    ),
    as_json: bool = JSON,
) -> None:
    """Compare the versions of a served name from the server's metrics: requests, errors,
    TTFT and end-to-end p50/p99, tokens/s, mirror agreement. Figures since the server started.

    Example: edgellm models compare smollm2:prod --url http://127.0.0.1:8000
    """
    import os

    import httpx

    from edgellm.errors import EdgeLLMError
    from edgellm.server.lifecycle.compare import summarize

    key = api_key or os.environ.get("EDGELLM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise EdgeLLMError(f"cannot reach {url}: {exc}") from None
    if response.status_code in (401, 403):
        raise EdgeLLMError(f"{url} refused the metrics ({response.status_code}): give --api-key")
    if response.status_code != 200:
        raise EdgeLLMError(f"{url}/metrics answered {response.status_code}")
    shown = name.removesuffix(":latest")
    summaries = summarize(response.text, shown)
    if not summaries:
        raise ValidationError(f"{url} has served no request of {shown} yet", param="name")
    if as_json:
        _echo_json({"name": shown, "versions": [s.as_json() for s in summaries]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{shown}: versions since the server started")
    for column in ("version", "requests", "mirrored", "errors", "TTFT p50", "TTFT p99",
                   "E2E p50", "E2E p99", "tokens/s", "mirror agreement"):  # fmt: skip
        table.add_column(column, justify="left" if column == "version" else "right", no_wrap=True)
    for s in summaries:
        table.add_row(
            s.version, f"{s.requests:.0f}", f"{s.mirrored:.0f}", f"{s.errors:.0f}",
            _secs(s.quantile("ttft", 0.5)), _secs(s.quantile("ttft", 0.99)),
            _secs(s.quantile("e2e", 0.5)), _secs(s.quantile("e2e", 0.99)),
            "-" if s.tokens_per_s is None else f"{s.tokens_per_s:.1f}",
            "-" if s.agreement is None else f"{s.agreement:.0%}",
        )  # fmt: skip
    import sys

    Console(width=None if sys.stdout.isatty() else 140).print(table)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
