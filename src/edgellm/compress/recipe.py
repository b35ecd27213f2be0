"""`edgellm compress --recipe FILE.toml`: prune, distill, quantize and eval steps, in order,
each one gated.

A recipe is a TOML file: an `[eval]` table (held-out text, window size, how many windows) and
`[[steps]]`, each with a `kind` and that kind's options, and an optional `gate`
(`"kl_mean<0.3,top1>0.7"`, the syntax of `edgellm eval --gate`). Each step takes the artifact
the step before made (the first takes MODEL) and writes `DIR/NN-kind.gguf` with its manifest;
an `eval` step makes no file and only gates the artifact so far. After every step the artifact
is evaluated against MODEL (the original, the reference of every KL) on the held-out windows,
its decode speed timed, the evaluation and the gate's verdict written into its manifest. The
run stops at the first gate that fails (exit code 3), leaving every artifact made so far with
its measurements. The report (`report.json`, `report.md`, `report.png`) shows every step.
Paths in a recipe are relative to the recipe file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from edgellm.compress.manifest import record_eval
from edgellm.errors import ValidationError
from edgellm.evaluate.gate import parse_gate
from edgellm.evaluate.run import eval_record, evaluate
from edgellm.records import sha256_file

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Say = Callable[[str], None]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate: str | None = Field(None, description="quality gate on this step's artifact")


class PruneStep(_Step):
    kind: Literal["prune"]
    remove: int | None = Field(None, ge=1, description="blocks to remove")
    layers: list[int] | None = Field(None, description="these blocks, instead of --remove")
    method: Literal["influence", "last"] = "influence"
    data: Path | None = Field(None, description="calibration text for the influence scores")
    ctx: int = Field(256, ge=8)
    chunks: int = Field(8, ge=1)


class DistillStep(_Step):
    kind: Literal["distill"]
    data: list[Path] = Field(default_factory=list, description="training text files")
    generate: int = Field(0, ge=0, description="tokens of teacher-generated training text")
    steps: int = Field(200, ge=1)
    seq: int = Field(128, ge=16)
    lr: float = Field(1e-4, gt=0)
    top_k: int = Field(64, ge=1)


class QuantizeStep(_Step):
    kind: Literal["quantize"]
    type: str = Field(description="a quantization type: Q8_0, Q4_K_M, ...")


class EvalStep(_Step):
    kind: Literal["eval"]


Step = Annotated[PruneStep | DistillStep | QuantizeStep | EvalStep, Field(discriminator="kind")]


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path = Field(description="held-out evaluation text")
    ctx: int = Field(256, ge=8)
    chunks: int | None = Field(16, ge=1)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval: EvalSpec
    steps: list[Step] = Field(min_length=1)


def load_recipe(path: Path) -> Recipe:
    """The recipe at `path`, its relative paths resolved against its directory; one clear
    error naming the field for anything wrong."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"recipe not found: {path}", param="recipe") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValidationError(f"cannot read recipe {path}: {exc}", param="recipe") from exc
    try:
        recipe = Recipe.model_validate(raw)
    except PydanticError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationError(f"{path.name}: {where}: {first['msg']}", param="recipe") from None
    base = path.resolve().parent
    recipe.eval.data = base / recipe.eval.data
    if recipe.eval.ctx % 2:
        raise ValidationError(f"{path.name}: eval.ctx must be even", param="recipe")
    for i, step in enumerate(recipe.steps):
        if step.gate is not None:
            try:
                parse_gate(step.gate)
            except ValidationError as exc:
                raise ValidationError(
                    f"{path.name}: steps.{i}.gate: {exc.message}", param="recipe"
                ) from None
        if isinstance(step, QuantizeStep):
            _check_type(step.type, f"{path.name}: steps.{i}.type")
        if isinstance(step, PruneStep):
            if step.ctx % 2:
                raise ValidationError(f"{path.name}: steps.{i}.ctx must be even", param="recipe")
            if (step.remove is None) == (step.layers is None):
                raise ValidationError(
                    f"{path.name}: steps.{i}: give remove or layers, not both or neither",
                    param="recipe",
                )
            if step.data is not None:
                step.data = base / step.data
            elif step.layers is None and step.method == "influence":
                raise ValidationError(
                    f"{path.name}: steps.{i}: influence pruning needs data (calibration text)",
                    param="recipe",
                )
        if isinstance(step, DistillStep):
            step.data = [base / p for p in step.data]
            if not step.data and step.generate == 0:
                raise ValidationError(
                    f"{path.name}: steps.{i}: distill needs data files or generate = N tokens",
                    param="recipe",
                )
    _check_held_out(recipe, path.name)
    return recipe


