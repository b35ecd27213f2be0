"""The llama.cpp backend: the only module that imports `llama_cpp`.

It uses the low-level API: one context whose KV cache is a stream per sequence (split) or one
pool shared by all (`kv_unified`), one `llama_batch` holding every sequence's tokens for a
step, one llama.cpp sampler chain per request, and `llama_memory_seq_rm` / `_seq_cp` to drop
and copy a sequence's cells.
Every method except the tokenizer ones must run on the thread that created the backend.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from pathlib import Path
from typing import Any

import llama_cpp as ll
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edgellm.backends.grammar import GrammarSamplers, SandboxPool, SandboxSpec
from edgellm.backends.samplers import build_chain
from edgellm.engine.runner import KvOp, RunnerOutput, ScheduledChunk, SchedulerOutput
from edgellm.errors import EngineError, ModelFileError
from edgellm.modelfile import inspect_gguf
from edgellm.settings import EngineSettings

log = logging.getLogger("edgellm.llama_cpp")

_GGML_LOG_LEVEL_ERROR = 4
_GRAMMAR_BYTES = 1 << 20  # largest grammar a sandbox takes (schema grammars: 256 KiB at most)


@ll.llama_log_callback  # type: ignore[untyped-decorator]
def _log_to_python(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load; keep errors, send the rest to debug logging.
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == _GGML_LOG_LEVEL_ERROR else logging.DEBUG, message)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema, by llama-cpp-python's port of llama.cpp's converter. Raises
    AssertionError, KeyError, ... on schemas it cannot translate (edgellm.structured wraps it)."""
    return str(json_schema_to_gbnf(json.dumps(schema)))


@functools.cache
def _init_llama() -> None:
    ll.llama_log_set(_log_to_python, ctypes.c_void_p(0))
    ll.llama_backend_init()


