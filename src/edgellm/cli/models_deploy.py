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
