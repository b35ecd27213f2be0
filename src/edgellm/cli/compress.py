"""The compression commands: convert, quantize (one type or a sweep), eval with a gate. Each
command declares its options; its `run_*` function does the work, prints, and returns the exit
code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgellm.cli.console import err, user_errors
from edgellm.errors import EdgeLLMError, ValidationError

REGISTER_HELP = "Also add the result to the model registry as NAME[:TAG], with its lineage."
GATE_FAILED = 3  # exit code of `edgellm eval --gate` when the model fails the gate
ALL_CORES = os.cpu_count() or 1  # the --threads default


@contextlib.contextmanager
def progress_bars(err: Console) -> Iterator[Callable[[str, int, int], None]]:
    """One bar per stage ("dequantize", "quantize Q4_K_M", "evaluate", ...) on stderr."""
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bars:
        tasks: dict[str, object] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)  # type: ignore[arg-type]

        yield update


@user_errors
def convert(
    source: Path = typer.Argument(..., help="GGUF file (any type)."),
    to: str = typer.Option("f16", help="f16, bf16 or f32."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    register: str | None = typer.Option(None, help=REGISTER_HELP, metavar="NAME[:TAG]"),
) -> None:
    """Dequantize a GGUF to F16, BF16 or F32 (1-D tensors stay F32). SOURCE may be a registry
    name (edgellm models).

    Example: edgellm convert model.Q4_1.gguf --to f16 -o model.f16.gguf --register smollm2:f16
    """
    from edgellm.registry import model_file, parse_ref

    if register is not None:
        parse_ref(register, param="register")  # said now, not after the conversion
    with model_file(source, writes_weights=True) as (path, _):
        run_convert(path, to, output, err)
        if register is not None:
            parent = _sha256(path)
            register_output(output, register, ("convert", {"to": to.lower()}), parent)


def _sha256(path: Path) -> str:
    from edgellm.records import sha256_file

    return sha256_file(path)


def register_output(
    output: Path, ref: str, operation: tuple[str, dict[str, object]] | None, parent: str | None
) -> None:
    """Put a command's output in the registry as `ref`, with its lineage (`operation` and
    `parent`; None: the manifest beside it)."""
    from edgellm.registry import Registry

    with Registry.open() as registry:
        version = registry.add_file(  # linked: the output and its blob share the disk space
            output, ref, link=True, operation=operation, parent_sha256=parent,
            progress=err.is_terminal,
        )  # fmt: skip
    err.print(f"registered {escape(ref)}: version {version.short}")


def run_convert(source: Path, to: str, output: Path, err: Console) -> None:
    from edgellm.compress.convert import convert

    if output.exists() and output.resolve() == source.resolve():
        raise ValidationError("--output must not be the source file", param="output")
    if not output.parent.is_dir():
        raise ValidationError(f"the directory of --output {output} does not exist", param="output")
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        with progress_bars(err) as update:
            convert(source, tmp, to.lower(), lambda d, t: update(f"convert {to}", d, t))
        tmp.replace(output)
    except OSError as exc:
        raise EdgeLLMError(f"could not write {output}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    err.print(f"wrote {escape(str(output))} ({output.stat().st_size / 2**20:.1f} MiB)")


@dataclass(slots=True)
class QuantizeOptions:
    source: Path
    qtype: str | None
    output: Path | None
    imatrix: Path | None
    calibrate: Path | None
    calib_ctx: int
    calib_chunks: int | None
    sweep: str | None
    ref: Path | None
    data: Path | None
    ctx: int
    chunks: int | None
    plot: Path | None
    json_out: bool
    threads: int


@user_errors
def quantize(
    source: Path = typer.Argument(..., help="GGUF file; a quantized one is dequantized first."),
    qtype: str | None = typer.Option(None, "--type", "-t", help="Q8_0, Q6_K, Q4_K_M, ..."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="File to write (with --sweep: a directory)."
    ),
    imatrix: Path | None = typer.Option(None, help="Importance matrix (imatrix GGUF)."),
    calibrate: Path | None = typer.Option(
        None, help="Compute the importance matrix from this text first."
    ),
    calib_ctx: int = typer.Option(512, min=8, help="--calibrate: tokens per window."),
    calib_chunks: int | None = typer.Option(100, min=1, help="--calibrate: most windows."),
    sweep: str | None = typer.Option(
        None, help="Several types, e.g. Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K: quantize and compare."
    ),
    ref: Path | None = typer.Option(None, help="--sweep: reference model (default: SOURCE)."),
    data: Path | None = typer.Option(None, help="--sweep: evaluation text."),
    ctx: int = typer.Option(512, help="--sweep: tokens per evaluation window."),
    chunks: int | None = typer.Option(None, min=1, help="--sweep: most windows (default: all)."),
    plot: Path | None = typer.Option(None, help="--sweep: write a PNG of the frontier."),
    json_out: bool = typer.Option(False, "--json", help="--sweep: print JSON, not a table."),
    threads: int = typer.Option(ALL_CORES, min=1, help="CPU threads."),
    register: str | None = typer.Option(None, help=REGISTER_HELP, metavar="NAME[:TAG]"),
) -> None:
    """Quantize a GGUF with llama.cpp's quantizer; a manifest (parent SHA-256, type,
    parameters) goes beside it. IQ types need --imatrix or --calibrate. With --sweep, make
    several types and print their size / speed / quality table.

    Example: edgellm quantize model.f16.gguf --type Q4_K_M -o model.Q4_K_M.gguf

    Example: edgellm quantize model.f16.gguf --sweep Q8_0,Q4_K_M,Q2_K --data wiki.txt -o out/
    """
    opts = QuantizeOptions(
        source=source,
        qtype=qtype,
        output=output,
        imatrix=imatrix,
        calibrate=calibrate,
        calib_ctx=calib_ctx,
        calib_chunks=calib_chunks,
        sweep=sweep,
        ref=ref,
        data=data,
        ctx=ctx,
        chunks=chunks,
        plot=plot,
        json_out=json_out,
        threads=threads,
    )
    if register is not None and sweep is not None:
        raise ValidationError("--register takes one result: not with --sweep", param="register")
    from edgellm.registry import model_file, parse_ref

    if register is not None:
        parse_ref(register, param="register")  # said now, not after the quantization

    with model_file(source, writes_weights=True) as (path, _):
        run_quantize(dataclasses.replace(opts, source=path), Console(highlight=False), err)
    if register is not None and output is not None:
        register_output(output, register, None, None)  # the manifest beside it has the lineage


def run_quantize(opts: QuantizeOptions, out: Console, err: Console) -> None:
    from edgellm.compress.qtypes import quant_type
    from edgellm.compress.quantize import Calibration, quantize

    if opts.imatrix is not None and opts.calibrate is not None:
        raise ValidationError("give --imatrix or --calibrate, not both", param="imatrix")
    calibrate = None
    if opts.calibrate is not None:
        calibrate = Calibration(opts.calibrate, opts.calib_ctx, opts.calib_chunks)
    if opts.sweep is not None:
        _run_sweep(opts, calibrate, out, err)
        return
    if opts.qtype is None or opts.output is None:
        raise ValidationError("quantize needs --type and --output (or --sweep)", param="type")
    qtype = quant_type(opts.qtype)

    def notice(text: str) -> None:
        err.print(f"[yellow]note:[/yellow] {escape(text)}")

    with progress_bars(err) as update:
        result = quantize(
            opts.source,
            qtype,
            opts.output,
            imatrix_file=opts.imatrix,
            calibrate=calibrate,
            threads=opts.threads,
            progress=update,
            notice=notice,
        )
    size = result.output.stat().st_size / 2**20
    err.print(
        f"wrote {escape(str(result.output))} ({qtype.name}, {size:.1f} MiB, "
        f"{result.seconds:.1f} s); manifest {escape(str(result.manifest))}"
    )


def _run_sweep(opts: QuantizeOptions, calibrate: object, out: Console, err: Console) -> None:
    from edgellm.compress.qtypes import quant_type
    from edgellm.compress.sweep import plot_frontier, rows_as_dicts, sweep

    names = (opts.sweep or "").split(",")
    types = [quant_type(name, param="sweep") for name in names if name.strip()]
    if not types:
        raise ValidationError("--sweep names no type", param="sweep")
    if opts.data is None:
        raise ValidationError("--sweep needs --data TEXT to evaluate on", param="data")
    if opts.output is None or (opts.output.exists() and not opts.output.is_dir()):
        raise ValidationError("--sweep needs --output DIR (a directory)", param="output")
    if opts.plot is not None:
        _need_matplotlib()
    opts.output.mkdir(parents=True, exist_ok=True)
    with progress_bars(err) as update:
        rows = sweep(
            opts.source,
            types,
            opts.output,
            ref=opts.ref or opts.source,
            data=opts.data,
            ctx=opts.ctx,
            chunks=opts.chunks,
            threads=opts.threads,
            imatrix_file=opts.imatrix,
            calibrate=calibrate,  # type: ignore[arg-type]
            progress=update,
            notice=lambda text: err.print(f"[yellow]note:[/yellow] {escape(text)}"),
        )
    if opts.plot is not None:
        plot_frontier(rows, opts.plot, f"{opts.source.name} on {opts.data.name}")
        err.print(f"plot: {escape(str(opts.plot))}")
    if opts.json_out:
        out.print_json(json.dumps(rows_as_dicts(rows)))
        return
    table = Table(
        "type",
        "MiB",
        "bits/w",
        "ppl",
        "ppl ratio",
        "KL mean",
        "KL p99",
        "top-1",
        "|dp| p99",
        "decode tok/s",
        title=f"{opts.source.name}: sweep",
    )
    for r in rows:
        m = r.metrics
        table.add_row(
            r.name,
            f"{r.size_bytes / 2**20:.1f}",
            f"{r.bits_per_weight:.2f}",
            f"{m['ppl']:.3f}",
            f"{m.get('ppl_ratio', 1.0):.4f}",
            f"{m.get('kl_mean', 0.0):.5f}",
            f"{m.get('kl_p99', 0.0):.4f}",
            f"{m.get('top1', 1.0):.3f}",
            f"{m.get('dp_p99', 0.0):.4f}",
            f"{r.decode_tps:.1f}",
        )
    out.print(table)


@contextlib.contextmanager
def _optional_model_file(text: Path | None) -> Iterator[Path | None]:
    """A MODEL-like option (--ref) that may name a registry model, or None."""
    from edgellm.registry import model_file

    if text is None:
        yield None
        return
    with model_file(text) as (path, _):
        yield path


def _record_in_registry(
    model: Path, evaluation: dict[str, object], verdict: dict[str, object] | None, err: Console
) -> None:
    """Append the evaluation and verdict to the registry's versions of these bytes, if any."""
    from edgellm.registry import Registry
    from edgellm.store import db_path

    if not db_path().exists():
        return  # no registry here: nothing to record on (and none is made for it)
    try:
        with Registry.open() as registry:
            versions = registry.record_eval(_sha256(model), dict(evaluation), verdict)
    except EdgeLLMError as exc:  # the evaluation itself is still printed and in the manifest
        err.print(f"[yellow]warning:[/yellow] not recorded in the registry: {escape(exc.message)}")
        return
    for version in versions:
        err.print(f"recorded on {escape(version.model)}@{version.short} in the registry")


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValidationError(
            "--plot needs matplotlib: pip install 'edgellm[plot]'", param="plot"
        ) from None


