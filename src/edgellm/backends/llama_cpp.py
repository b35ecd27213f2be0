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
import random
from pathlib import Path
from typing import Any

import llama_cpp as ll
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edgellm.engine.request import SamplingParams
from edgellm.engine.runner import KvOp, RunnerOutput, ScheduledChunk, SchedulerOutput
from edgellm.errors import EngineError, ModelFileError
from edgellm.modelfile import inspect_gguf
from edgellm.settings import EngineSettings

log = logging.getLogger("edgellm.llama_cpp")

_GGML_LOG_LEVEL_ERROR = 4


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
        self._batch_capacity = settings.batch
        self._batch = ll.llama_batch_init(settings.batch, 0, 1)
        self._samplers: dict[str, Any] = {}  # request_id -> llama_sampler chain
        self._piece_buf = ctypes.create_string_buffer(256)
        self._embedders: list[LlamaCppEmbedder] = []  # closed before the model is freed

    # -- Runner ------------------------------------------------------------------------------

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        for op in work.kv_ops:
            self._apply(op)
        for request_id in work.finished_requests:
            sampler = self._samplers.pop(request_id, None)
            if sampler is not None:
                ll.llama_sampler_free(sampler)
        if not work.chunks:
            return RunnerOutput(sampled={})
        to_sample = self._fill_batch(work.chunks)
        rc = ll.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")
        sampled: dict[str, int] = {}
        for chunk, index in to_sample:
            sampler = self._sampler_for(chunk)
            sampled[chunk.request_id] = int(ll.llama_sampler_sample(sampler, self._ctx, index))
        return RunnerOutput(sampled=sampled)

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
        for chunk in chunks:
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
            sampler = self._samplers[chunk.request_id] = self._build_chain(chunk.sampling)
        return sampler

    def _build_chain(self, s: SamplingParams) -> Any:
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = functools.partial(ll.llama_sampler_chain_add, chain)
        if s.grammar is not None:
            # first, so every later sampler only sees tokens the grammar allows
            grammar = ll.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
            if not grammar:
                ll.llama_sampler_free(chain)
                raise EngineError("llama.cpp refused a grammar that passed its check")
            add(grammar)
        if s.logit_bias:
            biases = (ll.llama_logit_bias * len(s.logit_bias))(
                *(ll.llama_logit_bias(token, bias) for token, bias in s.logit_bias)
            )
            add(ll.llama_sampler_init_logit_bias(self.n_vocab, len(s.logit_bias), biases))
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            add(
                ll.llama_sampler_init_penalties(
                    self.n_vocab,
                    s.penalty_last_n,
                    s.repeat_penalty,
                    s.frequency_penalty,
                    s.presence_penalty,
                )
            )
        if s.temperature <= 0.0:
            add(ll.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            add(ll.llama_sampler_init_min_p(s.min_p, 1))
        add(ll.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else random.getrandbits(32)
        add(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def embedder(self, pooling: str, threads: int) -> LlamaCppEmbedder:
        """A second context on the same weights, computing pooled embeddings."""
        embedder = LlamaCppEmbedder(self._model, pooling, threads, self.n_ctx_train)
        self._embedders.append(embedder)
        return embedder

    def close(self) -> None:
        for sampler in self._samplers.values():
            ll.llama_sampler_free(sampler)
        self._samplers.clear()
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
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(
            self._vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        return list(buf[:n])

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one backend per process lifetime
    def token_to_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def grammar_error(self, grammar: str) -> str | None:
        """None when llama.cpp compiles `grammar`; else why not (its log has the detail)."""
        sampler = ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return "llama.cpp could not compile the grammar built from it"
        ll.llama_sampler_free(sampler)
        return None

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, token))


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
