"""A scripted Runner and Tokenizer for unit tests of the engine seam (never shipped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgellm.engine import RunnerOutput, SchedulerOutput

EOS = 0


@dataclass
class ScriptedRunner:
    """A KV cache of token lists with a toy model. Records every batch; refuses a chunk whose
    position does not follow the sequence's resident tokens, and over-committed cells.

    Rule "next": a request generates the token after its last one, t -> t + 1 (EOS after
    `eos_at`). Rule "context": the next token is a hash of every token resident in the
    sequence, by position, so a wrong reused prefix changes the output.
    """

    n_ctx: int = 256
    eos_at: int | None = None  # a token value that is followed by EOS
    rule: Literal["next", "context"] = "next"
    seq_cells: int | None = None  # split streams: cells per sequence; None: one pool of n_ctx
    n_vocab: int = 1000
    batches: list[SchedulerOutput] = field(default_factory=list)
    kv: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> tokens by position

    @property
    def cells(self) -> dict[int, int]:
        """seq_id -> cells held, for sequences holding any."""
        return {seq: len(tokens) for seq, tokens in self.kv.items() if tokens}

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        for op in work.kv_ops:
            if op.copy_from is not None:
                self.kv[op.seq_id] = list(self.kv.get(op.copy_from, []))
            del self.kv.setdefault(op.seq_id, [])[op.keep :]
        self.batches.append(work)
        if self.seq_cells is None and sum(self.cells.values()) + work.num_tokens > self.n_ctx:
            raise RuntimeError("KV cache overflow: the scheduler over-committed cells")
        sampled = {}
        for chunk in work.chunks:
            held = self.kv.setdefault(chunk.seq_id, [])
            if chunk.start_pos != len(held):
                raise RuntimeError(f"seq {chunk.seq_id}: position {chunk.start_pos} != {len(held)}")
            held += chunk.tokens
            if self.seq_cells is not None and len(held) > self.seq_cells:
                raise RuntimeError(f"seq {chunk.seq_id} overflowed its stream")
            if chunk.sample:
                sampled[chunk.request_id] = self._next(held)
        return RunnerOutput(sampled=sampled)

    def _next(self, held: list[int]) -> int:
        last = held[-1]
        if last == self.eos_at:
            return EOS
        if self.rule == "next":
            return last + 1
        return 1 + sum((i + 1) * t for i, t in enumerate(held)) % 25

    def close(self) -> None:
        pass

    # Tokenizer: token t is the character chr(ord("a") + t % 26); EOS renders as nothing.
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def token_to_piece(self, token: int) -> bytes:
        return b"" if token == EOS else chr(ord("a") + token % 26).encode()

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def grammar_error(self, grammar: str) -> str | None:
        return "the scripted runner has no grammars"

    def control_texts(self) -> list[str]:
        return []
