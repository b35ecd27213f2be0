"""`edgellm prune`: depth pruning. Whole blocks (layers) leave the model, the rest are
renumbered, and every remaining tensor keeps its type and bytes.

Which blocks: by block influence (ShortGPT, Men et al. 2024), the blocks that change the hidden
state least, or simply the last ones, or a list the user gives. The influence of block i is
    BI_i = 1 - mean over tokens t of cos(h_in_i[t], h_out_i[t])
with h_in_0 the token embeddings and h_out_i block i's output (the residual stream after it),
measured on calibration text cut into windows the way evaluation cuts them. A block whose
output points where its input did (BI near 0) adds little; removing the lowest-BI blocks first
costs least. The hidden states come from llama.cpp's graph through an eval callback (no
torch), and the cut is llama.cpp's quantizer in copy mode with `prune_layers`: it leaves those
blocks' tensors out, renumbers the others and updates `{arch}.block_count`. Models whose
metadata has per-layer arrays are refused (the quantizer would keep the old arrays).

The output is written into a scratch directory beside it and renamed into place, the manifest
last: a failure leaves neither.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgellm.backends import BlockCosines, load_hidden_scorer, quantize_file
from edgellm.compress.manifest import new_manifest, save_manifest
from edgellm.compress.quantize import QuantizerLog, check_output, free_space, scratch_dir
from edgellm.errors import EdgeLLMError, ValidationError
from edgellm.evaluate.run import read_text, split_windows
from edgellm.modelfile import ModelInfo, inspect_gguf
from edgellm.records import file_record

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Method(StrEnum):
    INFLUENCE = "influence"  # the lowest block influence first
    LAST = "last"  # the last blocks
    LAYERS = "layers"  # the blocks the user named


@dataclass(slots=True)
class Calibration:
    data: Path  # calibration text
    ctx: int  # tokens per window
    chunks: int | None  # at most this many windows


@dataclass(slots=True)
class Influence:
    scores: list[float]  # [n_layer]: BI_i = 1 - mean cos(h_in_i, h_out_i); 0 = changes nothing
    windows: int  # calibration windows decoded
    tokens: int  # tokens averaged over, per block


@dataclass(slots=True)
class PruneResult:
    output: Path
    manifest: Path
    removed: list[int]  # blocks of the source left out, ascending (source numbering)
    n_layer: int  # blocks in the source; the output has n_layer - len(removed)
    influence: Influence | None  # None when no calibration text was given
    seconds: float


def layer_count(info: ModelInfo) -> int:
    count = info.metadata.get(f"{info.architecture}.block_count")
    if not isinstance(count, int) or count < 1:
        raise ValidationError(f"{info.path.name} has no {info.architecture}.block_count")
    return count


def model_name(info: ModelInfo) -> str:
    """How messages name a model: its GGUF basename ("SmolLM2"), else the file's name."""
    name = info.metadata.get("general.basename") or info.metadata.get("general.name")
    return str(name) if name else info.path.name


def parse_layers(text: str, n_layer: int, name: str) -> list[int]:
    """`--layers 3,17`: distinct block numbers 0..n_layer-1, at least one block kept."""
    layers: list[int] = []
    for part in text.split(","):
        if not (part.strip().isascii() and part.strip().isdigit()):  # "²" is a digit too
            raise ValidationError(
                f"--layers takes block numbers like 3,17; {part.strip()!r} is not one",
                param="layers",
            )
        layer = int(part)
        if layer >= n_layer:
            raise ValidationError(
                f"--layers {layer} is out of range: {name} has {n_layer} layers (0..{n_layer - 1})",
                param="layers",
            )
        if layer in layers:
            raise ValidationError(f"--layers names layer {layer} twice", param="layers")
        layers.append(layer)
    if len(layers) >= n_layer:
        raise ValidationError(
            f"--layers removes all {n_layer} layers of {name}; keep at least one",
            param="layers",
        )
    return sorted(layers)


def check_remove(remove: int, n_layer: int, name: str) -> None:
    if not 1 <= remove < n_layer:
        raise ValidationError(
            f"{name} has {n_layer} layers; --remove must be 1..{n_layer - 1}", param="remove"
        )


def choose_layers(
    method: Method, remove: int, n_layer: int, scores: list[float] | None
) -> list[int]:
    """The `remove` blocks `method` takes out, ascending. Influence ties go to the later block
    (the deeper blocks are the more redundant ones in ShortGPT's measurements)."""
    if method is Method.LAST:
        return list(range(n_layer - remove, n_layer))
    if scores is None:
        raise ValidationError("--method influence needs --data TEXT to measure on", param="data")
    order = sorted(range(n_layer), key=lambda i: (scores[i], -i))
    return sorted(order[:remove])


def block_influence(
    model: Path, calibrate: Calibration, threads: int, progress: Progress | None = None
) -> Influence:
    """BI of every block of `model` over the windows of the calibration text."""
    info = inspect_gguf(model)
    n_layer = layer_count(info)
    text = read_text(calibrate.data)
    cosines = BlockCosines()
    scorer = load_hidden_scorer(model, calibrate.ctx, threads, cosines)
    try:
        bos = scorer.bos if scorer.add_bos else None
        windows = split_windows(scorer.tokenize(text), calibrate.ctx, calibrate.chunks, bos)
        for done, window in enumerate(windows, 1):
            try:
                scorer.window_logits(window.tolist(), 0)  # every row: the last block keeps all
            finally:
                if cosines.error is not None:  # Ctrl-C or a failure inside the callback
                    raise cosines.error
            if progress is not None:
                progress("influence", done, len(windows))
    finally:
        scorer.close()
    missing = [i for i in range(n_layer) if not cosines.tokens.get(i)]
    if missing:
        raise EdgeLLMError(
            f"llama.cpp's graph for {info.architecture} showed no output of blocks {missing} "
            "(embd / l_out-N): block influence cannot be measured for it"
        )
    scores = [1.0 - cosines.sums[i] / cosines.tokens[i] for i in range(n_layer)]
    if not all(math.isfinite(s) for s in scores):
        raise EdgeLLMError(f"block influence of {model.name} is not finite: {scores}")
    return Influence(scores=scores, windows=len(windows), tokens=cosines.tokens[0])


