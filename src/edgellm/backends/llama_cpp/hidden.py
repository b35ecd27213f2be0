"""The hidden-state scorer: a scorer whose eval callback reads the residual stream between
blocks out of llama.cpp's graph (`embd`, the token embeddings entering block 0, which other
llama.cpp versions name `inp_embd`; `l_out-N`, block N's output) and adds up, per block and
token, the cosine of what entered the block and what left it: what block influence (ShortGPT)
is made of. Only the running sums are kept, never the hidden states of a whole text."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from edgellm.backends import BlockCosines
from edgellm.backends.llama_cpp.core import context_params, load_model, new_context
from edgellm.backends.llama_cpp.imatrix import _GGML_TYPE_F32, _ggml, _GgmlTensor
from edgellm.backends.llama_cpp.scorer import LlamaCppScorer
from edgellm.errors import EngineError

_EMBEDDINGS = (b"embd", b"inp_embd")  # GET_ROWS of token_embd.weight: [n_tokens, n_embd]
_BLOCK_OUT = b"l_out-"


def _block_of(name: bytes) -> int | None:
    """The block whose output a graph tensor is (-1: the embeddings), or None."""
    if name in _EMBEDDINGS:
        return -1
    if name.startswith(_BLOCK_OUT) and name[len(_BLOCK_OUT) :].isdigit():
        return int(name[len(_BLOCK_OUT) :])
    return None


class BlockCosineCollector:
    """An eval callback (`callback`, which must outlive the context) adding, for block i,
    sum over tokens of cos(h_in_i, h_out_i) into `cosines`. The graph runs once per ubatch,
    embeddings first and blocks in order, so the previous block's rows are the next one's
    input; a pair whose row counts differ (the last block keeps only the rows asked for
    logits) is left out."""

    def __init__(self, cosines: BlockCosines) -> None:
        self.cosines = cosines
        self.callback = ll.ggml_backend_sched_eval_callback(self._observe)
        self._lib = _ggml()
        self._previous: tuple[int, Any] | None = None  # (block, -1: embeddings; [rows, n_embd])

    def _observe(self, tensor: Any, ask: bool, _user_data: Any) -> bool:
        if self.cosines.error is not None:
            return False
        try:
            return self._add(tensor, ask)
        except BaseException as exc:  # kept for the caller: see BlockCosines.error
            self.cosines.error = exc
            return False

    def _add(self, tensor: Any, ask: bool) -> bool:
        t = ctypes.cast(tensor, ctypes.POINTER(_GgmlTensor)).contents
        block = _block_of(t.name)
        if ask or block is None:
            return block is not None
        rows = self._rows(t)
        previous = self._previous
        if previous is not None and previous[0] == block - 1 and previous[1].shape == rows.shape:
            cos = _row_cosines(previous[1], rows)
            self.cosines.sums[block] = self.cosines.sums.get(block, 0.0) + float(cos.sum())
            self.cosines.tokens[block] = self.cosines.tokens.get(block, 0) + cos.size
        self._previous = (block, rows)
        return True

    def _rows(self, t: _GgmlTensor) -> Any:
        n_embd, n_rows = int(t.ne[0]), int(t.ne[1] * t.ne[2] * t.ne[3])
        if t.type != _GGML_TYPE_F32 or t.nb[0] != 4 or t.nb[1] != 4 * n_embd:
            raise EngineError(f"{t.name.decode()} is not a contiguous float32 tensor")
        # [n_rows, n_embd] float32, copied out through ggml so GPU buffers work too
        values = np.empty((n_rows, n_embd), dtype=np.float32)
        self._lib.ggml_backend_tensor_get(ctypes.addressof(t), values.ctypes.data, 0, values.nbytes)
        return values


def _row_cosines(a: Any, b: Any) -> Any:
    """cos of each row pair of a, b [rows, n] float32, in float64: [rows]. Zero rows give 0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-30)


class HiddenStateScorer(LlamaCppScorer):
    """`LlamaCppScorer` with a `BlockCosineCollector` on its context: every window decoded
    adds to `cosines`. Decode windows with logits for every position (first=0)."""

    def __init__(self, path: Path, n_ctx: int, threads: int, cosines: BlockCosines) -> None:
        # LlamaCppScorer.__init__ installs only its imatrix collector; this one sets the same
        # fields with its own callback (which must outlive the context, so it is kept here).
        model = load_model(path)
        cparams = context_params(
            n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_seq_max=1, threads=threads
        )
        self._cosines = BlockCosineCollector(cosines)
        cparams.cb_eval = self._cosines.callback
        try:
            ctx = new_context(
                model, cparams, f"llama.cpp could not create a context of {n_ctx} cells"
            )
        except EngineError:
            ll.llama_model_free(model)
            raise
        self._collector = None
        self._model = model
        self._ctx = ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(ll.llama_vocab_bos(self._vocab))
        self.n_ctx = n_ctx
        self._batch = ll.llama_batch_init(n_ctx, 0, 1)
