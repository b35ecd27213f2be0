"""`edgellm fleet --workers FILE ...`: one operation over every worker of a fleet, through
their admin API (edgellm.fleet): status, fleet-wide keys, pulls, and rolling promote /
rollback / canary. Errors are one line, exit 1; a quality gate's refusal exits 3."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import typer
from rich.markup import escape

from edgellm.cli.console import err, user_errors
from edgellm.cli.keys_command import bad_input
from edgellm.cli.models_deploy import GATE_REFUSED

if TYPE_CHECKING:
    from edgellm.fleet import Operation, Worker

app = typer.Typer(
    name="fleet",
    help="Operate a fleet of edgellm workers through their admin API: status, keys, models.",
    no_args_is_help=True,
)
keys_app = typer.Typer(name="keys", help="One API key valid on every worker.", no_args_is_help=True)
models_app = typer.Typer(
    name="models", help="Pull, and roll promote / rollback / canary worker by worker.",
    no_args_is_help=True,
)  # fmt: skip
app.add_typer(keys_app)
app.add_typer(models_app)

JSON = typer.Option(False, "--json", help="Print JSON to stdout.")
SETTLE = typer.Option(
    "4s", "--settle", help="How long a drained worker waits before it swaps: HAProxy's "
    "agent-inter (2s) twice. 0 for none; 800ms, 4s, 1m.",
)  # fmt: skip
TIMEOUT = typer.Option(
    "120s", "--timeout", help="How long a worker's step may take (the swap until healthy)."
)
FORCE = typer.Option(
    False, "--force", help="Go past a failing quality gate (recorded in each worker's audit log)."
)


@dataclass(frozen=True, slots=True)
class FleetArgs:
    workers: Path
    api_key: str | None
    cacert: Path | None


@app.callback()
def fleet(
    ctx: typer.Context,
    workers: Path = typer.Option(
        ...,
        "--workers",
        help="A file with one worker URL a line (http://10.0.0.11:8000); "
        "# comments and blank lines are skipped.",
        show_default=False,
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="EDGELLM_API_KEY", help="An admin key every worker takes."
    ),
    cacert: Path | None = typer.Option(
        None, "--cacert", help="The CA that signed https workers' certificates (PEM)."
    ),
) -> None:
    """Apply an operation to every worker in FILE through its admin API and report per worker.

    Example: edgellm fleet --workers workers.txt models promote smollm2:prod --to smollm2:q8
    """  # fmt: skip
    ctx.obj = FleetArgs(workers, api_key, cacert)


@contextmanager
def _workers(ctx: typer.Context) -> Iterator[list[Worker]]:
    from edgellm.fleet import connect, read_workers

    args: FleetArgs = ctx.obj
    verify: str | bool = str(args.cacert) if args.cacert is not None else True
    workers = connect(read_workers(args.workers), args.api_key, verify)
    try:
        yield workers
    finally:
        for worker in workers:
            worker.close()


def _seconds(text: str, flag: str, *, zero: bool = False) -> float:
    from edgellm.registry.deploy import parse_duration

    if zero and text.strip() in ("0", "0s", "0ms"):
        return 0.0
    return parse_duration(text, flag)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


# -- status ----------------------------------------------------------------------------------


@app.command()
@user_errors
def status(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Each worker's health (ready, maintenance, draining, loading, down, unreachable,
    refused), served models and their versions, requests running and waiting, KV cache use.
    Exits 1 when a worker could not be asked.

    Example: edgellm fleet --workers workers.txt status
    """
    from edgellm.fleet import WorkerError, each

    def look(worker: Worker) -> dict[str, Any]:
        found = worker.get("/admin/status")
        code, body = worker.ready()
        return {"url": worker.url, "health": _health(found, code, body), **found}

    with _workers(ctx) as workers:
        answers = each(workers, look)
    rows: list[dict[str, Any]] = []
    for worker, answer in zip(workers, answers, strict=True):
        if isinstance(answer, WorkerError):
            health = "unreachable" if answer.status is None else "refused"
            rows.append({"url": worker.url, "health": health, "error": answer.message})
        else:
            rows.append(answer)
    if as_json:
        _echo_json(rows)
    else:
        _status_table(rows)
    if any("error" in row for row in rows):
        raise typer.Exit(1)


