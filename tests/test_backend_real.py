"""The llama.cpp backend on the default model, driven directly (no scheduler): how a step's
chunks become one llama.cpp batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgellm.backends.llama_cpp.runner import LlamaCppBackend
from edgellm.engine.request import SamplingParams
from edgellm.engine.runner import KvOp, ScheduledChunk, SchedulerOutput
from edgellm.settings import EngineSettings

PROMPTS = [
    "The kettle boiled while the radio talked about rain.",
    "List three uses for a paper clip.",
    "Why do cats sleep so much?",
    "Write one line about a lighthouse.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
STEPS = 6


@pytest.fixture(scope="module")
def backend(model_path: Path) -> Iterator[LlamaCppBackend]:
    # batches under 64 rows and short sequences: llama.cpp's CPU kernels give equal numbers
    # however the rows are grouped (docs/engine.md, Determinism)
    settings = EngineSettings(ctx=1024, parallel=4, batch=63, threads=2)
    b = LlamaCppBackend(model_path, settings)
    yield b
    b.close()


def _chunk(seq: int, tokens: list[int], start: int) -> ScheduledChunk:
    return ScheduledChunk(f"r{seq}", seq, tokens, start, sample=True, sampling=GREEDY)


def _decode(backend: LlamaCppBackend, order: list[list[int]]) -> dict[int, list[int]]:
    """Prefill every prompt, then decode STEPS tokens; each inner list of `order` is one
    llama.cpp batch of those sequences, in that row order. Returns the tokens per sequence."""
    prompts = {
        seq: backend.tokenize(p, add_special=True, parse_special=False)
        for seq, p in enumerate(PROMPTS)
    }
    empty = [KvOp(seq, keep=0) for seq in prompts]
    finished = [f"r{seq}" for seq in prompts]
    backend.execute(SchedulerOutput([], empty, finished))  # fresh sequences and samplers
    out: dict[int, list[int]] = {seq: [] for seq in prompts}
    for group in order:
        for seq, sampled in backend.execute(
            SchedulerOutput([_chunk(seq, prompts[seq], 0) for seq in group], [], [])
        ).sampled.items():
            out[int(seq[1:])].append(sampled)
    for _ in range(STEPS - 1):
        for group in order:
            chunks = [_chunk(s, [out[s][-1]], len(prompts[s]) + len(out[s]) - 1) for s in group]
            for seq, sampled in backend.execute(SchedulerOutput(chunks, [], [])).sampled.items():
                out[int(seq[1:])].append(sampled)
    return out


def test_rows_are_grouped_by_sequence_and_tokens_reach_their_request(
    backend: LlamaCppBackend,
) -> None:
    """Chunks arrive in the scheduler's order (oldest request first), which need not follow the
    sequence ids; the backend lays rows out by sequence (llama.cpp splits a split-stream batch
    at every break in consecutive ids) and must still hand each sampled token to its request."""
    alone = _decode(backend, [[0], [1], [2], [3]])
    scrambled = _decode(backend, [[2, 0, 3, 1]])
    rows = [backend._batch.seq_id[i][0] for i in range(backend._batch.n_tokens)]
    assert rows == [0, 1, 2, 3]
    assert scrambled == alone
    assert len({tuple(tokens) for tokens in alone.values()}) == len(PROMPTS)  # a swap would show