def _check_type(name: str, where: str) -> None:
    from edgellm.compress.qtypes import quant_type

    try:
        qtype = quant_type(name)
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc.message}", param="recipe") from None
    if qtype.needs_imatrix:
        raise ValidationError(
            f"{where}: {qtype.name} needs an importance matrix, which a recipe cannot give yet; "
            "choose a K or Q type (Q4_K_M, Q8_0, ...)",
            param="recipe",
        )


def _check_held_out(recipe: Recipe, name: str) -> None:
    """The evaluation text is none of the files a step calibrates or trains on."""
    held_out = recipe.eval.data
    if not held_out.is_file():
        return  # said by the caller, which checks that every named file exists
    digest = sha256_file(held_out)
    for i, step in enumerate(recipe.steps):
        used = [step.data] if isinstance(step, PruneStep) and step.data else []
        used += step.data if isinstance(step, DistillStep) else []
        for other in used:
            if other.is_file() and (other == held_out or sha256_file(other) == digest):
                raise ValidationError(
                    f"{name}: steps.{i} {step.kind}s on {other.name}, the eval text: "
                    "evaluation text must be held out",
                    param="recipe",
                )


def check_layers(recipe: Recipe, n_layer: int, model: str) -> None:
    """Every prune step leaves at least one block of the `n_layer` the model has, counting the
    blocks the steps before it removed."""
    left = n_layer
    for i, step in enumerate(recipe.steps):
        if not isinstance(step, PruneStep):
            continue
        gone = step.remove if step.remove is not None else len(set(step.layers or []))
        if gone >= left or any(n < 0 or n >= left for n in step.layers or []):
            raise ValidationError(
                f"steps.{i}: {model} has {left} layers at that step; prune must leave at least "
                f"one (remove 1..{left - 1}, layers 0..{left - 1})",
                param="recipe",
            )
        left -= gone


@dataclass(slots=True)
class StepResult:
    index: int  # 1-based, as in the file names
    kind: str  # prune, distill, quantize, eval
    artifact: Path  # the file this step made (an eval step: the one it gated)
    sha256: str
    size_bytes: int
    metrics: dict[str, float]  # the evaluation against the original (kl_mean, top1, ppl, ...)
    decode_tps: float  # single-stream greedy decode speed, tokens/s
    seconds: float  # wall time of the step itself (not its evaluation)
    gate: dict[str, Any] | None  # the verdict, when the step had a gate
    params: dict[str, Any] = field(default_factory=dict)  # the step as the recipe gave it


StepRunner = Callable[[Any, Path, Path, Path], None]  # (step, source, output, original)


def run_recipe(
    model: Path,
    recipe: Recipe,
    out_dir: Path,
    runners: dict[str, StepRunner],
    *,
    threads: int,
    progress: Progress | None = None,
    say: Say | None = None,
) -> list[StepResult]:
    """Every step in order until one's gate fails; the results so far (the original first,
    as step 0)."""
    from edgellm.compress.sweep import decode_speed

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = recipe.eval
    original = _measure(model, model, spec, threads, progress)
    results = [_result(0, "original", model, original, decode_speed(model, threads), 0.0, None)]
    current = model
    for index, step in enumerate(recipe.steps, 1):
        if say is not None:
            say(f"step {index}: {step.kind}")
        started = time.perf_counter()
        if step.kind != "eval":
            output = out_dir / f"{index:02d}-{_label(step)}.gguf"
            runners[step.kind](step, current, output, model)
            current = output
        seconds = time.perf_counter() - started
        evaluation = _measure(current, model, spec, threads, progress)
        gate = parse_gate(step.gate) if step.gate is not None else None
        verdict = gate.verdict(evaluation.metrics) if gate is not None else None
        tps = decode_speed(current, threads)
        evaluation.extra["decode_tps"] = tps
        if current != model:  # the original's own manifest is the user's, not ours to write
            record_eval(current, eval_record(evaluation, spec.data, model), verdict)
        result = _result(index, step.kind, current, evaluation, tps, seconds, verdict)
        result.params = step.model_dump(mode="json", exclude={"gate"})
        results.append(result)
        if verdict is not None and not verdict["passed"]:
            break
    return results


