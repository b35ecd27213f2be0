"""Dequantize a GGUF to F16, BF16 or F32 with the `gguf` package, one tensor at a time.

A quantized model is not a good source for another quantization: the new rounding error adds
to the old one. When only a quantized file exists, converting it to F16 first lets llama.cpp's
quantizer run (it refuses to requantize), and the result is bounded by the source's quality.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.compress.qtypes import FLOAT_TYPES, UNQUANTIZED
from edgellm.errors import ValidationError
from edgellm.modelfile import inspect_gguf

Progress = Callable[[int, int], None]  # (tensors done, tensors in all)
_FLOAT_TYPES = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
}


def is_quantized(path: Path) -> bool:
    """True when any 2-D weight of the GGUF is stored in a quantized type."""
    reader = gguf.GGUFReader(path, "r")
    return any(t.tensor_type not in UNQUANTIZED for t in reader.tensors)


def copy_metadata(reader: Any, writer: Any, replace: dict[str, Any] | None = None) -> None:
    """Every key/value field of `reader` into `writer`, except the header's own; `replace`
    gives new values for some keys (same value type)."""
    replace = replace or {}
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = replace[field.name] if field.name in replace else field.contents()
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)


def convert(source: Path, dest: Path, to: str, progress: Progress | None = None) -> None:
    """Write `source` to `dest` with every matrix in `to` (f16, bf16, f32); 1-D tensors (norms,
    biases) stay F32 as llama.cpp's converter keeps them. `dest` is written in place: callers
    write to a temporary name and rename."""
    if to not in FLOAT_TYPES:
        raise ValidationError(f"cannot convert to {to!r}; choose f16, bf16 or f32", param="to")
    info = inspect_gguf(source)
    ftype, target = FLOAT_TYPES[to]
    reader = gguf.GGUFReader(source, "r")
    writer = gguf.GGUFWriter(dest, info.architecture)
    has_file_type = gguf.Keys.General.FILE_TYPE in reader.fields
    copy_metadata(reader, writer, {gguf.Keys.General.FILE_TYPE: ftype})
    if not has_file_type:
        writer.add_file_type(ftype)
    plans = [(tensor, _target_type(tensor, target)) for tensor in reader.tensors]
    for tensor, kind in plans:
        shape = [int(n) for n in reversed(tensor.shape)]  # numpy order: outermost first
        n_bytes = int(tensor.n_elements) * (2 if kind != gguf.GGMLQuantizationType.F32 else 4)
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), n_bytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (tensor, kind) in enumerate(plans, 1):
        writer.write_tensor_data(_as_type(tensor, kind))
        if progress is not None:
            progress(done, len(plans))
    writer.close()


def _target_type(tensor: Any, target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(tensor.shape) < 2 or int(tensor.shape[1]) == 1:
        return gguf.GGMLQuantizationType.F32
    return target


def _as_type(tensor: Any, kind: gguf.GGMLQuantizationType) -> Any:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    values = values.reshape([int(n) for n in reversed(tensor.shape)])
    if kind == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(values, kind)  # bf16 as bytes
    return values.astype(_FLOAT_TYPES[kind])
