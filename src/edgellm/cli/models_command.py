"""`edgellm models ...`: the model registry (edgellm.registry) in `$EDGELLM_HOME/models/` and
the data directory's database. Every command has `--json`; errors are one line, exit 1."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError

if TYPE_CHECKING:  # the registry loads only when a command runs
    from edgellm.registry import Registry, Version

app = typer.Typer(
    name="models",
    help="The model registry: add, pull, import from Ollama, tag, list, show, set defaults, "
    "encrypt, gc, verify; promote, rollback, canary, fallback.",
    no_args_is_help=True,
)

SCORES = ("ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1")  # shown by `show`, of each eval
JSON = typer.Option(False, "--json", help="Print JSON instead of text.")
KEY_FILE = typer.Option(
    None, "--key-file", help="The model key file (default: $EDGELLM_MODEL_KEY).", show_default=False
)


@contextmanager
def _registry() -> Iterator[Registry]:
    from edgellm.registry import Registry

    reg = Registry.open()
    try:
        yield reg
    finally:
        reg.close()


def _key(encrypt: bool, key_file: Path | None) -> bytes | None:
    """The model key when encrypting, else None; a key file without --encrypt is a mistake
    said, not a silent encryption."""
    if not encrypt:
        if key_file is not None:
            raise ValidationError("--key-file is the key to encrypt with: add --encrypt")
        return None
    return _required_key(key_file)


def _required_key(key_file: Path | None) -> bytes:
    from edgellm.registry.crypto import load_key

    return load_key(key_file)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _said(version: Version, ref: str, verb: str) -> None:
    state = "encrypted, " if version.encrypted else ""
    err.print(
        f"{verb} [bold]{escape(ref)}[/bold]: version {version.short} ({state}"
        f"{_size(version.size)}, {version.file_type or '?'}, {version.architecture or '?'})"
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _params(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@app.command()
@user_errors
def add(
    path: Path = typer.Argument(..., help="A GGUF file."),
    name: str = typer.Option(..., "--name", help="NAME[:TAG] to register it as (tag: latest)."),
    link: bool = typer.Option(False, help="Hard-link instead of copying (same filesystem)."),
    encrypt: bool = typer.Option(False, help="Store it AES-256-GCM encrypted."),
    key_file: Path | None = KEY_FILE,
    as_json: bool = JSON,
) -> None:
    """Check a GGUF, hash it and register it (with the lineage, evaluations and gates of the
    manifest beside it, if any).

    Example: edgellm models add ./smollm2.Q4_K_M.gguf --name smollm2:q4
    """
    key = _key(encrypt, key_file)
    with _registry() as reg:
        version = reg.add_file(path, name, link=link, encrypt_key=key, progress=_tty())
    _report(version, name, "added", as_json)


@app.command()
@user_errors
def pull(
    source: str = typer.Argument(
        ..., help="https:// or http:// URL, or hf://ORG/REPO/FILE.gguf[@REVISION]."
    ),
    name: str = typer.Option(..., "--name", help="NAME[:TAG] to register it as."),
    sha256: str | None = typer.Option(None, help="The file's expected SHA-256 (hex)."),
    encrypt: bool = typer.Option(False, help="Store it AES-256-GCM encrypted."),
    key_file: Path | None = KEY_FILE,
    as_json: bool = JSON,
) -> None:
    """Download a GGUF (resuming an interrupted download), verify its SHA-256 and register it.
    hf:// resolves as the Hugging Face hub's clients do; HF_ENDPOINT names a mirror, HF_TOKEN
    is sent as a bearer token to HF_ENDPOINT's host (a mirror there receives it).

    Example: edgellm models pull hf://ORG/REPO-GGUF/model-Q4_K_M.gguf --name smollm2:q4
    """
    from edgellm.registry.pull import pull as do_pull

    key = _key(encrypt, key_file)
    notices: list[str] = []  # this pull's, said after the version (which may be an older one)
    with _registry() as reg:
        if key is not None:  # the plain download stays in RAM until it is encrypted
            from edgellm.registry import memory_partial_dir

            reg.partial_dir = memory_partial_dir()
        version = do_pull(reg, source, name, sha256=sha256, encrypt_key=key, progress=_tty(),
                          notice=notices.append)  # fmt: skip
    _report(version, name, "pulled", as_json)
    for notice in notices:
        err.print(f"[yellow]warning:[/yellow] {escape(notice)}")


@app.command("import-ollama")
@user_errors
def import_ollama(
    directory: Path | None = typer.Argument(
        None, help="An Ollama models directory (default: ~/.ollama/models or $OLLAMA_MODELS)."
    ),
    as_json: bool = JSON,
) -> None:
    """Register the GGUF models of an Ollama models directory, hard-linked (not copied), with
    their template and parameters.

    Example: edgellm models import-ollama ~/.ollama/models
    """
    from edgellm.registry.ollama_import import default_ollama_dir, import_ollama_models

    with _registry() as reg:
        found = import_ollama_models(reg, directory or default_ollama_dir())
    if as_json:
        _echo_json([{"name": ref, **v.as_json()} for ref, v in found.imported] + [
            {"name": ref, "skipped": why} for ref, why in found.skipped])  # fmt: skip
        return
    for ref, version in found.imported:
        _said(version, ref, "imported")
    for ref, why in found.skipped:
        err.print(f"[yellow]skipped[/yellow] {escape(ref)}: {escape(why)}")
    if not found.imported and not found.skipped:
        err.print(f"no models in {escape(str(directory or default_ollama_dir()))}")


def _report(version: Version, ref: str, verb: str, as_json: bool) -> None:
    if as_json:
        _echo_json({"name": ref, **version.as_json()})
    else:
        _said(version, ref, verb)


def _tty() -> bool:
    return sys.stderr.isatty()


@app.command("list")
@user_errors
def list_models(as_json: bool = JSON) -> None:
    """The tags and the versions they point at; versions no tag points to, too.

    Example: edgellm models list
    """
    with _registry() as reg:
        tags = reg.tags()
        untagged = [v for v in reg.versions() if not v.tags]
    if as_json:
        _echo_json([{"name": ref, **v.as_json()} for ref, v in tags]
                   + [{"name": None, **v.as_json()} for v in untagged])  # fmt: skip
        return
    if not tags and not untagged:
        err.print("the registry is empty: add a model with `edgellm models add PATH --name N`")
        return
    table = Table("name", "version", "size", "type", "params", "arch", "encrypted", "created")
    rows = [(ref, v) for ref, v in tags] + [(f"{v.model} (untagged)", v) for v in untagged]
    for ref, v in rows:
        table.add_row(
            escape(ref), v.short, _size(v.size), v.file_type or "-", _params(v.parameters),
            v.architecture or "-", "yes" if v.encrypted else "no", v.created,
        )  # fmt: skip
    _console().print(table)


def _console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


@app.command()
@user_errors
def show(
    name: str = typer.Argument(..., help="NAME[:TAG]."),
    as_json: bool = JSON,
) -> None:
    """A version's metadata, lineage chain, evaluations, gates, serving defaults, and where its
    model's tags point, with their history.

    Example: edgellm models show smollm2:q4
    """
    with _registry() as reg:
        version = reg.resolve(name)
        chain = reg.lineage(version)
        history = reg.history(version.model)
        tags = [(ref, v.short) for ref, v in reg.tags() if v.model == version.model]
        deployment = reg.deployment(name)
    if as_json:
        _echo_json(version.as_json() | {
            "deployment": deployment.as_json(),
            "lineage": [c.as_json() if not isinstance(c, str) else {"sha256": c} for c in chain],
            "tag_pointers": dict(tags),
            "tag_history": [m.__dict__ if hasattr(m, "__dict__") else _move(m) for m in history],
        })  # fmt: skip
        return
    out = _console()
    out.print(f"[bold]{escape(name)}[/bold]  version {version.short}")
    for label, value in _facts(version):
        out.print(f"  {label:<16} {escape(str(value))}")
    out.print("lineage (newest first):")
    for link in chain:
        if isinstance(link, str):
            out.print(f"  <- {link[:12]} (not in the registry)")
        else:
            op = link.operation + (f" {json.dumps(link.operation_params)}"
                                   if link.operation_params else "")  # fmt: skip
            out.print(f"  {'<- ' if link is not version else ''}{link.model}@{link.short}: "
                      f"{escape(op)}")  # fmt: skip
    _print_evals(out, version)
    out.print("tags: " + (", ".join(f"{escape(r)} -> {s}" for r, s in tags) or "none"))
    from edgellm.cli.models_deploy import deployment_lines

    out.print("deployment:")
    for line in deployment_lines(deployment):
        out.print(f"  {escape(line)}")
    out.print("tag history:")
    for move in history:
        out.print(f"  {move.at} {escape(move.tag)}: {move.previous or '-'} -> "
                  f"{move.version or 'removed'} ({move.operation})")  # fmt: skip


def _move(move: Any) -> dict[str, Any]:
    return {k: getattr(move, k) for k in ("tag", "version", "previous", "operation", "at")}


def _facts(v: Version) -> list[tuple[str, Any]]:
    return [
        ("sha256", v.sha256), ("size", f"{_size(v.size)} ({v.size} bytes)"),
        ("architecture", v.architecture or "-"), ("parameters", _params(v.parameters)),
        ("type", v.file_type or "-"), ("context", v.context_length or "-"),
        ("template sha256", (v.template_sha256 or "-")[:16]), ("encrypted", v.encrypted),
        ("source", v.source or "-"), ("created", v.created), ("blob", v.blob),
        ("defaults", json.dumps(v.params) if v.params else "none (edgellm models set)"),
    ]  # fmt: skip


def _print_evals(out: Console, v: Version) -> None:
    if not v.evals:
        out.print("evaluations: none (edgellm eval MODEL --data TEXT)")
    for i, e in enumerate(v.evals):
        metrics = e.get("metrics") or {}
        scores = " ".join(f"{k}={metrics[k]:.4g}" for k in SCORES if k in metrics)
        data = (e.get("data") or {}).get("path", "?")
        out.print(f"  eval {i} ({e.get('at', '?')}, {escape(str(data))}): {scores}")
    for g in v.gates:
        verdict = "[green]passed[/green]" if g.get("passed") else "[red]failed[/red]"
        out.print(f"  gate on eval {g.get('eval')}: {escape(str(g.get('expr')))} {verdict}")


@app.command()
@user_errors
def tag(
    src: str = typer.Argument(..., help="NAME[:TAG] of the version."),
    dst: str = typer.Argument(..., help="NAME[:TAG] that should point at it."),
    as_json: bool = JSON,
) -> None:
    """Point a tag at the version another tag names (as `ollama cp`).

    Example: edgellm models tag smollm2:q4 smollm2:prod
    """
    with _registry() as reg:
        version = reg.tag(src, dst)
    _report(version, dst, "tagged", as_json)


@app.command()
@user_errors
def rm(
    name: str = typer.Argument(..., help="NAME[:TAG] (tag: latest)."),
    as_json: bool = JSON,
) -> None:
    """Remove a tag. Its version stays (rollback room) until `edgellm models gc`.

    Example: edgellm models rm smollm2:old
    """
    with _registry() as reg:
        version = reg.untag(name)
    if as_json:
        _echo_json({"removed": name, "version": version.short})
    else:
        err.print(f"removed the tag {escape(name)} (version {version.short} stays until gc)")


@app.command()
@user_errors
def gc(
    keep: int = typer.Option(3, help="Versions kept per model besides the tagged ones."),
    dry_run: bool = typer.Option(False, help="Say what would go; remove nothing."),
    as_json: bool = JSON,
) -> None:
    """Remove versions no tag points to, beyond the newest --keep of each model, and blobs no
    version uses.

    Example: edgellm models gc --keep 3
    """
    with _registry() as reg:
        report = reg.gc(keep, dry_run=dry_run)
    if as_json:
        _echo_json({"removed": report.versions, "blobs": report.blobs, "bytes": report.bytes,
                    "dry_run": dry_run})  # fmt: skip
        return
    verb = "would remove" if dry_run else "removed"
    err.print(f"{verb} {len(report.versions)} version(s), {report.blobs} blob(s), "
              f"{_size(report.bytes)}" + (": " + ", ".join(report.versions)
                                          if report.versions else ""))  # fmt: skip


@app.command()
@user_errors
def verify(key_file: Path | None = KEY_FILE, as_json: bool = JSON) -> None:
    """Re-hash every version's blob (encrypted ones are decrypted into memory with the key):
    exit 0 when all are intact, 3 naming each one that is not.

    Example: edgellm models verify
    """
    key = _optional_key(key_file)
    with _registry() as reg:
        results = list(reg.verify(key))
    bad = [r for r in results if r.problem]
    if as_json:
        _echo_json([{"name": r.version.model, "version": r.version.short, "ok": not r.problem,
                     "problem": r.problem} for r in results])  # fmt: skip
    else:
        for r in bad:
            err.print(f"[red]bad:[/red] {escape(r.problem or '')}")
        err.print(f"{len(results) - len(bad)} of {len(results)} version(s) intact")
    if bad:
        raise typer.Exit(3)


def _optional_key(key_file: Path | None) -> bytes | None:
    from edgellm.registry.crypto import KEY_ENV

    if key_file is None and not os.environ.get(KEY_ENV):
        return None
    return _required_key(key_file)


@app.command("set")
@user_errors
def set_params(
    name: str = typer.Argument(..., help="NAME[:TAG]."),
    assignments: list[str] = typer.Argument(..., help="KEY=VALUE ..."),
    as_json: bool = JSON,
) -> None:
    """Serving defaults of a version, used for fields a request omits (as Ollama's Modelfile
    PARAMETER and SYSTEM): temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
    stop, num_ctx, max_tokens, system, reasoning. `gate=EXPR` is the tag's instead: the
    quality gate a version must pass to be promoted or canaried on it (edgellm eval --gate).

    Example: edgellm models set r1-7b temperature=0.6 top_p=0.95
    Example: edgellm models set r1-7b:prod gate="kl_mean<0.05,ppl_ratio<1.05"
    """
    from edgellm.evaluate.gate import parse_gate
    from edgellm.registry.deploy import set_gate
    from edgellm.registry.params import parse_assignments

    gates = [a.partition("=")[2] for a in assignments if a.strip().startswith("gate=")]
    rest = [a for a in assignments if not a.strip().startswith("gate=")]
    if len(gates) > 1:
        raise ValidationError("give gate= once", param="gate")
    values = parse_assignments(rest) if rest else {}
    for gate in gates:
        parse_gate(gate)  # every assignment is checked before anything is written
    with _registry() as reg:
        if gates:
            set_gate(reg, name, gates[0])
        version = reg.set_params(name, values) if values else reg.resolve(name)
        gate_now = reg.deployment(name).gate
    _print_params(version, name, as_json, gate_now)


@app.command()
@user_errors
def unset(
    name: str = typer.Argument(..., help="NAME[:TAG]."),
    keys: list[str] = typer.Argument(..., help="KEY ..."),
    as_json: bool = JSON,
) -> None:
    """Remove serving defaults of a version (`gate`: the tag's gate).

    Example: edgellm models unset r1-7b temperature
    """
    from edgellm.registry.deploy import set_gate
    from edgellm.registry.params import check_names

    rest = [k for k in keys if k.strip() != "gate"]
    names = check_names(rest) if rest else []
    with _registry() as reg:
        if len(rest) < len(keys):
            set_gate(reg, name, None)
        version = reg.unset_params(name, names) if names else reg.resolve(name)
        gate_now = reg.deployment(name).gate
    _print_params(version, name, as_json, gate_now)


def _print_params(version: Version, ref: str, as_json: bool, gate: str | None) -> None:
    if as_json:
        _echo_json({"name": ref, "version": version.short, "params": version.params,
                    "gate": gate})  # fmt: skip
    else:
        shown = " ".join(f"{k}={json.dumps(v)}" for k, v in version.params.items()) or "none"
        err.print(f"{escape(ref)} ({version.short}) defaults: {escape(shown)}"
                  + (f"; gate: {escape(gate)}" if gate else ""))  # fmt: skip


@app.command()
@user_errors
def encrypt(
    name: str = typer.Argument(..., help="NAME[:TAG]."),
    key_file: Path | None = KEY_FILE,
    as_json: bool = JSON,
) -> None:
    """Encrypt a stored version's blob (AES-256-GCM); the plain blob is removed.

    Example: EDGELLM_MODEL_KEY=$(cat model.key) edgellm models encrypt smollm2:q4
    """
    with _registry() as reg:
        reg.resolve(name)  # an unknown name is said before the key is asked for
        version = reg.encrypt(name, _required_key(key_file), progress=_tty())
    _report(version, name, "encrypted", as_json)


@app.command()
@user_errors
def keygen(
    out: Path = typer.Option(..., "--out", help="File to write the key to (made 0600)."),
    as_json: bool = JSON,
) -> None:
    """Write a new 256-bit model key (64 hex characters), 0600. Keep a copy elsewhere: without
    it the encrypted models cannot be read.

    Example: edgellm models keygen --out ~/.config/edgellm/model.key
    """
    from edgellm.registry.crypto import keygen as make_key

    make_key(out)
    if as_json:
        _echo_json({"key_file": str(out)})
    else:
        err.print(
            f"wrote a model key to {escape(str(out))} (0600): `edgellm models add/pull/encrypt"
            " --key-file` it, `edgellm serve --model-key-file` it; keep a copy elsewhere"
        )


@app.command()
@user_errors
def rekey(
    key_file: Path | None = KEY_FILE,
    new_key_file: Path = typer.Option(..., "--new-key-file", help="The key to rotate to."),
    as_json: bool = JSON,
) -> None:
    """Rotate the model key: re-encrypt every encrypted blob under the new key, chunk by chunk
    in memory (nothing plain on disk). Run it again if it is cut short: blobs already under the
    new key are skipped. Then serve with the new key and retire the old one.

    Example: edgellm models rekey --key-file old.key --new-key-file new.key
    """
    from edgellm.registry.crypto import load_key

    old, new = _required_key(key_file), load_key(new_key_file, env={})
    with _registry() as reg:
        done = reg.rekey(old, new, progress=_tty())
    if as_json:
        _echo_json({"rekeyed": done})
    else:
        err.print(f"re-encrypted {len(done)} blob(s) under the new key")


# the deployment commands (promote, rollback, canary, fallback) register on `app` too
from edgellm.cli import models_deploy  # noqa: E402, F401