def _label(step: Any) -> str:
    return f"quantize-{step.type.upper()}" if step.kind == "quantize" else str(step.kind)


def _measure(model: Path, original: Path, spec: EvalSpec, threads: int, progress: Any) -> Any:
    step = None
    if progress is not None:
        step = lambda done, total: progress(f"evaluate {model.name}", done, total)  # noqa: E731
    (result,) = evaluate(
        [model], spec.data, ref=original, ctx=spec.ctx, chunks=spec.chunks, threads=threads,
        progress=step,
    )  # fmt: skip
    return result


def _result(
    index: int,
    kind: str,
    path: Path,
    evaluation: Any,
    tps: float,
    seconds: float,
    verdict: dict[str, Any] | None,
) -> StepResult:
    metrics = dict(evaluation.metrics)
    return StepResult(
        index, kind, path, sha256_file(path), path.stat().st_size, metrics, tps, seconds, verdict
    )


def failed_gate(results: list[StepResult]) -> StepResult | None:
    last = results[-1]
    return last if last.gate is not None and not last.gate["passed"] else None


def write_report(results: list[StepResult], recipe: Path, out_dir: Path) -> list[Path]:
    """report.json, report.md and (with matplotlib) report.png in `out_dir`, each atomic."""
    rows = [_row(r) for r in results]
    record = json.dumps({"recipe": str(recipe), "steps": rows}, indent=2)
    written = [
        _atomic(out_dir / "report.json", record),
        _atomic(out_dir / "report.md", _markdown(rows, recipe)),
    ]
    with contextlib.suppress(ImportError):  # the plot needs the plot extra; the table suffices
        written.append(_plot(rows, out_dir / "report.png"))
    return written


def _row(r: StepResult) -> dict[str, Any]:
    m = r.metrics
    return {
        "step": r.index,
        "kind": r.kind,
        "artifact": r.artifact.name,
        "sha256": r.sha256,
        "mib": round(r.size_bytes / 2**20, 2),
        "ppl": m.get("ppl"),
        "ppl_ratio": m.get("ppl_ratio"),
        "kl_mean": m.get("kl_mean"),
        "top1": m.get("top1"),
        "decode_tps": round(r.decode_tps, 1),
        "seconds": round(r.seconds, 1),
        "gate": r.gate,
        "params": r.params,
    }


def _markdown(rows: list[dict[str, Any]], recipe: Path) -> str:
    lines = [
        f"# edgellm compress: {recipe.name}",
        "",
        "| step | kind | file | MiB | ppl | ppl ratio | KL mean | top-1 | decode tok/s | gate |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        gate = (
            ""
            if r["gate"] is None
            else f"{r['gate']['expr']}: " + ("passed" if r["gate"]["passed"] else "**failed**")
        )
        lines.append(
            f"| {r['step']} | {r['kind']} | {r['artifact']} | {r['mib']:.1f} | {r['ppl']:.3f} "
            f"| {_num(r['ppl_ratio'], 1.0):.4f} | {_num(r['kl_mean'], 0.0):.4f} "
            f"| {_num(r['top1'], 1.0):.3f} "
            f"| {r['decode_tps']:.1f} | {gate} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None, original: float) -> float:
    """A metric of the report; None only for the original, which is `original` by definition."""
    return original if value is None else value


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["kind"] != "eval"]  # an eval step is its artifact's point again
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    mib = [r["mib"] for r in rows]
    for ax, key, label in zip(
        axes,
        ("kl_mean", "ppl", "decode_tps"),
        ("KL vs the original (nats/token)", "perplexity", "decode tokens/s"),
        strict=True,
    ):
        values = [_num(r[key], 0.0) for r in rows]
        ax.plot(mib, values, "-o", color="tab:blue")
        for r, x, y in zip(rows, mib, values, strict=True):
            ax.annotate(f"{r['step']} {r['kind']}", (x, y), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("edgellm compress: every step against the original")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