def _health(found: dict[str, Any], code: int, ready: dict[str, Any]) -> str:
    if found.get("draining"):
        return "draining"
    if found.get("problem") or ready.get("status") == "error":
        return "down"
    if code != 200:
        return str(ready.get("status") or "not ready")  # loading
    return "maintenance" if found.get("maintenance") else "ready"


def _status_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"ready": "green", "maintenance": "yellow", "loading": "yellow"}
    table = Table("worker", "health", "models", "running", "waiting", "KV cache", "edgellm")
    for row in rows:
        colour = colours.get(row["health"], "red")
        health = f"[{colour}]{row['health']}[/{colour}]"
        if "error" in row:
            table.add_row(escape(row["url"]), health, escape(row["error"]), "-", "-", "-", "-")
            continue
        models = "\n".join(_served(name, entry) for name, entry in row["models"].items())
        used, total = row["kv_cells_used"], row["kv_cells_total"]
        kv = f"{used}/{total} ({used / total:.0%})" if total else "-"
        table.add_row(escape(row["url"]), health, escape(models) or "-", str(row["running"]),
                      str(row["waiting"]), kv, escape(row["edgellm"]))  # fmt: skip
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _served(name: str, entry: dict[str, Any]) -> str:
    said = f"{name} {entry.get('version')}" + ("" if entry.get("loaded") else " (not loaded)")
    if entry.get("loading_version"):
        said += f", loading {entry['loading_version']}"
    canary = entry.get("canary")
    if canary:
        said += f", canary {canary['version']} {canary['weight']:g}%"
    return said


# -- keys ------------------------------------------------------------------------------------


@keys_app.command("create")
@user_errors
@bad_input
def keys_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="What the key is called on every worker."),
    role: str | None = typer.Option(
        None,
        help="admin (everything), user (inference and listings), metrics (/metrics).",
        show_default=False,
    ),
    models: str | None = typer.Option(
        None,
        help="Models a user key may use, comma-separated (default: every model).",
        show_default=False,
    ),
    rpm: str | None = typer.Option(None, metavar="N", help="Requests per minute at most."),
    tpm: str | None = typer.Option(None, metavar="N", help="Tokens per minute at most."),
    max_concurrent: str | None = typer.Option(
        None, "--max-concurrent", metavar="N", help="Requests in flight at most."
    ),
    expires: str | None = typer.Option(
        None, metavar="YYYY-MM-DD", help="The last day (UTC) the key works (default: never)."
    ),
    as_json: bool = JSON,
) -> None:
    """Make one API key here and store only its hash on every worker; print it, once. Limits
    (rpm, tpm, concurrency) count per worker.

    Example: edgellm fleet --workers workers.txt keys create alice --role user --rpm 60
    """
    from edgellm.fleet import FleetError, WorkerError, reachable
    from edgellm.keystore import PREFIX_CHARS, KeySpec, key_digest, new_key

    given = {"name": name, "role": role, "models": models, "rpm": rpm, "tpm": tpm}
    given |= {"max_concurrent": max_concurrent, "expires": expires}
    spec = KeySpec.model_validate({k: v for k, v in given.items() if v is not None})
    key = new_key()
    body = {**spec.model_dump(mode="json", exclude_none=True),
            "prefix": key[:PREFIX_CHARS], "sha256": key_digest(key.encode()).hex()}  # fmt: skip
    stored: list[str] = []
    with _workers(ctx) as workers:
        reachable(workers)
        _name_free_everywhere(workers, name)
        for worker in workers:
            try:
                info = worker.post("/admin/keys", body)
            except WorkerError as exc:
                left = [w.url for w in workers[len(stored) + 1 :]]
                said = f"{exc.message}; stored on: {', '.join(stored) or 'none'}"
                if stored:  # the key is never shown: those copies are of no use to anyone
                    said += f" (revoke it there: keys revoke {name})"
                raise FleetError(f"{said}; not tried: {', '.join(left) or 'none'}") from None
            stored.append(worker.url)
            err.print(f"{escape(worker.url)}: stored '{escape(name)}' ({info.get('prefix')}...)")
    if as_json:
        typer.echo(json.dumps({"key": key, **info, "workers": stored}))
    else:
        typer.echo(key)
    err.print(f"[yellow]warning:[/yellow] this is the only time the key '{escape(name)}' is "
              f"shown: store it now (the {len(stored)} workers keep only its hash)")  # fmt: skip


