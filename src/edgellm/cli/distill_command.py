"""`edgellm distill`: a student GGUF learns its teacher's next-token distribution (torch)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgellm.cli.compress import REGISTER_HELP, register_output
from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError

_DEFAULT_THREADS = 2


@user_errors
def distill(
    student: Path = typer.Argument(..., help="GGUF to train (llama architecture), e.g. pruned."),
    teacher: Path = typer.Option(..., help="GGUF to learn from; the same vocabulary."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF to write (F16)."),
    data: list[Path] = typer.Option([], help="Training text file (repeatable)."),
    generate: int = typer.Option(0, min=0, help="Tokens of text the teacher writes to train on."),
    steps: int = typer.Option(200, min=1, help="Optimizer steps in all (with --resume too)."),
    seq: int = typer.Option(128, min=16, help="Tokens per training window."),
    batch: int = typer.Option(4, min=1, help="Windows per step."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (after a 10-step warm-up)."),
    top_k: int = typer.Option(64, min=1, help="Teacher tokens kept per position for the KL."),
    checkpoint_every: int = typer.Option(50, min=1, help="Steps between checkpoints."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in OUTPUT.distill/."),
    eval_data: Path | None = typer.Option(
        None, "--eval", help="Held-out text: checked for overlap, then KL before and after."
    ),
    hidden_weight: float = typer.Option(
        0.0, min=0.0, help="Weight of hidden-state matching at mapped blocks (0: off)."
    ),
    train_from: int = typer.Option(0, min=0, help="Freeze the student's blocks below this one."),
    bf16: bool = typer.Option(True, help="bfloat16 autocast (weights stay float32)."),
    minutes: float | None = typer.Option(None, help="Stop after this much training time."),
    seed: int = typer.Option(0, help="Seed of the generated text and the window order."),
    threads: int = typer.Option(_DEFAULT_THREADS, min=1, help="CPU threads."),
    register: str | None = typer.Option(None, help=REGISTER_HELP, metavar="NAME[:TAG]"),
) -> None:
    """Distil TEACHER into STUDENT: the student learns the teacher's next-token distribution
    (KL on the teacher's top-k, computed once by llama.cpp and cached), on text files and/or
    text the teacher writes itself from a built-in prompt set (--generate). Checkpoints go to
    OUTPUT.distill/ every --checkpoint-every steps; --resume continues after Ctrl-C or a crash.
    The result is an F16 GGUF with a manifest (teacher, data hashes, steps, loss curve).
    Needs PyTorch: pip install 'edgellm\\[train]'.

    Example: edgellm distill pruned.gguf --teacher model.f16.gguf --generate 50000 -o out.gguf
    """
    from edgellm.compress.distill import DistillOptions
    from edgellm.registry import parse_ref

    if register is not None:
        parse_ref(register, param="register")  # said now, not after the training
    opts = DistillOptions(
        student=student,
        teacher=teacher,
        output=output,
        data=list(data),
        generate=generate,
        steps=steps,
        seq=seq,
        batch=batch,
        lr=lr,
        top_k=top_k,
        checkpoint_every=checkpoint_every,
        resume=resume,
        eval=eval_data,
        hidden_weight=hidden_weight,
        train_from=train_from,
        bf16=bf16,
        minutes=minutes,
        seed=seed,
        threads=threads,
    )
    run_distill(opts, err)
    if register is not None:
        register_output(output, register, None, None)  # the manifest beside it has the lineage


def run_distill(opts: Any, err: Console) -> None:
    from edgellm.compress.distill import checkpoint_dir, distill

    if opts.minutes is not None and opts.minutes <= 0:
        raise ValidationError("--minutes must be more than 0", param="minutes")
    try:
        with _bars(err) as update:
            result = distill(opts, update)
    except KeyboardInterrupt:
        err.print(
            f"interrupted: the last checkpoint is in {escape(str(checkpoint_dir(opts.output)))}; "
            "run the same command with --resume to continue"
        )
        raise
    curve = result.curve
    losses = curve.losses
    first = sum(losses[:10]) / max(1, len(losses[:10]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
    err.print(
        f"trained {curve.step} steps ({curve.tokens} tokens, {curve.seconds:.0f} s{resumed}) on "
        f"{result.windows} windows ({result.generated_tokens} tokens by the teacher); "
        f"loss {first:.4f} -> {last:.4f}; teacher top-{opts.top_k} mass {result.top_k_mass:.3f}"
    )
    if result.evals is not None:
        before, after = result.evals["before"], result.evals["after"]
        err.print(
            f"on {escape(str(opts.eval))}: KL to the teacher {before['kl_mean']:.4f} -> "
            f"{after['kl_mean']:.4f}, top-1 {before['top1']:.3f} -> {after['top1']:.3f}, "
            f"ppl {before['ppl']:.2f} -> {after['ppl']:.2f}"
        )
    size = result.output.stat().st_size / 2**20
    err.print(
        f"wrote {escape(str(result.output))} ({size:.1f} MiB); manifest "
        f"{escape(str(result.manifest))}; checkpoints in "
        f"{escape(str(checkpoint_dir(opts.output)))} (remove when done)"
    )


@contextlib.contextmanager
def _bars(err: Console) -> Iterator[Callable[[Any], None]]:
    """One bar per stage on stderr; the training bar shows loss, tokens/s and time left."""
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: Any) -> None:
            if stage.name not in tasks:
                start = max(0, stage.done - 1)  # a resumed run starts part way
                tasks[stage.name] = bars.add_task(
                    stage.name, total=stage.total, completed=start, info=""
                )
            info = ""
            if stage.loss is not None:
                info = f"loss {stage.loss:.4f}  {stage.tokens_per_s or 0:.0f} tok/s"
            bars.update(tasks[stage.name], completed=stage.done, total=stage.total, info=info)

        yield update
