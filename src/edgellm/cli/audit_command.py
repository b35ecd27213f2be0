"""`edgellm audit ...`: check, export and follow the audit log (`$EDGELLM_HOME/edgellm.db`, its
key `$EDGELLM_HOME/audit.key`). The database is only read, never changed."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.markup import escape

from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError

app = typer.Typer(
    name="audit",
    help="The tamper-evident audit log: verify its chain, export it, follow it.",
    no_args_is_help=True,
)
F = TypeVar("F", bound=Callable[..., Any])
TAMPERED = 3  # exit code: the log is not what was written

DB_HELP = "The database to read (a copy will do). Default: $EDGELLM_HOME/edgellm.db."
SINCE_HELP = (
    "Records of requests that arrived at or after this: an ISO 8601 date or time (UTC unless "
    "it names its offset: 2025-01-31, 2025-01-31T12:00Z) or an age (30m, 12h, 7d)."
)


class Format(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


def bad_input(fn: F) -> F:
    """A value the user typed that is not valid: one line naming the flag, exit 2 (the usage
    error code, as for an unknown flag)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            err.print(f"[red]error:[/red] {escape(exc.message)}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _db(path: Path | None) -> Path:
    from edgellm.store import db_path

    return path or db_path()


@app.command()
@user_errors
@bad_input
def verify(
    since: str | None = typer.Option(
        None, help=SINCE_HELP + " Checks from the first such record, trusting where it starts."
    ),
    anchor: str | None = typer.Option(
        None,
        help="SEQ:MAC of a record kept elsewhere (the last line of an earlier verify): fails "
        "when that record was deleted or changed, which is how a cut-off end shows.",
    ),
    db: Path | None = typer.Option(None, help=DB_HELP),
    key: Path | None = typer.Option(
        None, help="The audit key file. Default: $EDGELLM_HOME/audit.key."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check the audit log's HMAC chain: exit 0 when it is intact, 3 naming the first record
    that was changed, deleted, inserted or reordered; 1 when it cannot be checked (no audit
    key, no log): it never passes unchecked.

    Example: edgellm audit verify --anchor 1234:5f0c...  (the SEQ:MAC an earlier run printed)
    """
    from edgellm.audit.chain import verify as check
    from edgellm.audit.key import KEY_FILE, AuditKeyError, read_key
    from edgellm.audit.query import first_seq_since, open_log, parse_anchor, parse_when
    from edgellm.home import home_dir

    start = parse_when(since, "--since") if since is not None else None
    anchored = parse_anchor(anchor) if anchor is not None else None
    key_path = key or home_dir() / KEY_FILE
    conn = open_log(_db(db))
    try:
        try:
            secret = read_key(key_path)
        except AuditKeyError as exc:
            raise AuditKeyError(f"cannot check the audit log: {exc.message}") from None
        since_seq = first_seq_since(conn, start) if start is not None else None
        if start is not None and since_seq is None:
            since_seq = 1 << 62  # nothing arrived since then: nothing to check but the anchor
        result = check(conn, secret, since_seq=since_seq, anchor=anchored)
    finally:
        conn.close()
    if as_json:
        problem = result.problem
        typer.echo(
            json.dumps(
                {
                    "intact": result.intact,
                    "first": result.first,
                    "last": result.last,
                    "checked": result.count,
                    "last_mac": result.last_mac,
                    "problem": None
                    if problem is None
                    else {"seq": problem.seq, "kind": problem.kind, "detail": problem.detail},
                }
            )
        )
    elif result.problem is not None:
        typer.echo(f"audit log NOT intact: {result.problem.detail}")
    elif result.count == 0:
        typer.echo("audit log intact: no records" + (" since then" if since else ""))
    else:
        typer.echo(
            f"audit log intact: records {result.first} to {result.last} ({result.count}); "
            f"anchor: {result.last}:{result.last_mac}"
        )
    if result.problem is not None:
        raise typer.Exit(TAMPERED)


@app.command()
@user_errors
@bad_input
def export(
    since: str | None = typer.Option(None, help=SINCE_HELP),
    until: str | None = typer.Option(
        None, help="Records of requests that arrived before this (same forms as --since)."
    ),
    format: Format = typer.Option(Format.jsonl, "--format", help="jsonl or csv."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="File to write; default stdout."
    ),
    db: Path | None = typer.Option(None, help=DB_HELP),
) -> None:
    """Write the audit records (every column, MACs included) as JSON lines or CSV.

    Example: edgellm audit export --since 2025-01-01 --until 2025-02-01 --format csv -o jan.csv
    """
    from edgellm.audit.chain import COLUMNS
    from edgellm.audit.query import between, open_log, parse_when

    start = parse_when(since, "--since") if since is not None else None
    end = parse_when(until, "--until") if until is not None else None
    conn = open_log(_db(db))
    try:
        records = between(conn, start, end)
        if output is None:
            _write(records, format, sys.stdout, COLUMNS)
        else:
            with output.open("w", encoding="utf-8", newline="") as out:
                _write(records, format, out, COLUMNS)
    finally:
        conn.close()


def _write(
    records: Iterable[dict[str, Any]], fmt: Format, out: Any, columns: tuple[str, ...]
) -> None:
    if fmt is Format.csv:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
        return
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


@app.command()
@user_errors
@bad_input
def tail(
    lines: int = typer.Option(10, "-n", "--lines", min=0, help="How many of the last records."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Then print new records as they come."
    ),
    as_json: bool = typer.Option(False, "--json", help="Whole records as JSON lines."),
    db: Path | None = typer.Option(None, help=DB_HELP),
) -> None:
    """Print the last records, one line each (or whole, as JSON); with --follow, go on.

    Example: edgellm audit tail -n 20 --follow
    """
    from edgellm.audit.query import after, last, open_log

    conn = open_log(_db(db))
    try:
        seq = 0
        for record in last(conn, lines):
            _show(record, as_json)
            seq = record["seq"]
        if not follow:
            return
        if seq == 0:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_log").fetchone()[0]
        while True:
            for record in after(conn, seq):
                _show(record, as_json)
                seq = record["seq"]
            sys.stdout.flush()
            time.sleep(0.5)
    finally:
        conn.close()


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    who = record["key_name"] or "-"
    tokens = (
        f" tokens={record['prompt_tokens']}/{record['completion_tokens']}"
        if record["prompt_tokens"] is not None
        else ""
    )
    e2e = f" e2e={record['e2e_s']:.3f}s" if isinstance(record["e2e_s"], float) else ""
    model = f" model={record['model']}" if record["model"] else ""
    reason = f" {record['finish_reason']}" if record["finish_reason"] else ""
    typer.echo(
        f"{record['seq']} {record['time']} {record['status']}{reason} {record['method']} "
        f"{record['route']} key={who}{model}{tokens}{e2e} id={record['request_id']}"
    )
