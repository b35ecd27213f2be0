"""`edgellm compress MODEL --recipe FILE.toml -o DIR`: a gated chain of prune, distill,
quantize and eval steps (`edgellm.compress.recipe`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.cli.compress import ALL_CORES, GATE_FAILED, progress_bars, register_output
from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError


@user_errors
def compress(
    model: Path = typer.Argument(..., help="GGUF file or registry name: the original."),
    recipe: Path = typer.Option(..., help="Recipe TOML: eval table, steps (docs/compression.md)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for every artifact."),
    register: str | None = typer.Option(
        None, help="Register every artifact as NAME:NN-kind, with its lineage.", metavar="NAME"
    ),
    threads: int = typer.Option(ALL_CORES, min=1, help="CPU threads."),
) -> None:
    """Run a compression recipe: each step (prune, distill, quantize, eval) takes the artifact
    before it, is evaluated against MODEL on the recipe's held-out text and checked against its
    gate; the run stops at the first gate that fails (exit code 3). Writes DIR/NN-kind.gguf with
    manifests, and DIR/report.{json,md,png}. Exit codes: 0 all passed, 1 error, 3 a gate failed.

    Example: edgellm compress smollm2.f16.gguf --recipe my-recipe.toml -o out/ --register small

    (docs/compress-recipe.toml is an example recipe to copy.)
    """
    from edgellm.compress.recipe import load_recipe
    from edgellm.registry import model_file, parse_ref

    plan = load_recipe(recipe)
    if register is not None and ":" in register:
        raise ValidationError(
            "--register takes a NAME; each step is tagged NN-kind", param="register"
        )
    if register is not None:
        parse_ref(register, param="register")
    if output.exists() and not output.is_dir():
        raise ValidationError(f"--output {output} is a file, not a directory", param="output")
    for path in _inputs(plan):
        if not path.is_file():
            raise ValidationError(
                f"{recipe.name} names {path}, which does not exist", param="recipe"
            )
    with model_file(model, writes_weights=True) as (path, version):
        from edgellm.compress.prune import layer_count
        from edgellm.compress.recipe import check_layers
        from edgellm.modelfile import inspect_gguf

        check_layers(plan, layer_count(inspect_gguf(path)), path.name)
        code = _run(path, plan, recipe, output, threads, register, version is None)
    if code:
        raise typer.Exit(code)


def _inputs(plan: Any) -> list[Path]:
    paths = [plan.eval.data]
    for step in plan.steps:
        if step.kind == "prune" and step.data is not None:
            paths.append(step.data)
        if step.kind == "distill":
            paths.extend(step.data)
    return list(paths)


def _run(
    model: Path,
    plan: Any,
    recipe: Path,
    output: Path,
    threads: int,
    register: str | None,
    register_original: bool,
) -> int:
    from edgellm.compress.recipe import failed_gate, run_recipe, write_report

    with progress_bars(err) as update:
        runners = _runners(threads, update)
        results = run_recipe(
            model, plan, output, runners, threads=threads, progress=update,
            say=lambda text: err.print(escape(text)),
        )  # fmt: skip
    reports = write_report(results, recipe, output)
    _print_table(results, Console(highlight=False))
    err.print("report: " + ", ".join(escape(str(p)) for p in reports))
    if register is not None:
        if register_original:  # so that the chain ends at a version, not a bare hash
            register_output(model, f"{register}:original", None, None)
        for r in results[1:]:
            if r.kind != "eval":
                register_output(r.artifact, f"{register}:{r.artifact.stem}", None, None)
    failed = failed_gate(results)
    if failed is not None:
        err.print(
            f"[red]gate failed[/red] at step {failed.index} ({failed.kind}): "
            f"{escape(str(failed.gate and failed.gate['expr']))}; later steps not run"
        )
        return GATE_FAILED
    return 0


def _runners(threads: int, update: Any) -> dict[str, Any]:
    def quantize_step(step: Any, source: Path, out: Path, original: Path) -> None:
        from edgellm.compress.qtypes import quant_type
        from edgellm.compress.quantize import quantize

        quantize(source, quant_type(step.type), out, threads=threads)

    def prune_step(step: Any, source: Path, out: Path, original: Path) -> None:
        from edgellm.compress.prune import Calibration, Method, prune

        calibrate = Calibration(step.data, step.ctx, step.chunks) if step.data else None
        layers = ",".join(str(n) for n in step.layers) if step.layers is not None else None
        method = Method(step.method)
        prune(source, out, method=method, remove=step.remove, layers=layers,
              calibrate=calibrate, threads=threads)  # fmt: skip

    def distill_step(step: Any, source: Path, out: Path, original: Path) -> None:
        from edgellm.compress import distill as run

        def report(stage: run.Stage) -> None:
            update(f"distill: {stage.name}", stage.done, stage.total)

        work = run.checkpoint_dir(out)
        # a run stopped by Ctrl-C or a crash continues where its last checkpoint left it
        resume = (work / run.CHECKPOINT_FILE).exists()
        run.distill(run.DistillOptions(
            student=source, teacher=original, output=out, data=list(step.data),
            generate=step.generate, steps=step.steps, seq=step.seq, lr=step.lr,
            top_k=step.top_k, threads=threads, resume=resume,
        ), progress=report)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)  # its result is the step's artifact now

    return {"quantize": quantize_step, "prune": prune_step, "distill": distill_step}


def _print_table(results: list[Any], out: Console) -> None:
    table = Table("step", "kind", "file", "MiB", "ppl", "KL mean", "top-1", "tok/s", "gate")
    for r in results:
        m = r.metrics
        gate = "" if r.gate is None else ("pass" if r.gate["passed"] else "FAIL")
        table.add_row(
            str(r.index), r.kind, r.artifact.name, f"{r.size_bytes / 2**20:.1f}",
            f"{m['ppl']:.3f}", f"{m.get('kl_mean', 0.0):.4f}", f"{m.get('top1', 1.0):.3f}",
            f"{r.decode_tps:.1f}", gate,
        )  # fmt: skip
    out.print(table)
