"""A scripted Runner and Tokenizer for unit tests of the engine seam (never shipped)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.engine import RunnerOutput, SchedulerOutput

EOS = 0


@dataclass
class ScriptedRunner:
    """Each request "generates" the token after its last one: t -> t + 1, reaching EOS via
    `eos_after`. Records every batch, and which sequences hold cells, like a KV cache would."""

    n_ctx: int = 256
    eos_at: int | None = None  # a token value that is followed by EOS
    n_vocab: int = 1000
    batches: list[SchedulerOutput] = field(default_factory=list)
    cells: dict[int, int] = field(default_factory=dict)  # seq_id -> cells held

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        for seq in work.cleared_seqs:
            self.cells.pop(seq, None)
        self.batches.append(work)
        if sum(self.cells.values()) + work.num_tokens > self.n_ctx:
            raise RuntimeError("KV cache overflow: the scheduler over-committed cells")
        sampled = {}
        for chunk in work.chunks:
            held = self.cells.get(chunk.seq_id, 0)
            if chunk.start_pos != held:
                raise RuntimeError(f"seq {chunk.seq_id}: position {chunk.start_pos} != {held}")
            self.cells[chunk.seq_id] = held + len(chunk.tokens)
            if chunk.sample:
                last = chunk.tokens[-1]
                sampled[chunk.request_id] = EOS if last == self.eos_at else last + 1
        return RunnerOutput(sampled=sampled)

    def close(self) -> None:
        pass

    # Tokenizer: token t is the character chr(ord("a") + t % 26); EOS renders as nothing.
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def token_to_piece(self, token: int) -> bytes:
        return b"" if token == EOS else chr(ord("a") + token % 26).encode()

    def is_eog(self, token: int) -> bool:
        return token == EOS
