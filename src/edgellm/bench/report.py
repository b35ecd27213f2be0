"""The benchmark's outputs: the summary tables, the JSON record and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.bench.runner import LevelResult, describe_errors
from edgellm.bench.stats import Distribution
from edgellm.errors import ValidationError


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _level_name(level: LevelResult) -> str:
    c = "inf" if level.concurrency is None else str(level.concurrency)
    rate = "" if math.isinf(level.rate) else f" @{level.rate:g}/s"
    return c + rate


def _pair(d: Distribution) -> str:
    return f"{_ms(d.p50)}/{_ms(d.p99)}"


def print_report(console: Console, title: str, levels: list[LevelResult]) -> None:
    table = Table(title=escape(title), title_justify="left")
    columns = [
        "conc.",
        "ok",
        "req/s",
        "out tok/s",
        "TTFT ms p50/p99",
        "TPOT ms p50/p99",
        "E2E s p50",
    ]
    with_goodput = any(level.summary.goodput is not None for level in levels)
    for name in [*columns, "goodput req/s"] if with_goodput else columns:
        table.add_column(name, justify="right")
    for level in levels:
        s = level.summary
        row = [
            _level_name(level),
            f"{s.completed}/{s.requests}",
            f"{s.request_throughput:.2f}",
            f"{s.output_throughput:.1f}",
            _pair(s.ttft),
            _pair(s.tpot),
            "-" if s.e2e.p50 is None else f"{s.e2e.p50:.2f}",
        ]
        if with_goodput:
            row.append("-" if s.goodput is None else f"{s.goodput:.2f}")
        table.add_row(*row)
    console.print(table)
    for level in levels:
        _print_detail(console, level)


def _print_detail(console: Console, level: LevelResult) -> None:
    s = level.summary
    table = Table(title=f"concurrency {_level_name(level)}: latency (ms)", title_justify="left")
    for name in ("metric", "mean", "p50", "p90", "p99"):
        table.add_column(name, justify="right" if name != "metric" else "left")
    dists: list[tuple[str, Distribution]] = [
        ("TTFT", s.ttft),
        ("TPOT", s.tpot),
        ("ITL", s.itl),
        ("E2E", s.e2e),
    ]
    for name, d in dists:
        table.add_row(name, _ms(d.mean), _ms(d.p50), _ms(d.p90), _ms(d.p99))
    console.print(table)
    cached = f" ({s.cached_tokens} reused from cache)" if s.cached_tokens else ""
    tokens = f"{s.input_tokens} input{cached} + {s.output_tokens} output tokens in "
    tokens += f"{s.duration:.1f} s; "
    tokens += f"{s.total_token_throughput:.1f} total tok/s; ITL p99 {_ms(s.itl.p99)} ms"
    decode = (
        f"; decode {s.decode_tokens_per_s:.1f} tok/s per stream" if s.decode_tokens_per_s else ""
    )
    console.print(f"  {tokens}{decode}")
    if s.errors:
        console.print(f"  [red]errors:[/red] {escape(describe_errors(level.records))}")


def write_json(path: Path, config: dict[str, Any], levels: list[LevelResult]) -> None:
    record = {"config": config, "levels": [level.to_json() for level in levels]}
    try:
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot write {path}: {exc.strerror}", param="json") from None


def write_plot(path: Path, title: str, levels: list[LevelResult]) -> None:
    """Several levels: latency percentiles and throughput against concurrency. One level: the
    distribution (CDF) of TTFT and TPOT."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        raise ValidationError(
            "--plot needs matplotlib: pip install 'edgellm[plot]'", param="plot"
        ) from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(title)
    if len(levels) > 1 and all(level.concurrency for level in levels):
        xs = [level.concurrency for level in levels]
        for metric in ("ttft", "tpot"):
            for q in ("p50", "p99"):
                values = [getattr(getattr(lv.summary, metric), q) for lv in levels]
                ys = [math.nan if v is None else 1000 * v for v in values]
                left.plot(xs, ys, marker="o", label=f"{metric.upper()} {q}")
        left.set(xlabel="concurrency", ylabel="ms", xscale="log", yscale="log", title="latency")
        left.set_xticks(xs, [str(x) for x in xs])
        right.plot(xs, [lv.summary.output_throughput for lv in levels], marker="o")
        right.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput", xscale="log")
        right.set_xticks(xs, [str(x) for x in xs])
        right.set_ylim(bottom=0)
        for axis in (left, right):
            axis.xaxis.set_minor_formatter(NullFormatter())
        left.legend()
    else:
        for axis, name in ((left, "ttft"), (right, "tpot")):
            for level in levels:
                values = sorted(
                    1000 * v
                    for r in level.records
                    if r.ok and (v := (r.ttft if name == "ttft" else r.tpot)) is not None
                )
                ranks = [(i + 1) / len(values) for i in range(len(values))]
                axis.step(values, ranks, where="post", label=f"c={_level_name(level)}")
            axis.set(xlabel=f"{name.upper()} ms", ylabel="fraction of requests", title=name)
            axis.legend()
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ValidationError(f"cannot write {path}: {exc.strerror}", param="plot") from None
    finally:
        plt.close(fig)
