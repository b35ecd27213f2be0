"""`edgellm plan`: the estimates table, the recommendation, and the --here measurements."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError
from edgellm.plan.arch import NOMINAL_BPW, Architecture, from_gguf, known_size
from edgellm.plan.catalog import Device, find_device, load_catalog
from edgellm.plan.estimate import (
    HEADROOM,
    Efficiency,
    Estimate,
    Workload,
    calibrate,
    default_efficiency,
    estimate,
    largest_concurrency,
    largest_ctx,
    recommend,
    rooflines,
)

# Types a plan considers, best quality first (llama.cpp's published KL rankings for 7B-class
# models: IQ4_XS beats Q4_0 with fewer bits; the IQ types need an importance matrix).
PLAN_TYPES = [
    *("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"),
    *("IQ4_XS", "Q4_0", "Q3_K_M", "Q2_K", "IQ2_M"),
]
GIB = 2**30
ALL_CORES = os.cpu_count() or 1  # the --threads default


@dataclass(slots=True)
class PlanOptions:
    model: str
    device: str | None
    here: bool
    ctx: int
    concurrency: int
    qtype: str | None
    cache_type: str
    catalog: Path | None
    calibration: Path | None
    save_calibration: Path | None
    json_out: bool
    plot: Path | None
    threads: int


@user_errors
def plan(
    model: str = typer.Argument(
        "", help="GGUF file or a known size, e.g. deepseek-r1-distill-qwen-7b."
    ),
    device: str | None = typer.Option(None, help="A device from the catalog (--list-devices)."),
    here: bool = typer.Option(False, "--here", help="Measure this machine and run the model."),
    ctx: int = typer.Option(4096, help="Context per sequence, tokens."),
    concurrency: int = typer.Option(1, help="Sequences served at once."),
    qtype: str | None = typer.Option(None, "--type", "-t", help="Only this weight type."),
    cache_type: str = typer.Option("f16", help="KV cache type: f16, q8_0 or q4_0."),
    catalog: Path | None = typer.Option(None, help="Your own devices (TOML, as devices.toml)."),
    calibration: Path | None = typer.Option(None, help="Use a saved calibration."),
    save_calibration: Path | None = typer.Option(
        None, help="--here: save this machine's numbers and efficiency factors."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON, not a table."),
    plot: Path | None = typer.Option(None, help="Write a PNG of memory vs the device's."),
    show_catalog: bool = typer.Option(False, "--list-devices", help="List the catalog."),
    threads: int = typer.Option(ALL_CORES, min=1, help="CPU threads for --here."),
) -> None:
    """Will MODEL run on a device, how fast, with which quantization: weight, KV cache and
    runtime memory per type, decode / aggregate / prefill tokens/s from the bandwidth and
    compute rooflines, and the best type that fits. --here measures this machine and a real
    run of the model, and reports estimate vs measured.

    Example: edgellm plan deepseek-r1-distill-qwen-7b --device jetson-orin-nano-8gb --ctx 8192

    Example: edgellm plan model.Q8_0.gguf --here --save-calibration here.json
    """
    if cache_type not in ("f16", "q8_0", "q4_0"):
        raise ValidationError("--cache-type must be f16, q8_0 or q4_0", param="cache_type")
    if show_catalog:
        list_devices(catalog, Console(highlight=False))
        return
    if not model:
        raise ValidationError("plan needs a MODEL: a GGUF file or a known size", param="model")
    opts = PlanOptions(
        model=model,
        device=device,
        here=here,
        ctx=ctx,
        concurrency=concurrency,
        qtype=qtype,
        cache_type=cache_type,
        catalog=catalog,
        calibration=calibration,
        save_calibration=save_calibration,
        json_out=json_out,
        plot=plot,
        threads=threads,
    )
    run_plan(opts, Console(highlight=False), err)


def list_devices(catalog_file: Path | None, out: Console) -> None:
    table = Table("device", "name", "memory GiB", "GB/s", "FP16 TFLOPS", "INT8 TOPS", "W")
    for d in load_catalog(catalog_file).values():
        table.add_row(
            d.key, d.name, f"{d.memory_gib:g}", f"{d.bandwidth_gbs:g}", f"{d.f16_tflops:g}",
            f"{d.int8_tops:g}", f"{d.power_w:g}",
        )  # fmt: skip
    out.print(table)


def run_plan(opts: PlanOptions, out: Console, err: Console) -> None:
    path = Path(opts.model)
    is_file = path.exists()
    if opts.here == (opts.device is not None):
        raise ValidationError("choose a device: --device NAME or --here", param="device")
    if opts.here and not is_file:
        raise ValidationError("--here runs the model: give a GGUF file", param="model")
    if opts.ctx < 1 or opts.concurrency < 1:
        raise ValidationError("--ctx and --concurrency must be at least 1", param="ctx")
    types = _types(opts.qtype)
    arch, weights = _model(path, is_file, types)
    device, efficiency = _device(opts, err)
    load = Workload(opts.ctx, opts.concurrency, opts.cache_type)
    if opts.ctx > arch.context:
        err.print(f"[yellow]note:[/yellow] --ctx {opts.ctx} is beyond the trained {arch.context}")
    rows = [
        estimate(arch, device, t, weights[t][0], weights[t][1], load, efficiency) for t in types
    ]
    chosen = recommend(rows, device)
    measured = _measure(opts, path, arch, device, efficiency) if opts.here else None
    if opts.plot is not None:
        _plot(rows, device, opts.plot, f"{arch.name} on {device.name}")
    if opts.json_out:
        out.print_json(json.dumps(_as_json(arch, device, load, efficiency, rows, chosen, measured)))
    else:
        _print(arch, device, load, efficiency, rows, chosen, measured, out)
    if chosen is None:
        need = min(r.total_bytes for r in rows) / GIB
        raise ValidationError(
            f"nothing fits: at ctx {opts.ctx} x concurrency {opts.concurrency} the smallest "
            f"type needs {need:.1f} GiB (KV cache alone {rows[0].kv_bytes / GIB:.1f} GiB) and "
            f"{device.name} has {device.usable_bytes * (1 - HEADROOM) / GIB:.1f} GiB to give; "
            "lower --ctx or --concurrency",
            param="ctx",
        )


def _types(qtype: str | None) -> list[str]:
    if qtype is None:
        return PLAN_TYPES
    name = qtype.strip().upper()
    if name not in NOMINAL_BPW:
        raise ValidationError(
            f"unknown type {qtype!r}; known: {', '.join(NOMINAL_BPW)}", param="type"
        )
    return [name]


def _model(path: Path, is_file: bool, types: list[str]) -> tuple[Architecture, dict[str, Any]]:
    """The architecture and, per type, (weight bytes, exact?)."""
    if not is_file:
        arch = known_size(str(path))
        return arch, {t: (arch.params * NOMINAL_BPW[t] / 8, False) for t in types}
    from edgellm.compress.qtypes import QuantType
    from edgellm.compress.quantize import quantized_bytes

    arch, own_bytes, own_type = from_gguf(path)
    weights: dict[str, Any] = {}
    for t in types:
        if t == own_type:
            weights[t] = (own_bytes, True)
        else:  # llama.cpp's own choice of tensor types, by a dry run of its quantizer
            import gguf

            ftype = int(gguf.LlamaFileType[f"MOSTLY_{t}" if t != "F32" else "ALL_F32"])
            weights[t] = (quantized_bytes(path, QuantType(t, ftype, False)), True)
    return arch, weights


def _device(opts: PlanOptions, err: Console) -> tuple[Device, Efficiency]:
    from edgellm.plan.measure import load_calibration, this_machine

    if opts.calibration is not None:
        machine, efficiency = load_calibration(opts.calibration)
        if opts.here:
            return machine, efficiency
        device = find_device(load_catalog(opts.catalog), opts.device or "")
        return device, efficiency
    if opts.here:
        err.print("measuring this machine's memory bandwidth and arithmetic...")
        machine = this_machine(opts.threads)
        return machine, default_efficiency(machine)
    device = find_device(load_catalog(opts.catalog), opts.device or "")
    return device, default_efficiency(device)


def _measure(
    opts: PlanOptions,
    path: Path,
    arch: Architecture,
    device: Device,
    efficiency: Efficiency,
) -> dict[str, Any]:
    from edgellm.plan.measure import MEASURED_CTX, run_model, save_calibration

    _, own_bytes, own_type = from_gguf(path)
    run = run_model(path, opts.threads)
    load = Workload(MEASURED_CTX, 1, "f16")
    roofs = rooflines(arch, device, own_type, own_bytes, load)
    used = estimate(arch, device, own_type, own_bytes, True, load, efficiency)
    measured_eff = calibrate(
        arch, device, own_type, own_bytes, load, run.decode_tps, run.prefill_tps, str(path)
    )
    if opts.save_calibration is not None:
        save_calibration(opts.save_calibration, device, measured_eff, path, own_type, run)
    rows = {}
    for what, roof, guess, got, eff in (
        ("decode", roofs[0], used.decode_tps, run.decode_tps, measured_eff.decode),
        ("prefill", roofs[1], used.prefill_tps, run.prefill_tps, measured_eff.prefill),
    ):
        rows[what] = {
            "roofline_tps": roof,
            "estimate_tps": guess,
            "measured_tps": got,
            "error": guess / got - 1,
            "efficiency": eff,
        }
    return {
        "type": own_type,
        "efficiency_used": efficiency.source,
        "saved": str(opts.save_calibration) if opts.save_calibration else None,
    } | rows


def _print(
    arch: Architecture,
    device: Device,
    load: Workload,
    efficiency: Efficiency,
    rows: list[Estimate],
    chosen: Estimate | None,
    measured: dict[str, Any] | None,
    out: Console,
) -> None:
    title = (
        f"{arch.name} on {device.name}: ctx {load.ctx} x {load.concurrency}, "
        f"KV {load.cache_type}, usable {device.usable_bytes / GIB:.1f} GiB"
    )
    table = Table(
        "type", "weights GiB", "KV GiB", "other GiB", "total GiB", "fits",
        "decode tok/s", f"x{load.concurrency} tok/s", "prefill tok/s", title=title,
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r.qtype + ("" if r.weights_exact else "~"),
            f"{r.weights_bytes / GIB:.2f}", f"{r.kv_bytes / GIB:.2f}",
            f"{r.overhead_bytes / GIB:.2f}", f"{r.total_bytes / GIB:.2f}",
            "yes" if r.fits else "[red]no[/red]",
            f"{r.decode_tps:.1f}", f"{r.aggregate_tps:.1f}", f"{r.prefill_tps:.0f}",
        )  # fmt: skip
    out.print(table)
    kv_token = arch.kv_bytes_per_token(load.cache_type)
    out.print(
        f"KV cache: {kv_token / 1024:.1f} KiB per token ({arch.layers} layers x 2 x "
        f"{arch.kv_heads} KV heads x {arch.head_dim} dims x {load.cache_type}); "
        f"efficiency: bandwidth {efficiency.bandwidth:.2f}, decode arithmetic "
        f"{efficiency.decode:.2f}, prefill {efficiency.prefill:.2f} ({escape(efficiency.source)})"
        ". ~ = weights from average bits/weight."
    )
    if chosen is not None:
        out.print(
            f"recommended: [bold]{chosen.qtype}[/bold] (best quality that fits with "
            f"{HEADROOM:.0%} headroom); at {chosen.qtype}: up to ctx "
            f"{largest_ctx(arch, device, chosen, load)} at concurrency {load.concurrency}, "
            f"or {largest_concurrency(arch, device, chosen, load)} sequence(s) of ctx {load.ctx}"
            + (" (IQ types need --imatrix or --calibrate)" if chosen.qtype.startswith("IQ") else "")
        )
    if measured is not None:
        check = Table("measured here", "roofline", "estimate", "measured", "error", "factor")
        for what in ("decode", "prefill"):
            m = measured[what]
            check.add_row(
                f"{what} ({measured['type']}) tok/s", f"{m['roofline_tps']:.1f}",
                f"{m['estimate_tps']:.1f}", f"{m['measured_tps']:.1f}", f"{m['error']:+.1%}",
                f"{m['efficiency']:.3f}",
            )  # fmt: skip
        out.print(check)
        out.print(
            f"estimate used efficiency from: {escape(measured['efficiency_used'])}; roofline: "
            "bandwidth / bytes per token (decode), compute / FLOPs per token (prefill); factor: "
            "the calibrated decode-arithmetic and prefill efficiencies"
        )
        if measured["saved"]:
            out.print(f"calibration saved to {escape(measured['saved'])}")


def _as_json(
    arch: Architecture,
    device: Device,
    load: Workload,
    efficiency: Efficiency,
    rows: list[Estimate],
    chosen: Estimate | None,
    measured: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "model": asdict(arch) | {"kv_bytes_per_token": arch.kv_bytes_per_token(load.cache_type)},
        "device": asdict(device) | {"usable_bytes": device.usable_bytes},
        "workload": asdict(load),
        "efficiency": asdict(efficiency),
        "estimates": [asdict(r) | {"total_bytes": r.total_bytes} for r in rows],
        "recommended": chosen.qtype if chosen else None,
        "largest_ctx": largest_ctx(arch, device, chosen, load) if chosen else None,
        "largest_concurrency": largest_concurrency(arch, device, chosen, load) if chosen else None,
        "measured": measured,
    }


def _plot(rows: list[Estimate], device: Device, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValidationError(
            "--plot needs matplotlib: pip install 'edgellm[plot]'", param="plot"
        ) from None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r.qtype for r in rows]
    bottom = [0.0] * len(rows)
    for label, values in (
        ("weights", [r.weights_bytes / GIB for r in rows]),
        ("KV cache", [r.kv_bytes / GIB for r in rows]),
        ("runtime", [r.overhead_bytes / GIB for r in rows]),
    ):
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(device.usable_bytes / GIB, color="red", linestyle="--", label="usable memory")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
