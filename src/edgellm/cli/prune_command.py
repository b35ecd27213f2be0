"""`edgellm prune`: remove whole blocks from a GGUF, chosen by block influence, as the last
ones, or by number; the scores table, and a manifest beside the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.cli.compress import ALL_CORES, REGISTER_HELP, progress_bars, register_output
from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError

if TYPE_CHECKING:
    from edgellm.compress.prune import PruneResult


@user_errors
def prune(
    model: Path = typer.Argument(..., help="GGUF file (any type: every tensor keeps its type)."),
    remove: int | None = typer.Option(None, help="Remove this many blocks (layers)."),
    method: str = typer.Option(
        "influence",
        help="--remove: influence (lowest block influence first, as ShortGPT) or last.",
    ),
    layers: str | None = typer.Option(
        None, help="Remove these blocks instead, 0-based, e.g. 3,17."
    ),
    data: Path | None = typer.Option(
        None, help="Calibration text the block influence is measured on (needed by influence)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    ctx: int = typer.Option(512, help="Tokens per calibration window."),
    chunks: int | None = typer.Option(64, min=1, help="Most calibration windows."),
    threads: int = typer.Option(ALL_CORES, min=1, help="CPU threads."),
    register: str | None = typer.Option(None, help=REGISTER_HELP, metavar="NAME[:TAG]"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON, not a table."),
) -> None:
    """Depth pruning: remove whole blocks and renumber the rest, each remaining tensor kept
    as it is (llama.cpp's quantizer in copy mode). Block influence is one minus the cosine of a
    block's input and output hidden states, averaged over the tokens of --data (ShortGPT); the
    lowest go first. The manifest records the parent, the method, the scores and the blocks
    removed. Measure the result with `edgellm eval --ref MODEL`.

    Example: edgellm prune model.f16.gguf --remove 4 --data calib.txt -o model.pruned4.gguf
    """
    from edgellm.compress.prune import Calibration, Method, prune
    from edgellm.registry import model_file, parse_ref

    if register is not None:
        parse_ref(register, param="register")  # said now, not after the pruning
    try:
        chosen = Method(method)
    except ValueError:
        raise ValidationError(
            f"--method must be influence or last, not {method!r}", param="method"
        ) from None
    if chosen is Method.LAYERS:
        raise ValidationError("name the blocks with --layers 3,17", param="method")
    calibrate = Calibration(data, ctx, chunks) if data is not None else None
    with model_file(model, writes_weights=True) as (path, _), progress_bars(err) as update:
        result = prune(
            path,
            output,
            method=chosen,
            remove=remove,
            layers=layers,
            calibrate=calibrate,
            threads=threads,
            progress=update,
        )
    _print(result, model, json_out, Console(highlight=False))
    if register is not None:
        register_output(output, register, None, None)  # the manifest beside it has the lineage


def _print(result: PruneResult, model: Path, json_out: bool, out: Console) -> None:
    scores = result.influence.scores if result.influence is not None else None
    kept = result.n_layer - len(result.removed)
    size = result.output.stat().st_size
    if json_out:
        body = {
            "model": str(model),
            "output": str(result.output),
            "manifest": str(result.manifest),
            "removed": result.removed,
            "layers_before": result.n_layer,
            "layers_after": kept,
            "scores": scores,
            "bytes": size,
            "seconds": result.seconds,
        }
        out.print_json(json.dumps(body))
        return
    if scores is not None:
        table = Table("block", "influence", "", title="block influence (1 - cos)")
        for block, score in enumerate(scores):
            table.add_row(str(block), f"{score:.5f}", "removed" if block in result.removed else "")
        out.print(table)
    removed = ", ".join(map(str, result.removed))
    err.print(
        f"removed blocks {removed}: wrote {escape(str(result.output))} ({result.n_layer} -> "
        f"{kept} layers, {size / 2**20:.1f} MiB, {result.seconds:.1f} s); "
        f"manifest {escape(str(result.manifest))}"
    )
