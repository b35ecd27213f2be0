"""What every llama.cpp object in this package is made from: the library (initialised once, its
log sent to Python logging), a checked model file, a context, and the one batch writer."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as ll

from edgellm.errors import EngineError, ModelFileError
from edgellm.modelfile import inspect_gguf

log = logging.getLogger("edgellm.llama_cpp")

_GGML_LOG_LEVEL_ERROR = 4


@ll.llama_log_callback  # type: ignore[untyped-decorator]
def _log_to_python(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load; keep errors, send the rest to debug logging.
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == _GGML_LOG_LEVEL_ERROR else logging.DEBUG, message)


@functools.cache
def init_llama() -> None:
    ll.llama_log_set(_log_to_python, ctypes.c_void_p(0))
    ll.llama_backend_init()


def load_model(path: Path) -> Any:
    """llama.cpp's model of a GGUF that `inspect_gguf` accepted; free it with llama_model_free."""
    inspect_gguf(path)  # never hand llama.cpp a file we have not checked
    init_llama()
    model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
    if not model:
        raise ModelFileError(f"llama.cpp could not load {path}")
    return model


def context_params(*, n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, threads: int) -> Any:
    """llama.cpp's context parameters with the fields every context here sets; callers add
    their own (KV layout, embeddings, an eval callback) before `new_context`."""
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = n_ctx  # KV cells in all
    cparams.n_batch = n_batch  # most tokens one llama_decode takes
    cparams.n_ubatch = n_ubatch  # most tokens one graph pass takes
    cparams.n_seq_max = n_seq_max
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.no_perf = True
    return cparams


def new_context(model: Any, cparams: Any, failure: str) -> Any:
    """A context on `model`; EngineError(failure) when llama.cpp cannot make one (the model
    stays the caller's to free)."""
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise EngineError(failure)
    return ctx


def put_tokens(
    batch: Any, row: int, seq_id: int, tokens: Sequence[int], start_pos: int, logits_from: int
) -> int:
    """Write `tokens` of sequence `seq_id`, at positions start_pos.., into rows row.. of a
    `llama_batch`; the rows of tokens[logits_from:] ask for logits. The batch then holds rows
    0..end; returns end (the next free row). The caller keeps within the batch's capacity."""
    token, pos, n_seq_id, seq, logits = (
        batch.token,
        batch.pos,
        batch.n_seq_id,
        batch.seq_id,
        batch.logits,
    )
    for offset, tok in enumerate(tokens):
        token[row] = tok
        pos[row] = start_pos + offset
        n_seq_id[row] = 1
        seq[row][0] = seq_id
        logits[row] = 1 if offset >= logits_from else 0
        row += 1
    batch.n_tokens = row
    return row


def decode(ctx: Any, batch: Any) -> None:
    rc = ll.llama_decode(ctx, batch)
    if rc != 0:
        raise EngineError(f"llama_decode failed with code {rc}")


def tokenize(vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (ll.llama_token * capacity)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    if n < 0:  # buffer too small: -n is the size needed
        capacity = -n
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    return list(buf[:n])
