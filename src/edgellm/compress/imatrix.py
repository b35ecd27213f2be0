"""Importance matrices: which input columns of each weight matrix carry the most energy.

For a weight W used as `W @ x`, llama.cpp's quantizers weigh the rounding error of column j by
mean(x_j^2) over calibration text, so the columns that matter most are kept most exactly (the
IQ types depend on it). We compute it by running the model over the text with an eval callback
(`ImatrixCollector`) and store it in llama.cpp's own imatrix GGUF format (`<name>.in_sum2`,
`<name>.counts`), so files from `llama-imatrix` and ours are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.backends import ActivationSums, load_scorer
from edgellm.errors import ValidationError

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass(slots=True)
class Imatrix:
    in_sum2: dict[str, Any]  # weight name -> float32 [n_mat, n_in]: sum of x_j^2 over tokens
    counts: dict[str, Any]  # weight name -> float32 [n_mat]: activation rows summed
    chunks: int  # windows of text it was computed over
    chunk_size: int  # tokens per window
    datasets: list[str]  # where the text came from

    def for_quantizer(self) -> dict[str, Any]:
        """Mean squared activation per column, flattened: what llama.cpp's quantizer takes."""
        out = {}
        for name, sums in self.in_sum2.items():
            counts = np.maximum(self.counts[name], 1.0)[:, None]
            out[name] = (sums / counts).astype(np.float32).ravel()
        return out


def compute_imatrix(
    model: Path,
    windows: list[list[int]],
    *,
    n_ctx: int,
    threads: int,
    dataset: str,
    progress: Progress | None = None,
) -> Imatrix:
    sums = ActivationSums()
    scorer = load_scorer(model, n_ctx, threads, imatrix=sums)
    try:
        for done, window in enumerate(windows, 1):
            scorer.window_logits(window, len(window) - 1)
            if progress is not None:
                progress(done, len(windows))
    finally:
        scorer.close()
    if not sums.in_sum2:
        raise ValidationError("the model fed no weight matrix that an imatrix covers")
    return Imatrix(
        in_sum2={k: v.astype(np.float32)[None, :] for k, v in sums.in_sum2.items()},
        counts={k: np.array([float(n)], dtype=np.float32) for k, n in sums.counts.items()},
        chunks=len(windows),
        chunk_size=n_ctx,
        datasets=[dataset],
    )


def save_imatrix(imatrix: Imatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", imatrix.datasets)
    writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.in_sum2):
        writer.add_tensor(f"{name}.in_sum2", imatrix.in_sum2[name])
        writer.add_tensor(f"{name}.counts", imatrix.counts[name][:, None])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_imatrix(path: Path) -> Imatrix:
    """An imatrix GGUF (ours or llama-imatrix's). The legacy .dat format is not read."""
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises many kinds on malformed input
        raise ValidationError(
            f"{path} is not an imatrix GGUF (llama-imatrix's legacy .dat files are not read; "
            "make a GGUF one with `--calibrate` or `llama-imatrix --output-format gguf`)",
            param="imatrix",
        ) from exc
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    in_sum2, counts = {}, {}
    for key, values in tensors.items():
        if key.endswith(".in_sum2"):
            name = key.removesuffix(".in_sum2")
            count = tensors.get(f"{name}.counts")
            if count is None:
                raise ValidationError(f"{path}: {name} has sums but no counts", param="imatrix")
            counts[name] = count.reshape(-1)
            in_sum2[name] = values.reshape(counts[name].size, -1)
    if not in_sum2:
        raise ValidationError(f"{path} holds no importance data", param="imatrix")
    chunks = reader.fields.get("imatrix.chunk_count")
    size = reader.fields.get("imatrix.chunk_size")
    datasets = reader.fields.get("imatrix.datasets")
    return Imatrix(
        in_sum2=in_sum2,
        counts=counts,
        chunks=int(chunks.contents()) if chunks else 0,
        chunk_size=int(size.contents()) if size else 0,
        datasets=list(datasets.contents()) if datasets else [],
    )
