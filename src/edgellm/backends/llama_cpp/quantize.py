"""The quantizer: llama.cpp's `llama_model_quantize`, with an importance matrix when given; it
also copies a file as it is (`only_copy`) and drops blocks (`prune_layers`)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from edgellm.backends.llama_cpp.core import init_llama
from edgellm.errors import EngineError


def quantize_file(
    source: Path,
    dest: Path,
    ftype: int,
    *,
    threads: int,
    imatrix: dict[str, Any] | None = None,
    dry_run: bool = False,
    only_copy: bool = False,
    prune_layers: Sequence[int] = (),
) -> None:
    """llama.cpp's quantizer: `source` (F32/F16/BF16 GGUF) to `dest` at llama_ftype `ftype`,
    with an importance matrix (weight name -> float32 [n_in * n_mat]) when given. Progress
    appears in llama.cpp's log, one "[  i/  n]" line per tensor (logger edgellm.llama_cpp).
    A dry run writes nothing and only logs the sizes (any source type is accepted then).
    `only_copy`: every tensor keeps its type and bytes (any source type; `ftype` is ignored).
    `prune_layers`: these blocks are left out and the rest renumbered from 0, block_count
    updated (per-layer metadata arrays are not: the caller refuses models that have them)."""
    init_llama()
    params = ll.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.dry_run = params.allow_requantize = dry_run
    params.only_copy = only_copy
    keep: list[Any] = []  # the arrays the C struct points into, alive until the call returns
    if imatrix:
        params.imatrix = _imatrix_entries(imatrix, keep)
    if prune_layers:
        # int32[], ascending (llama.cpp's renumbering assumes it), -1 ends the list
        layers = (ctypes.c_int32 * (len(prune_layers) + 1))(*sorted(prune_layers), -1)
        keep.append(layers)
        params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    rc = ll.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise EngineError(
            f"llama.cpp's quantizer failed (code {rc}); its log says why (run with -v)"
        )


def _imatrix_entries(imatrix: dict[str, Any], keep: list[Any]) -> Any:
    """llama.cpp's NULL-terminated array of (name, float data, size), pointing into arrays
    appended to `keep`."""
    entries = (ll.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        array = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(array)
        entries[i].name = name.encode()
        entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = array.size
    keep.append(entries)  # the last entry stays zeroed: name NULL ends the list
    return entries