def _name_free_everywhere(workers: list[Any], name: str) -> None:
    """Before anything is stored: every worker keeps keys and has none named `name` (a key
    stored on some workers only is of no use: its secret is shown once, after all took it)."""
    from edgellm.fleet import FleetError, WorkerError, each

    def ask(worker: Any) -> str | None:
        try:
            worker.get(f"/admin/keys/{quote(name, safe='')}")
        except WorkerError as exc:
            return None if exc.status == 404 else exc.message
        return f"{worker.url}: a key named '{name}' exists already (names are never reused)"

    found = [said for said in each(workers, ask) if said is not None]
    if found:
        raise FleetError("; ".join(str(s) for s in found) + ": nothing was stored")


@keys_app.command("revoke")
@user_errors
def keys_revoke(
    ctx: typer.Context, name: str = typer.Argument(..., help="The key's name.")
) -> None:
    """Revoke a key on every worker that answers (one that does not is named; exit 1): a
    leaked key should stop where it can at once.

    Example: edgellm fleet --workers workers.txt keys revoke alice
    """
    from edgellm.fleet import FleetError, WorkerError, each

    with _workers(ctx) as workers:
        answers = each(workers, lambda w: w.post(f"/admin/keys/{quote(name, safe='')}/revoke"))
    failed = []
    for worker, answer in zip(workers, answers, strict=True):
        if isinstance(answer, WorkerError):
            failed.append(answer.message)
        else:
            err.print(f"{escape(worker.url)}: '{escape(name)}' revoked since "
                      f"{answer.get('revoked_at')}")  # fmt: skip
    if failed:
        raise FleetError(f"not revoked on {len(failed)} of {len(workers)} workers: "
                         + "; ".join(failed))  # fmt: skip


# -- models ----------------------------------------------------------------------------------


@models_app.command("pull")
@user_errors
def models_pull(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="https:// or http:// URL, or hf://ORG/REPO/FILE.gguf"),
    name: str = typer.Option(..., "--name", help="NAME[:TAG] to register it as."),
    sha256: str | None = typer.Option(None, help="The file's expected SHA-256 (hex)."),
    timeout: str = typer.Option("1h", "--timeout", help="How long one worker's pull may take."),
    as_json: bool = JSON,
) -> None:
    """Have every worker download SOURCE into its own registry, one after another (each
    fetches it itself: the source must be reachable from the workers), and check they all
    hold the same bytes. Serving does not change.

    Example: edgellm fleet --workers workers.txt models pull https://mirror/m-q8.gguf --name m:q8
    """
    from edgellm.fleet import FleetError, WorkerError, reachable

    wait = _seconds(timeout, "--timeout")
    body = {"source": source, "name": name, **({"sha256": sha256} if sha256 else {})}
    pulled: list[dict[str, Any]] = []
    with _workers(ctx) as workers:
        reachable(workers)
        for worker in workers:
            try:
                answer = worker.post("/admin/models/pull", body, timeout_s=wait)
            except WorkerError as exc:
                done = ", ".join(p["url"] for p in pulled) or "none"
                raise FleetError(f"{exc.message}; pulled on: {done}") from None
            pulled.append({"url": worker.url, **answer})
            err.print(f"{escape(worker.url)}: pulled {escape(answer['name'])} "
                      f"{answer['version']}")  # fmt: skip
            for notice in answer.get("notices", []):
                err.print(f"[yellow]warning:[/yellow] {escape(worker.url)}: {escape(notice)}")
    hashes = {p["sha256"] for p in pulled}
    if as_json:
        _echo_json(pulled)
    if len(hashes) > 1:
        said = "; ".join(f"{p['url']}: {p['version']}" for p in pulled)
        raise FleetError(f"the workers got different bytes for {source} ({said}): give --sha256")


