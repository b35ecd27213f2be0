"""The backend seam: what the engine asks of a backend (`Runner`, `Tokenizer`) and the typed
hand-offs to and from it; what serving asks for embeddings (`Embedder`) and evaluate, compress
and plan for scoring (`Scorer`). The one place for the backend Protocols; `edgellm.backends`
builds objects that satisfy them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from edgellm.engine.request import SamplingParams


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens of one request to decode this step."""

    request_id: str
    seq_id: int  # KV sequence the tokens go into
    tokens: list[int]  # [T] ids to feed, T >= 1
    start_pos: int  # position of tokens[0] in the sequence
    sample: bool  # True when the last token's logits must produce the next token
    sampling: SamplingParams  # used to build the request's sampler chain on first sight
    history: list[int] = field(default_factory=list)  # tokens already generated, for penalties


@dataclass(slots=True, frozen=True)
class KvOp:
    """A change to one sequence's KV cells, applied (in list order) before the step's batch."""

    seq_id: int
    keep: int  # cells at positions >= keep are dropped; 0 empties the sequence
    copy_from: int | None = None  # first make `seq_id` a copy of this sequence's cells


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work: apply these KV ops, then decode these chunks as one batch."""

    chunks: list[ScheduledChunk]
    kv_ops: list[KvOp]  # cache changes decided since the previous step, in order
    finished_requests: list[str]  # requests whose sampler state can be freed

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass(slots=True)
class RunnerOutput:
    # request_id -> token id. A chunk with sample=True gets its token here in the same step,
    # or (a sampler that runs out of process, e.g. a grammar's) in a later step's output.
    sampled: dict[str, int]
    # request_id -> why its next token cannot be chosen (its output format allows none, its
    # grammar sandbox timed out or died): the request ends with an error.
    failed: dict[str, str] = field(default_factory=dict)


class Runner(Protocol):
    """Executes batches on a model. Holds no policy: the scheduler decides what runs."""

    n_ctx: int  # total KV cells in the shared cache

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        """Apply `work.kv_ops`, free what `work.finished_requests` held, decode all chunks in
        one batch, sample where asked. Never returns tokens for finished requests."""
        ...

    def close(self) -> None: ...


class Tokenizer(Protocol):
    """Text <-> tokens for one model; safe to call from any thread."""

    n_vocab: int

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_to_piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def control_texts(self) -> list[str]:
        """How each control token is spelled (`<|im_end|>`, ...): text that special-token
        parsing would turn into that token."""
        ...

    def grammar_error(self, grammar: str) -> str | None:
        """None when the backend can enforce this GBNF grammar, else why not."""
        ...


class Embedder(Protocol):
    """Pooled embeddings on a loaded model's weights. Not thread-safe: the caller serialises
    calls. Freed with the backend that made it."""

    n_ctx: int  # most tokens per input

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled, unnormalised embedding of one input of 1..n_ctx tokens."""
        ...


class Scorer(Protocol):
    """One model with a single-sequence context, for evaluation and measurement."""

    n_ctx: int  # most tokens per window
    n_vocab: int
    add_bos: bool  # whether the model wants a BOS first
    bos: int  # the BOS token id

    def tokenize(self, text: str) -> list[int]:
        """The whole text, special tokens added (BOS when the model wants one), special-token
        text not parsed: as llama.cpp's perplexity tool reads it."""
        ...

    def window_logits(self, tokens: list[int], first: int) -> Any:
        """Logits of positions first..len(tokens)-1 of one window decoded from an empty
        cache: float32 [len(tokens) - first, n_vocab]."""
        ...

    def decode_speed(self, prompt: list[int], n_tokens: int) -> float:
        """Tokens per second of a greedy decode of `n_tokens`, one at a time, after `prompt`."""
        ...

    def close(self) -> None: ...
