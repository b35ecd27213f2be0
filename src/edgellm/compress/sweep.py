"""`edgellm quantize --sweep`: several types of one model, measured side by side.

Each type is quantized (with its manifest), then all of them and the reference are evaluated
on the same windows of the same text (`edgellm.evaluate.run`), and each one's single-stream
decode speed is timed. The table and a PNG of the size / quality frontier say which type to
deploy; every evaluation is also written into its model's manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.backends import load_scorer
from edgellm.compress.manifest import record_eval
from edgellm.compress.qtypes import QuantType
from edgellm.compress.quantize import Calibration, Notice, Progress, quantize
from edgellm.evaluate.run import eval_record, evaluate
from edgellm.modelfile import model_id_from_path

DECODE_TOKENS = 64  # greedy tokens timed per model


@dataclass(slots=True)
class SweepRow:
    name: str  # quantization type, or "reference"
    path: Path
    size_bytes: int
    bits_per_weight: float  # file bits / parameters (metadata included)
    decode_tps: float  # single-stream greedy decode, tokens/s
    metrics: dict[str, float]


def sweep(
    source: Path,
    types: list[QuantType],
    out_dir: Path,
    *,
    ref: Path,
    data: Path,
    ctx: int,
    chunks: int | None,
    threads: int,
    imatrix_file: Path | None = None,
    calibrate: Calibration | None = None,
    progress: Progress | None = None,
    notice: Notice | None = None,
) -> list[SweepRow]:
    outputs: list[Path] = []
    for qtype in types:
        output = out_dir / f"{model_id_from_path(source)}.{qtype.name}.gguf"
        made = quantize(
            source,
            qtype,
            output,
            imatrix_file=imatrix_file,
            calibrate=calibrate,
            threads=threads,
            progress=_per_type(progress, qtype.name),
            notice=notice,
        )
        outputs.append(made.output)
        notice = None  # said once is enough
    step: Callable[[int, int], None] | None = None
    if progress is not None:
        step = lambda done, total: progress("evaluate", done, total)  # noqa: E731
    results = evaluate(
        outputs, data, ref=ref, ctx=ctx, chunks=chunks, threads=threads, progress=step
    )
    n_params = _parameters(ref)
    rows = []
    for name, result in [("reference", None), *zip([t.name for t in types], results, strict=True)]:
        path = result.model if result is not None else ref
        tps = decode_speed(path, threads)
        if result is not None:
            result.extra["decode_tps"] = tps
            record_eval(path, eval_record(result, data, ref), None)
        metrics = result.metrics if result is not None else (results[0].ref_metrics or {})
        size = path.stat().st_size
        rows.append(SweepRow(name, path, size, size * 8 / n_params, tps, metrics))
    return rows


def decode_speed(path: Path, threads: int) -> float:
    """Best of two timed greedy decodes of DECODE_TOKENS tokens after a short prompt."""
    scorer = load_scorer(path, 256, threads)
    try:
        prompt = scorer.tokenize("The history of the city begins with a small settlement")
        return max(scorer.decode_speed(prompt, DECODE_TOKENS) for _ in range(2))
    finally:
        scorer.close()


def _per_type(progress: Progress | None, name: str) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{stage} {name}", done, total)


def _parameters(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(path, "r")
    return sum(int(t.n_elements) for t in reader.tensors)


def frontier(rows: list[SweepRow], key: str) -> list[SweepRow]:
    """The Pareto-optimal rows: no other row is both smaller and better on `key`."""
    best: list[SweepRow] = []
    for row in sorted(rows, key=lambda r: (r.size_bytes, r.metrics[key])):
        if not best or row.metrics[key] < best[-1].metrics[key]:
            best.append(row)
    return best


def plot_frontier(rows: list[SweepRow], path: Path, title: str) -> None:
    """PNG: file size (MiB) against mean KL divergence and perplexity; every type a labelled
    point (with its decode speed), the size / quality frontier a line. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(13, 5))
    quantized = [r for r in rows if r.name != "reference"]
    panels = (
        (ax_kl, "kl_mean", quantized, "mean KL divergence from the reference (nats/token)"),
        (ax_ppl, "ppl", rows, "perplexity"),
    )
    for ax, key, subset, label in panels:
        ax.scatter([r.size_bytes / 2**20 for r in subset], [r.metrics[key] for r in subset])
        best = frontier(subset, key)
        ax.plot(
            [r.size_bytes / 2**20 for r in best],
            [r.metrics[key] for r in best],
            "-",
            alpha=0.5,
            label="frontier: nothing smaller is better",
        )
        for r in subset:
            ax.annotate(
                f"{r.name} ({r.decode_tps:.0f} tok/s)",
                (r.size_bytes / 2**20, r.metrics[key]),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=7,
            )
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    ax_kl.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows_as_dicts(rows: list[SweepRow]) -> list[dict[str, Any]]:
    return [
        {
            "type": r.name,
            "path": str(r.path),
            "size_bytes": r.size_bytes,
            "bits_per_weight": r.bits_per_weight,
            "decode_tps": r.decode_tps,
        }
        | r.metrics
        for r in rows
    ]