class LlamaCppBackend:
    """Runner + Tokenizer over one llama.cpp model and context."""

    def __init__(self, path: Path, settings: EngineSettings):
        inspect_gguf(path)  # never hand llama.cpp a file we have not checked
        _init_llama()
        mparams = ll.llama_model_default_params()
        model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelFileError(f"llama.cpp could not load {path}")
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = settings.ctx
        cparams.n_batch = settings.batch
        cparams.n_ubatch = settings.batch
        cparams.n_seq_max = settings.parallel
        cparams.n_threads = settings.threads
        cparams.n_threads_batch = settings.threads
        # split: a stream of n_ctx / n_seq cells per sequence, whose attention never reads other
        # sequences' cells (faster, batch-invariant); shared: one pool (docs/engine.md).
        cparams.kv_unified = settings.kv_layout == "shared"
        cparams.no_perf = True
        cparams.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if settings.flash_attn
            else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            ll.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context of {settings.ctx} cells")
        self._ctx = ctx
        self._memory = ll.llama_get_memory(ctx)
        self.n_ctx = min(settings.ctx, int(ll.llama_n_ctx(ctx)))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self._control_texts = [
            ll.llama_vocab_get_text(self._vocab, t).decode("utf-8", errors="replace")
            for t in range(self.n_vocab)
            if ll.llama_vocab_get_attr(self._vocab, t) & ll.LLAMA_TOKEN_ATTR_CONTROL
        ]
        self._batch_capacity = settings.batch
        self._batch = ll.llama_batch_init(settings.batch, 0, 1)
        self._samplers: dict[str, Any] = {}  # request_id -> llama_sampler chain
        self._piece_buf = ctypes.create_string_buffer(256)
        self._embedders: list[LlamaCppEmbedder] = []  # closed before the model is freed
        spec = SandboxSpec(path, self.n_vocab, _GRAMMAR_BYTES, settings.grammar_memory << 20)
        self.sandboxes = SandboxPool(spec, spare=1, keep=settings.parallel + 1)
        self.grammar_timeout = settings.grammar_timeout
        self._grammar = GrammarSamplers(self.sandboxes, settings.grammar_wait, self.grammar_timeout)

    # -- Runner ------------------------------------------------------------------------------

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        for op in work.kv_ops:
            self._apply(op)
        for request_id in work.finished_requests:
            sampler = self._samplers.pop(request_id, None)
            if sampler is not None:
                ll.llama_sampler_free(sampler)
            self._grammar.release(request_id)
        out = RunnerOutput(sampled={})
        submitted: set[str] = set()
        if work.chunks:
            to_sample = self._fill_batch(work.chunks)
            rc = ll.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc}")
            for chunk, index in to_sample:
                if chunk.sampling.grammar is None:
                    token = ll.llama_sampler_sample(self._sampler_for(chunk), self._ctx, index)
                    out.sampled[chunk.request_id] = int(token)
                    continue
                # a grammar runs in its sandbox; its token may come back in a later step
                row = ctypes.addressof(ll.llama_get_logits_ith(self._ctx, index).contents)
                error = self._grammar.submit(chunk.request_id, chunk.sampling, row)
                if error is not None:
                    out.failed[chunk.request_id] = error
                else:
                    submitted.add(chunk.request_id)
        if self._grammar.pending:
            # wait (briefly) only for this step's answers; with nothing decoded, for any
            late, failed = self._grammar.collect(submitted if work.chunks else None)
            out.sampled |= late
            out.failed |= failed
        return out

    def _apply(self, op: KvOp) -> None:
        if op.copy_from is not None:
            # Across split streams this queues a copy of the whole stream, done by the next
            # llama_decode before it writes the batch; in one pool the cells become shared.
            ll.llama_memory_seq_rm(self._memory, op.seq_id, -1, -1)
            ll.llama_memory_seq_cp(self._memory, op.copy_from, op.seq_id, -1, -1)
        ll.llama_memory_seq_rm(self._memory, op.seq_id, op.keep if op.keep else -1, -1)

    def _fill_batch(self, chunks: list[ScheduledChunk]) -> list[tuple[ScheduledChunk, int]]:
        """Write all chunks into the one reusable batch; return (chunk, row) pairs to sample."""
        batch = self._batch
        token, pos, n_seq_id, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        i = 0
        to_sample = []
        # With split streams llama.cpp cuts a batch into micro-batches (one graph pass each) of
        # sequences with consecutive ids in batch order: decodes of sequences 3, 1, 2 take two
        # passes, 1, 2, 3 one. The order of rows is otherwise free, so sort by sequence.
        for chunk in sorted(chunks, key=lambda c: c.seq_id):
            if i + len(chunk.tokens) > self._batch_capacity:
                raise EngineError("scheduled more tokens than the batch holds")
            for offset, tok in enumerate(chunk.tokens):
                token[i] = tok
                pos[i] = chunk.start_pos + offset
                n_seq_id[i] = 1
                seq_id[i][0] = chunk.seq_id
                logits[i] = 0
                i += 1
            if chunk.sample:
                logits[i - 1] = 1
                to_sample.append((chunk, i - 1))
        batch.n_tokens = i
        return to_sample

    def _sampler_for(self, chunk: ScheduledChunk) -> Any:
        sampler = self._samplers.get(chunk.request_id)
        if sampler is None:
            sampler = self._samplers[chunk.request_id] = build_chain(self.n_vocab, chunk.sampling)
        return sampler

    def embedder(self, pooling: str, threads: int) -> LlamaCppEmbedder:
        """A second context on the same weights, computing pooled embeddings."""
        embedder = LlamaCppEmbedder(self._model, pooling, threads, self.n_ctx_train)
        self._embedders.append(embedder)
        return embedder

    def close(self) -> None:
        for sampler in self._samplers.values():
            ll.llama_sampler_free(sampler)
        self._samplers.clear()
        self._grammar.close()
        self.sandboxes.close()
        for embedder in self._embedders:
            embedder.close()
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None
            self._model = None

    # -- Tokenizer ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return _tokenize(self._vocab, text, add_special, parse_special)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one backend per process lifetime
    def token_to_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def grammar_error(self, grammar: str) -> str | None:
        """None when llama.cpp compiles `grammar` in a sandbox in time; else why not. Never
        compiled in this process: a grammar nested deeply enough crashes llama.cpp's parser."""
        return self.sandboxes.check(grammar, self.grammar_timeout)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def control_texts(self) -> list[str]:
        return list(self._control_texts)


_POOLING = {
    "mean": ll.LLAMA_POOLING_TYPE_MEAN,
    "cls": ll.LLAMA_POOLING_TYPE_CLS,
    "last": ll.LLAMA_POOLING_TYPE_LAST,
}
EMBED_CTX = 2048


class LlamaCppEmbedder:
    """Pooled sentence embeddings from a model: one input per `llama_decode`, its whole text
    in one batch (pooling needs every token of a sequence together). Not thread-safe: the
    caller serialises calls. The model is shared with the generating context."""

    def __init__(self, model: Any, pooling: str, threads: int, n_ctx_train: int):
        cparams = ll.llama_context_default_params()
        n_ctx = min(EMBED_CTX, n_ctx_train) if n_ctx_train > 0 else EMBED_CTX
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = True
        cparams.no_perf = True
        if pooling != "auto":
            cparams.pooling_type = _POOLING[pooling]
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError("llama.cpp could not create an embedding context")
        if ll.llama_pooling_type(ctx) not in _POOLING.values():
            # the GGUF names no usable pooling (a generative model): mean is the usual choice
            ll.llama_free(ctx)
            cparams.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
            ctx = ll.llama_init_from_model(model, cparams)
            if not ctx:
                raise EngineError("llama.cpp could not create an embedding context")
        self._ctx = ctx
        self.n_ctx = int(ll.llama_n_ctx(ctx))
        self.n_embd = int(ll.llama_model_n_embd(model))
        self.pooling = next(k for k, v in _POOLING.items() if v == ll.llama_pooling_type(ctx))
        self._batch = ll.llama_batch_init(self.n_ctx, 0, 1)

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled, unnormalised embedding of one token sequence (1..n_ctx tokens)."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise EngineError(f"an embedding input must be 1..{self.n_ctx} tokens")
        batch = self._batch
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(tokens)
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")
        vector = ll.llama_get_embeddings_seq(self._ctx, 0)
        if not vector:
            raise EngineError("llama.cpp returned no embedding")
        return [float(vector[i]) for i in range(self.n_embd)]

    def close(self) -> None:
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            self._ctx = None


