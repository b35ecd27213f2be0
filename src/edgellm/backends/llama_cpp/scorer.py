"""The scorer: one model with a single-sequence context, for evaluation and measurement."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from edgellm.backends import ActivationSums
from edgellm.backends.llama_cpp.core import (
    context_params,
    decode,
    load_model,
    new_context,
    put_tokens,
    tokenize,
)
from edgellm.backends.llama_cpp.imatrix import ImatrixCollector
from edgellm.errors import EngineError


class LlamaCppScorer:
    """One model with a single-sequence context, for evaluation: the logits of every position
    of a token window, and a short greedy decode to time. With `imatrix`, the input activations
    of every weight matrix are summed into it as windows are decoded."""

    def __init__(self, path: Path, n_ctx: int, threads: int, imatrix: ActivationSums | None = None):
        model = load_model(path)
        cparams = context_params(
            n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_seq_max=1, threads=threads
        )
        self._collector: ImatrixCollector | None = None  # its callback must outlive the context
        if imatrix is not None:
            self._collector = ImatrixCollector(imatrix)
            cparams.cb_eval = self._collector.callback
        try:
            ctx = new_context(
                model, cparams, f"llama.cpp could not create a context of {n_ctx} cells"
            )
        except EngineError:
            ll.llama_model_free(model)
            raise
        self._model = model
        self._ctx = ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(ll.llama_vocab_bos(self._vocab))
        self.n_ctx = n_ctx
        self._batch = ll.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """The whole text as llama.cpp's perplexity tool reads it: special tokens added (BOS if
        the model wants one), special-token text not parsed."""
        return tokenize(self._vocab, text, True, False)

    def window_logits(self, tokens: list[int], first: int) -> Any:
        """Logits for positions first..len(tokens)-1 of one window decoded from position 0:
        float32 [len(tokens) - first, n_vocab]."""
        put_tokens(self._batch, 0, 0, tokens, 0, logits_from=first)
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        decode(self._ctx, self._batch)
        out = ll.llama_get_logits(self._ctx)
        n_out = len(tokens) - first
        return np.ctypeslib.as_array(out, shape=(n_out, self.n_vocab)).copy()

    def decode_speed(self, prompt: list[int], n_tokens: int) -> float:
        """Greedy decode of `n_tokens` one at a time after `prompt`: tokens per second."""
        self.window_logits(prompt, len(prompt) - 1)
        position = len(prompt)
        started = time.perf_counter()
        logits = ll.llama_get_logits(self._ctx)
        for step in range(n_tokens):
            row = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
            put_tokens(self._batch, 0, 0, [int(row.argmax())], position + step, logits_from=0)
            decode(self._ctx, self._batch)
            logits = ll.llama_get_logits(self._ctx)
        return n_tokens / (time.perf_counter() - started)

    def close(self) -> None:
        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None
