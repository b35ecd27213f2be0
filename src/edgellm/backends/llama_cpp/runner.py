"""The runner: the engine's `Runner` and `Tokenizer` over one llama.cpp model and context.

It uses the low-level API: one context whose KV cache is a stream per sequence (split) or one
pool shared by all (`kv_unified`), one `llama_batch` holding every sequence's tokens for a
step, one llama.cpp sampler chain per request, and `llama_memory_seq_rm` / `_seq_cp` to drop
and copy a sequence's cells.
Every method except the tokenizer ones must run on the thread that created the backend.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp as ll

from edgellm.backends.llama_cpp.core import (
    context_params,
    decode,
    load_model,
    new_context,
    put_tokens,
    tokenize,
)
from edgellm.backends.llama_cpp.embedder import LlamaCppEmbedder
from edgellm.backends.llama_cpp.grammar import GrammarSamplers, SandboxPool, SandboxSpec
from edgellm.backends.llama_cpp.samplers import build_chain
from edgellm.engine.runner import KvOp, RunnerOutput, ScheduledChunk, SchedulerOutput
from edgellm.errors import EngineError
from edgellm.settings import EngineSettings

_GRAMMAR_BYTES = 1 << 20  # largest grammar a sandbox takes (schema grammars: 256 KiB at most)


class LlamaCppBackend:
    """Runner + Tokenizer over one llama.cpp model and context."""

    def __init__(self, path: Path, settings: EngineSettings):
        model = load_model(path)
        try:
            ctx = new_context(
                model,
                _context_params(settings),
                f"llama.cpp could not create a context of {settings.ctx} cells",
            )
        except EngineError:
            ll.llama_model_free(model)
            raise
        self._model = model
        self._ctx = ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self._memory = ll.llama_get_memory(ctx)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = min(settings.ctx, int(ll.llama_n_ctx(ctx)))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self._control_texts = _control_texts(self._vocab, self.n_vocab)
        # Pieces by token id, filled on first use. Per instance (not an lru_cache on the
        # method, whose cache would hold every backend for the life of the process).
        self._pieces: dict[int, bytes] = {}
        self._batch_capacity = settings.batch
        self._batch = ll.llama_batch_init(settings.batch, 0, 1)
        self._samplers: dict[str, Any] = {}  # request_id -> llama_sampler chain
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
            decode(self._ctx, self._batch)
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
        row = 0
        to_sample = []
        # With split streams llama.cpp cuts a batch into micro-batches (one graph pass each) of
        # sequences with consecutive ids in batch order: decodes of sequences 3, 1, 2 take two
        # passes, 1, 2, 3 one. The order of rows is otherwise free, so sort by sequence.
        for chunk in sorted(chunks, key=lambda c: c.seq_id):
            n = len(chunk.tokens)
            if row + n > self._batch_capacity:
                raise EngineError("scheduled more tokens than the batch holds")
            logits_from = n - 1 if chunk.sample else n
            row = put_tokens(
                self._batch, row, chunk.seq_id, chunk.tokens, chunk.start_pos, logits_from
            )
            if chunk.sample:
                to_sample.append((chunk, row - 1))
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
        self._embedders.clear()
        self._pieces.clear()
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None
            self._model = None

    # -- Tokenizer ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return tokenize(self._vocab, text, add_special, parse_special)

    def token_to_piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = _piece(self._vocab, token)
        return piece

    def grammar_error(self, grammar: str) -> str | None:
        """None when llama.cpp compiles `grammar` in a sandbox in time; else why not. Never
        compiled in this process: a grammar nested deeply enough crashes llama.cpp's parser."""
        return self.sandboxes.check(grammar, self.grammar_timeout)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def control_texts(self) -> list[str]:
        return list(self._control_texts)


def _context_params(settings: EngineSettings) -> Any:
    cparams = context_params(
        n_ctx=settings.ctx,
        n_batch=settings.batch,
        n_ubatch=settings.batch,
        n_seq_max=settings.parallel,
        threads=settings.threads,
    )
    # split: a stream of n_ctx / n_seq cells per sequence, whose attention never reads other
    # sequences' cells (faster, batch-invariant); shared: one pool (docs/engine.md).
    cparams.kv_unified = settings.kv_layout == "shared"
    cparams.flash_attn_type = (
        ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if settings.flash_attn
        else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    return cparams


def _control_texts(vocab: Any, n_vocab: int) -> list[str]:
    return [
        ll.llama_vocab_get_text(vocab, t).decode("utf-8", errors="replace")
        for t in range(n_vocab)
        if ll.llama_vocab_get_attr(vocab, t) & ll.LLAMA_TOKEN_ATTR_CONTROL
    ]


def _piece(vocab: Any, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]