@dataclass(slots=True)
class EvalOptions:
    model: Path
    ref: Path | None
    data: Path
    ctx: int
    chunks: int | None
    gate: str | None
    json_out: bool
    record: bool  # into the manifest beside the model
    threads: int
    in_registry: bool = True  # onto the registry's versions of the model's bytes
    label: str = ""  # how the table names the model (a registry name, or the file's name)


@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="GGUF file to evaluate."),
    data: Path = typer.Option(..., help="Text file (e.g. WikiText-2's test split)."),
    ref: Path | None = typer.Option(None, help="Reference model (same tokenizer) for KL etc."),
    ctx: int = typer.Option(512, help="Tokens per window; the second half of each is scored."),
    chunks: int | None = typer.Option(None, min=1, help="Most windows (default: all)."),
    gate: str | None = typer.Option(
        None, help='Quality gate, e.g. "kl_mean<0.05,ppl_ratio<1.05"; exit 3 when it fails.'
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON, not a table."),
    record: bool = typer.Option(True, help="Write results and verdict into the manifest."),
    threads: int = typer.Option(ALL_CORES, min=1, help="CPU threads."),
) -> None:
    """Perplexity as llama.cpp computes it and, against --ref, KL divergence, top-1 agreement
    and the change of the correct token's probability. Results (and the --gate verdict) go
    into the model's manifest. Exit codes: 0 ok, 1 error, 3 gate failed.

    Example: edgellm eval m.Q4_K_M.gguf --ref m.f16.gguf --data wiki.txt --gate "kl_mean<0.05"
    """
    opts = EvalOptions(
        model=model,
        ref=ref,
        data=data,
        ctx=ctx,
        chunks=chunks,
        gate=gate,
        json_out=json_out,
        record=record,
        threads=threads,
    )
    from edgellm.registry import model_file

    with model_file(model) as (path, version), _optional_model_file(ref) as ref_path:
        opts.model, opts.ref = path, ref_path
        opts.label = str(model) if version is not None else path.name
        opts.in_registry = opts.record
        opts.record = opts.record and version is None  # a registry blob has no manifest beside
        code = run_eval(opts, Console(highlight=False), err)
    if code:
        raise typer.Exit(code)


