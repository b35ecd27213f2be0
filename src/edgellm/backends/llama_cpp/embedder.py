"""The embedder: pooled sentence embeddings from a second context on a loaded model's weights."""

from __future__ import annotations

from typing import Any

import llama_cpp as ll

from edgellm.backends.llama_cpp.core import context_params, decode, new_context, put_tokens
from edgellm.errors import EngineError

_POOLING = {
    "mean": ll.LLAMA_POOLING_TYPE_MEAN,
    "cls": ll.LLAMA_POOLING_TYPE_CLS,
    "last": ll.LLAMA_POOLING_TYPE_LAST,
}
EMBED_CTX = 2048
_NO_CONTEXT = "llama.cpp could not create an embedding context"


class LlamaCppEmbedder:
    """Pooled sentence embeddings from a model: one input per `llama_decode`, its whole text
    in one batch (pooling needs every token of a sequence together). Not thread-safe: the
    caller serialises calls. The model is shared with the generating context."""

    def __init__(self, model: Any, pooling: str, threads: int, n_ctx_train: int):
        n_ctx = min(EMBED_CTX, n_ctx_train) if n_ctx_train > 0 else EMBED_CTX
        cparams = context_params(
            n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_seq_max=1, threads=threads
        )
        cparams.embeddings = True
        if pooling != "auto":
            cparams.pooling_type = _POOLING[pooling]
        ctx = new_context(model, cparams, _NO_CONTEXT)
        if ll.llama_pooling_type(ctx) not in _POOLING.values():
            # the GGUF names no usable pooling (a generative model): mean is the usual choice
            ll.llama_free(ctx)
            cparams.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
            ctx = new_context(model, cparams, _NO_CONTEXT)
        self._ctx = ctx
        self.n_ctx = int(ll.llama_n_ctx(ctx))
        self.n_embd = int(ll.llama_model_n_embd(model))
        self.pooling = next(k for k, v in _POOLING.items() if v == ll.llama_pooling_type(ctx))
        self._batch = ll.llama_batch_init(self.n_ctx, 0, 1)

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled, unnormalised embedding of one token sequence (1..n_ctx tokens)."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise EngineError(f"an embedding input must be 1..{self.n_ctx} tokens")
        put_tokens(self._batch, 0, 0, tokens, 0, logits_from=0)
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        decode(self._ctx, self._batch)
        vector = ll.llama_get_embeddings_seq(self._ctx, 0)
        if not vector:
            raise EngineError("llama.cpp returned no embedding")
        return [float(vector[i]) for i in range(self.n_embd)]

    def close(self) -> None:
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            self._ctx = None
