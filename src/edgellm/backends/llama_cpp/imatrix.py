"""The importance-matrix collector: an eval callback that reads each matrix product's input
activations out of llama.cpp's graph, through a ctypes copy of `struct ggml_tensor`."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import llama_cpp as ll

from edgellm.backends import ActivationSums
from edgellm.errors import EngineError


class _GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of the vendored ggml (336 bytes; checked at first use)."""


_GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),  # elements per dimension, innermost first
    ("nb", ctypes.c_size_t * 4),  # stride in bytes per dimension
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * 10),
    ("view_src", ctypes.POINTER(_GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
_GGML_TYPE_F32 = 0
_GGML_OBJECT_SIZE = 32  # ggml_tensor_overhead() = sizeof(ggml_object) + sizeof(ggml_tensor)


@functools.cache
def _ggml() -> Any:
    from llama_cpp import _ggml as ggml_lib

    lib = ggml_lib.libggml
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    if lib.ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(_GgmlTensor):
        raise EngineError("this llama.cpp build's ggml_tensor layout is not the one edgellm reads")
    return lib


class ImatrixCollector:
    """Sums of squared activations entering each weight matrix (llama.cpp's importance
    matrix): for `blk.*` weights W used as `W @ x`, in_sum2[j] = sum over tokens of x_j^2.
    Installed as a context's eval callback (`callback`, which must outlive the context);
    dense matrix products only (no MoE experts). The sums go into `sums`."""

    def __init__(self, sums: ActivationSums) -> None:
        self.sums = sums
        self.callback = ll.ggml_backend_sched_eval_callback(self._observe)
        self._lib = _ggml()
        self._mul_mat: int | None = None

    def _wanted(self, t: _GgmlTensor) -> str | None:
        if self._mul_mat is None:
            if self._lib.ggml_op_name(t.op) != b"MUL_MAT":
                return None
            self._mul_mat = t.op
        elif t.op != self._mul_mat:
            return None
        weight, x = t.src[0], t.src[1]
        if not weight or not x or x.contents.type != _GGML_TYPE_F32:
            return None
        name = str(weight.contents.name.decode(errors="replace"))
        if not name.startswith("blk.") or ".weight" not in name:
            return None
        return name[: name.index(".weight") + len(".weight")]

    def _observe(self, tensor: Any, ask: bool, _user_data: Any) -> bool:
        t = ctypes.cast(tensor, ctypes.POINTER(_GgmlTensor)).contents
        name = self._wanted(t)
        if ask or name is None:
            return name is not None
        import numpy as np

        x = t.src[1].contents
        n_in = int(x.ne[0])
        rows = int(x.ne[1] * x.ne[2] * x.ne[3])
        if x.nb[0] != 4 or x.nb[1] != 4 * n_in or x.nb[2] != x.nb[1] * x.ne[1]:
            return True  # a strided view: llama models do not feed weights these
        # x: [rows, n_in] float32; copied out through ggml so GPU buffers work too
        values = np.empty((rows, n_in), dtype=np.float32)
        self._lib.ggml_backend_tensor_get(ctypes.addressof(x), values.ctypes.data, 0, values.nbytes)
        sums = np.einsum("ij,ij->j", values, values, dtype=np.float64)
        in_sum2, counts = self.sums.in_sum2, self.sums.counts
        if name in in_sum2:
            in_sum2[name] += sums
        else:
            in_sum2[name] = sums
        counts[name] = counts.get(name, 0) + rows
        return True
