"""A llama GGUF as an ONNX graph, through the torch bridge and torch's exporter.

The graph is KV-cache-free: `input_ids` [batch, sequence] int64 in, `logits` [batch, sequence,
n_vocab] float32 out, every position computed on each run (both axes dynamic). That is what a
scorer, a classifier or a first ONNX Runtime / TensorRT trial needs; incremental decoding wants
past key/value inputs and outputs, which this first version does not have.

Written into a directory: `model.onnx` (weights inside, or in `model.onnx.data` beside it when
they pass ONNX's 2 GB protobuf limit) and `model.onnx.manifest.json` (edgellm's manifest: the
source GGUF's record, the graph's inputs and outputs, the vocabulary size).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.compress.gguf_model import check_llama, need_torch, read_config
from edgellm.compress.manifest import new_manifest, save_manifest
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.records import file_record

ONNX_MISSING = "edgellm export --format onnx needs onnx: pip install 'edgellm[onnx]'"
GRAPH = "model.onnx"
EXTERNAL_DATA = GRAPH + ".data"
OPSET = 18  # ONNX Runtime >= 1.14 and TensorRT >= 8.6 run opset 18 graphs
_PROTOBUF_LIMIT = 2 * 10**9 - 2**24  # bytes of weights a single .onnx file may hold, less headroom
_EXAMPLE_SHAPE = (2, 8)  # traced with B, T > 1 so neither axis is specialised to a constant


@dataclass(slots=True)
class OnnxExport:
    """What `export_onnx` wrote."""

    graph: Path  # DIR/model.onnx
    external_data: Path | None  # DIR/model.onnx.data when the weights live outside the graph
    manifest: Path  # DIR/model.onnx.manifest.json
    n_vocab: int  # last axis of the logits
    seconds: float  # wall time of the export


def need_onnx() -> None:
    need_torch()
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):
        raise ValidationError(ONNX_MISSING)


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValidationError(f"--output {out_dir} is a file; export writes a directory")
    if not out_dir.parent.is_dir():
        raise ValidationError(f"the directory of --output {out_dir} does not exist")


def export_onnx(source: Path, out_dir: Path) -> OnnxExport:
    """Export the llama GGUF `source` (any weight type; computed in float32) into `out_dir`
    (made if missing). Files appear under their names only once complete."""
    check_output_dir(out_dir)
    need_onnx()
    config = read_config(check_llama(source), source)  # a bad file fails before torch loads
    started = time.perf_counter()
    from edgellm.compress.torch_bridge import load_module

    module = load_module(source)
    n_bytes = sum(p.numel() * 4 for p in module.parameters())
    made_dir = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    graph, data = out_dir / GRAPH, out_dir / EXTERNAL_DATA
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        _export(module, stage / GRAPH, n_bytes > _PROTOBUF_LIMIT)
        # torch itself moves the weights out of the graph above its own threshold (1.5 GiB),
        # so what was written decides, not what was asked for
        external = (stage / EXTERNAL_DATA).exists()
        if external:
            os.replace(stage / EXTERNAL_DATA, data)  # the data first: the graph refers to it
        os.replace(stage / GRAPH, graph)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if made_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise EdgeLLMError(f"could not write {graph}: {exc.strerror or exc}") from exc
        raise
    shutil.rmtree(stage, ignore_errors=True)
    if not external:
        data.unlink(missing_ok=True)  # from an earlier, bigger export into the same directory
    manifest = save_manifest(graph, _manifest(graph, source, config.n_vocab, external))
    return OnnxExport(
        graph=graph,
        external_data=data if external else None,
        manifest=manifest,
        n_vocab=config.n_vocab,
        seconds=time.perf_counter() - started,
    )


def _export(module: Any, path: Path, external: bool) -> None:
    import torch

    class Logits(torch.nn.Module):  # forward(tokens) -> logits: the exporter's one signature
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids)  # type: ignore[no-any-return]

    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=1, max=max(module.config.n_ctx_train, 16))
    example = torch.zeros(_EXAMPLE_SHAPE, dtype=torch.int64)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            Logits().eval(),
            (example,),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
            opset_version=OPSET,
            optimize=False,  # onnxscript's pass takes ~55 s on SmolLM2; runtimes optimise at load
            verbose=False,
        )
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise EdgeLLMError("torch.onnx.export returned no program")
    program.save(str(path), external_data=external)


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """The exporter prints its progress and warns about its own internals; neither is the
    user's concern (a failure still raises)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _manifest(graph: Path, source: Path, n_vocab: int, external: bool) -> dict[str, Any]:
    manifest = new_manifest(
        graph,
        method="export",
        parent=file_record(source),
        params={"format": "onnx", "opset": OPSET, "dtype": "float32", "kv_cache": False},
    )
    manifest["graph"] = {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", n_vocab]}
        ],
        "n_vocab": n_vocab,
        "external_data": EXTERNAL_DATA if external else None,
        "positions": "0..sequence-1 for every row: no padding-aware positions, no KV cache",
    }
    return manifest
