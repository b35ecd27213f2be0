"""`edgellm export`: a llama GGUF as an ONNX graph for ONNX Runtime (NPUs, DirectML) or TensorRT."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgellm.cli.console import err, user_errors
from edgellm.errors import ValidationError

FORMATS = ("onnx",)


@user_errors
def export(
    model: Path = typer.Argument(
        ..., help="llama-architecture GGUF (any weight type), or a registry name."
    ),
    fmt: str = typer.Option("onnx", "--format", help="Output format: onnx."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write model.onnx into."),
) -> None:
    """Export a llama GGUF (SmolLM2, DeepSeek-R1-Distill-Llama) as an ONNX graph in float32:
    input_ids (batch x sequence, int64) in, logits (batch x sequence x vocabulary, float32)
    out, batch and sequence dynamic. The graph has no KV cache: every run computes all
    positions (fine for scoring and a first ONNX Runtime / TensorRT trial, slow for decoding
    token by token). A manifest (source SHA-256, inputs, outputs) goes beside model.onnx.
    Needs edgellm's onnx extra (PyTorch, onnx, onnxscript, onnxruntime).

    Example: edgellm export model.f16.gguf --format onnx -o model-onnx/
    """
    if fmt.lower() not in FORMATS:
        raise ValidationError(f"unknown export format {fmt!r}; known: onnx", param="format")
    from edgellm.compress.onnx_export import check_output_dir, export_onnx, need_onnx
    from edgellm.registry import model_file

    check_output_dir(output)
    need_onnx()
    with (
        model_file(model, writes_weights=True) as (path, _),
        err.status(f"exporting {escape(path.name)} to ONNX"),
    ):
        result = export_onnx(path, output)
    size = sum(p.stat().st_size for p in (result.graph, result.external_data) if p) / 2**20
    err.print(
        f"wrote {escape(str(result.graph))} ({size:.1f} MiB, vocabulary {result.n_vocab}, "
        f"{result.seconds:.0f} s); manifest {escape(str(result.manifest))}"
    )