# -- Offline tools: scoring windows, importance matrices, quantization ---------------------------


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
    Installed as a context's eval callback; dense matrix products only (no MoE experts)."""

    def __init__(self) -> None:
        self.in_sum2: dict[str, Any] = {}  # weight name -> float64 [n_in]
        self.counts: dict[str, int] = {}  # weight name -> activation rows summed
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
        if name in self.in_sum2:
            self.in_sum2[name] += sums
        else:
            self.in_sum2[name] = sums
        self.counts[name] = self.counts.get(name, 0) + rows
        return True


class LlamaCppScorer:
    """One model with a single-sequence context, for evaluation: the logits of every position
    of a token window, and a short greedy decode to time."""

    def __init__(
        self, path: Path, n_ctx: int, threads: int, collector: ImatrixCollector | None = None
    ):
        inspect_gguf(path)
        _init_llama()
        model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
        if not model:
            raise ModelFileError(f"llama.cpp could not load {path}")
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(ll.llama_vocab_bos(self._vocab))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = n_ctx
        cparams.n_ubatch = min(n_ctx, 512)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if collector is not None:
            cparams.cb_eval = collector.callback
        self._collector = collector  # the callback must outlive the context
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            ll.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} cells")
        self._ctx = ctx
        self.n_ctx = n_ctx
        self._batch = ll.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """The whole text as llama.cpp's perplexity tool reads it: special tokens added (BOS if
        the model wants one), special-token text not parsed."""
        return _tokenize(self._vocab, text, True, False)

    def window_logits(self, tokens: list[int], first: int) -> Any:
        """Logits for positions first..len(tokens)-1 of one window decoded from position 0:
        float32 [len(tokens) - first, n_vocab]."""
        import numpy as np

        batch = self._batch
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i >= first else 0
        batch.n_tokens = len(tokens)
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")
        out = ll.llama_get_logits(self._ctx)
        n_out = len(tokens) - first
        return np.ctypeslib.as_array(out, shape=(n_out, self.n_vocab)).copy()

    def decode_speed(self, prompt: list[int], n_tokens: int) -> float:
        """Greedy decode of `n_tokens` one at a time after `prompt`: tokens per second."""
        import time

        import numpy as np

        self.window_logits(prompt, len(prompt) - 1)
        token = len(prompt)
        batch = self._batch
        started = time.perf_counter()
        logits = ll.llama_get_logits(self._ctx)
        for step in range(n_tokens):
            row = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
            batch.token[0] = int(row.argmax())
            batch.pos[0] = token + step
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = 1
            batch.n_tokens = 1
            if ll.llama_decode(self._ctx, batch) != 0:
                raise EngineError("llama_decode failed while timing decode")
            logits = ll.llama_get_logits(self._ctx)
        return n_tokens / (time.perf_counter() - started)

    def close(self) -> None:
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None


def _tokenize(vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (ll.llama_token * capacity)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    if n < 0:  # buffer too small: -n is the size needed
        capacity = -n
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    return list(buf[:n])


def quantize_file(
    source: Path,
    dest: Path,
    ftype: int,
    *,
    threads: int,
    imatrix: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> None:
    """llama.cpp's quantizer: `source` (F32/F16/BF16 GGUF) to `dest` at llama_ftype `ftype`,
    with an importance matrix (weight name -> float32 [n_in * n_mat]) when given. Progress
    appears in llama.cpp's log, one "[  i/  n]" line per tensor (logger edgellm.llama_cpp).
    A dry run writes nothing and only logs the sizes (any source type is accepted then)."""
    _init_llama()
    params = ll.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.dry_run = params.allow_requantize = dry_run
    keep: list[Any] = []  # the arrays the C struct points into
    if imatrix:
        entries = (ll.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            import numpy as np

            array = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(array)
            entries[i].name = name.encode()
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        params.imatrix = entries  # the last entry stays zeroed: name NULL ends the list
        keep.append(entries)
    rc = ll.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise EngineError(
            f"llama.cpp's quantizer failed (code {rc}); its log says why (run with -v)"
        )