def run_eval(opts: EvalOptions, out: Console, err: Console) -> int:
    from edgellm.compress.manifest import record_eval
    from edgellm.evaluate.gate import METRICS, parse_gate
    from edgellm.evaluate.run import eval_record, evaluate

    gate = parse_gate(opts.gate) if opts.gate is not None else None
    if gate is not None and gate.needs_ref and opts.ref is None:
        raise ValidationError(f"the gate {gate.expr!r} compares with a reference: add --ref")
    with progress_bars(err) as update:
        (result,) = evaluate(
            [opts.model],
            opts.data,
            ref=opts.ref,
            ctx=opts.ctx,
            chunks=opts.chunks,
            threads=opts.threads,
            progress=lambda d, t: update("evaluate", d, t),
        )
    verdict = gate.verdict(result.metrics) if gate is not None else None
    if opts.in_registry:
        _record_in_registry(opts.model, eval_record(result, opts.data, opts.ref), verdict, err)
    manifest = None
    if opts.record:
        try:
            manifest = record_eval(opts.model, eval_record(result, opts.data, opts.ref), verdict)
        except OSError as exc:
            raise EdgeLLMError(
                f"could not write the manifest beside {opts.model}: {exc.strerror or exc} "
                "(--no-record skips it)"
            ) from exc
    if opts.json_out:
        body = {
            "model": str(opts.model),
            "ctx": result.ctx,
            "windows": result.windows,
            "metrics": result.metrics,
            "ref_metrics": result.ref_metrics,
            "gate": verdict,
            "manifest": str(manifest) if manifest else None,
        }
        out.print_json(json.dumps(body))
    else:
        table = Table(
            "metric",
            "value",
            "meaning",
            title=f"{opts.label or opts.model.name} on {opts.data.name}",
        )
        scored = f"{int(result.metrics['tokens'])} tokens in {result.windows} windows of {opts.ctx}"
        table.add_row("scored", scored, "second half of each window")
        for key, value in result.metrics.items():
            if key in METRICS:
                table.add_row(key, f"{value:.6g}", METRICS[key])
        if result.ref_metrics is not None:
            table.add_row("ref ppl", f"{result.ref_metrics['ppl']:.6g}", "the reference's")
        out.print(table)
        if manifest is not None:
            err.print(f"recorded in {escape(str(manifest))}")
    if verdict is None:
        return 0
    failed = [c for c in verdict["checks"] if not c["passed"]]
    if not failed:
        err.print(f"[green]gate passed:[/green] {escape(verdict['expr'])}")
        return 0
    why = ", ".join(
        f"{c['metric']} = {c['value']:.6g} (needs {c['op']} {c['threshold']:g})" for c in failed
    )
    err.print(f"[red]gate failed:[/red] {escape(why)}")
    return GATE_FAILED