def check_prunable(path: Path, info: ModelInfo, n_layer: int) -> None:
    """Refuse models with per-layer metadata arrays (head counts per layer, sliding-window
    patterns, ...): llama.cpp's quantizer renumbers tensors but keeps those arrays whole."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    prefix = f"{info.architecture}."
    for field in reader.fields.values():
        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        if field.name.startswith(prefix) and is_array and len(field.data) == n_layer:
            raise ValidationError(
                f"{path.name} ({info.architecture}) has the per-layer metadata array "
                f"{field.name}, which pruning would leave stale; edgellm prunes models whose "
                "layers are uniform (llama, qwen2, ...: SmolLM2, DeepSeek-R1-Distill)",
                param="model",
            )


def prune(
    source: Path,
    output: Path,
    *,
    method: Method,
    remove: int | None = None,
    layers: str | None = None,
    calibrate: Calibration | None,
    threads: int,
    progress: Progress | None = None,
    measured: Influence | None = None,
) -> PruneResult:
    """Remove `remove` blocks chosen by `method` (influence or last), or the `layers` given
    ("3,17"), from `source` into `output`, with a manifest beside it. `measured`: the
    influence of `source`'s blocks on `calibrate`'s text, already measured (not again)."""
    started = time.perf_counter()
    info = inspect_gguf(source)
    n_layer = layer_count(info)
    named = _check_args(source, output, info, method, remove, layers, calibrate)
    check_prunable(source, info, n_layer)
    influence = measured
    if calibrate is not None and influence is None:
        influence = block_influence(source, calibrate, threads, progress)
    scores = influence.scores if influence is not None else None
    chosen = named if named is not None else choose_layers(method, remove or 0, n_layer, scores)
    parent = file_record(source)
    with scratch_dir(output) as scratch:
        partial = scratch / "output.gguf"
        _cut(source, partial, chosen, threads, progress)
        _check_cut(partial, n_layer - len(chosen))
        os.replace(partial, output)
    params = _params(
        Method.LAYERS if layers is not None else method, chosen, n_layer, influence, calibrate
    )
    path = save_manifest(output, new_manifest(output, method="prune", parent=parent, params=params))
    return PruneResult(output, path, chosen, n_layer, influence, time.perf_counter() - started)


def _check_args(
    source: Path,
    output: Path,
    info: ModelInfo,
    method: Method,
    remove: int | None,
    layers: str | None,
    calibrate: Calibration | None,
) -> list[int] | None:
    """Everything that can be said before any work; the blocks `layers` names."""
    n_layer, name = layer_count(info), model_name(info)
    check_output(source, output)
    if (remove is None) == (layers is None):
        raise ValidationError("give --remove N or --layers LIST (one of them)", param="remove")
    if remove is not None:
        check_remove(remove, n_layer, name)
    named = parse_layers(layers, n_layer, name) if layers is not None else None
    if calibrate is not None and (calibrate.ctx < 8 or calibrate.ctx % 2):
        raise ValidationError("--ctx must be an even number of tokens, at least 8", param="ctx")
    if method is Method.INFLUENCE and named is None and calibrate is None:
        raise ValidationError("--method influence needs --data TEXT to measure on", param="data")
    if calibrate is not None:
        read_text(calibrate.data)  # a missing or empty file is said before anything is read
    return named


def _cut(
    source: Path, dest: Path, layers: Sequence[int], threads: int, progress: Progress | None
) -> None:
    """llama.cpp's quantizer in copy mode, leaving `layers` out. Its log counts the source's
    tensors ("[ i/ n]") and stops short of n by the tensors left out: the bar is closed here."""
    done = [0, 1]  # the last "[ i/ n]" seen

    def tensor_done(_: str, i: int, n: int) -> None:
        done[:] = [i, n]
        if progress is not None:
            progress("prune", i, n)

    logger = logging.getLogger("edgellm.llama_cpp")
    handler = QuantizerLog(tensor_done)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the quantizer's log is long; its errors reach the user below
    try:
        quantize_file(source, dest, 0, threads=threads, only_copy=True, prune_layers=layers)
    except EdgeLLMError:
        why = handler.errors[-1] if handler.errors else "no reason given"
        raise EdgeLLMError(
            f"llama.cpp could not write the pruned model: {why} ({free_space(dest)}); "
            "nothing was kept"
        ) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    if progress is not None:
        progress("prune", done[0], done[0])


def _check_cut(path: Path, want: int) -> None:
    got = layer_count(inspect_gguf(path))
    if got != want:
        raise EdgeLLMError(f"the pruned model has {got} layers, not {want}; nothing was kept")


def _params(
    method: Method,
    removed: list[int],
    n_layer: int,
    influence: Influence | None,
    calibrate: Calibration | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "method": method.value,
        "removed": removed,
        "layers_before": n_layer,
        "layers_after": n_layer - len(removed),
        "scores": influence.scores if influence is not None else None,
    }
    if calibrate is not None and influence is not None:
        params |= {
            "data": file_record(calibrate.data),
            "ctx": calibrate.ctx,
            "chunks": calibrate.chunks,
            "windows": influence.windows,
            "tokens": influence.tokens,
        }
    return params