def _rolling(ctx: typer.Context, operation: Operation, settle: str, timeout: str,
             as_json: bool) -> None:  # fmt: skip
    from edgellm.fleet import roll

    settle_s = _seconds(settle, "--settle", zero=True)
    timeout_s = _seconds(timeout, "--timeout")
    with _workers(ctx) as workers:
        report = roll(workers, operation, settle_s=settle_s, timeout_s=timeout_s,
                      say=lambda line: err.print(escape(line)))  # fmt: skip
    if as_json:
        _echo_json(report.as_json())
    failed = report.failed
    if failed is None:
        err.print(escape(report.summary()[0]))
        return
    lines = report.summary()
    err.print(f"[red]error:[/red] {escape(lines[0])}")
    for line in lines[1:]:
        err.print(escape(line))
    raise typer.Exit(GATE_REFUSED if failed.code == "gate_failed" else 1)


@models_app.command("promote")
@user_errors
def models_promote(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="NAME:TAG to move on every worker."),
    to: str | None = typer.Option(
        None,
        "--to",
        help="A version (SHA-256 prefix), another tag, or NAME:TAG; default: the "
        "running canary's candidate.",
    ),
    force: bool = FORCE,
    settle: str = SETTLE,
    timeout: str = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Point a tag at another version on every worker, one at a time: drained through the
    agent check, swapped, checked healthy, back in rotation, then the next. Workers that are
    there already are skipped. A worker that fails stops the rollout (exit 1; 3 for a gate).

    Example: edgellm fleet --workers workers.txt models promote smollm2:prod --to 3f2a9c
    """
    from edgellm.fleet import Operation

    _rolling(ctx, Operation.promote(name, to, force=force), settle, timeout, as_json)


@models_app.command("rollback")
@user_errors
def models_rollback(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="NAME:TAG to move back on every worker."),
    settle: str = SETTLE,
    timeout: str = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Point a tag back at its previous version on every worker, rolling as promote does.
    Run again, it goes one further back everywhere: after a stopped rollback, roll back only
    the workers not touched (a workers file of those).

    Example: edgellm fleet --workers workers.txt models rollback smollm2:prod
    """
    from edgellm.fleet import Operation

    _rolling(ctx, Operation.rollback(name), settle, timeout, as_json)


@models_app.command("canary")
@user_errors
def models_canary(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="NAME:TAG."),
    to: str | None = typer.Option(None, "--to", help="The candidate: a version or a tag."),
    weight: float | None = typer.Option(
        None, "--weight", help="Percent of conversations sent to it, on every worker."
    ),
    mirror: float | None = typer.Option(
        None, "--mirror", help="Percent of requests also copied to it; its answers discarded."
    ),
    end: bool = typer.Option(False, "--end", help="Stop the canary on every worker."),
    force: bool = FORCE,
    settle: str = SETTLE,
    timeout: str = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Start (or change, or --end) a canary on every worker, rolling as promote does.

    Example: edgellm fleet --workers workers.txt models canary smollm2:prod --to q8 --weight 5
    """
    from edgellm.errors import ValidationError
    from edgellm.fleet import Operation
    from edgellm.registry.deploy import check_percent

    if end:
        if to is not None or weight is not None or mirror is not None:
            raise ValidationError("--end takes no --to, --weight or --mirror")
        operation = Operation.end_canary(name)
    else:
        if to is None:
            raise ValidationError("give --to VERSION|TAG (or --end)", param="to")
        if weight is None and mirror is None:
            raise ValidationError("give --weight PERCENT or --mirror PERCENT", param="weight")
        for value, param in ((weight, "weight"), (mirror, "mirror")):
            if value is not None:
                check_percent(value, param, allow_zero=False)
        operation = Operation.canary(name, to, weight=weight or 0.0, mirror=mirror or 0.0,
                                     force=force)  # fmt: skip
    _rolling(ctx, operation, settle, timeout, as_json)
