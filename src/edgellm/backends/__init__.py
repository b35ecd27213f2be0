"""Model backends, built through the loaders here; the engine and tools see only Protocols.

`load_backend` gives what serving needs (the engine's `Runner` and `Tokenizer`, and embedders
on the same weights); `load_scorer` what evaluate, compress and plan need. The Protocols live in
`edgellm.engine.runner`. Importing this module imports no backend: each loader imports its
implementation (and with it `llama_cpp`) when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgellm.engine.runner import Embedder, Runner, Scorer, Tokenizer
    from edgellm.settings import EngineSettings

__all__ = [
    "ActivationSums",
    "Backend",
    "BlockCosines",
    "json_schema_grammar",
    "load_backend",
    "load_hidden_scorer",
    "load_scorer",
    "quantize_file",
]


@dataclass(slots=True, frozen=True)
class Backend:
    """One loaded model. Its runner owns everything: `close()` frees the context, the model,
    the grammar sandboxes and every embedder made here; call it on the thread that loaded."""

    runner: Runner  # executes the engine's batches
    tokenizer: Tokenizer  # text <-> tokens of the same model (llama.cpp: the runner itself)
    embedder: Callable[[str, int], Embedder]  # (pooling, threads) -> a context for embeddings

    def close(self) -> None:
        self.runner.close()


@dataclass(slots=True)
class ActivationSums:
    """What a scorer adds up for an importance matrix as it decodes: for each weight W used as
    `W @ x`, the sum over tokens of x_j^2 per input column j, and how many tokens."""

    in_sum2: dict[str, Any] = field(default_factory=dict)  # weight name -> float64 [n_in]
    counts: dict[str, int] = field(default_factory=dict)  # weight name -> activation rows summed


@dataclass(slots=True)
class BlockCosines:
    """What a hidden-state scorer adds up as it decodes: for each block i, the cosine of the
    hidden state entering it (block 0: the token embeddings) and the one leaving it, summed over
    tokens. One minus their mean is the block's influence (ShortGPT)."""

    sums: dict[int, float] = field(default_factory=dict)  # block -> sum over tokens of the cosine
    tokens: dict[int, int] = field(default_factory=dict)  # block -> tokens summed
    # raised inside llama.cpp's callback (Ctrl-C lands there most of the time): ctypes would
    # print and drop it, so the collector keeps it here and stops the graph; the caller raises
    error: BaseException | None = None


def load_backend(path: Path, settings: EngineSettings) -> Backend:
    """The llama.cpp runner, tokenizer and embedder factory for the GGUF at `path`. Raises
    ModelFileError (a file llama.cpp refuses), EngineError (no context of that size)."""
    from edgellm.backends.llama_cpp.runner import LlamaCppBackend

    backend = LlamaCppBackend(path, settings)
    return Backend(runner=backend, tokenizer=backend, embedder=backend.embedder)


def load_scorer(
    path: Path, n_ctx: int, threads: int, *, imatrix: ActivationSums | None = None
) -> Scorer:
    """A single-sequence scorer of `n_ctx` cells on the GGUF at `path`; with `imatrix`, every
    decode adds its weight-matrix input activations to it. Close it when done."""
    from edgellm.backends.llama_cpp.scorer import LlamaCppScorer

    return LlamaCppScorer(path, n_ctx, threads, imatrix)


def load_hidden_scorer(path: Path, n_ctx: int, threads: int, cosines: BlockCosines) -> Scorer:
    """A scorer like `load_scorer`'s whose every decode adds each block's input/output cosine
    per token to `cosines`. Ask `window_logits` for every position (first=0): llama.cpp keeps
    only the output rows in the last block. Close it when done."""
    from edgellm.backends.llama_cpp.hidden import HiddenStateScorer

    return HiddenStateScorer(path, n_ctx, threads, cosines)


def quantize_file(
    source: Path,
    dest: Path,
    ftype: int,
    *,
    threads: int,
    imatrix: dict[str, Any] | None = None,
    dry_run: bool = False,
    only_copy: bool = False,
    prune_layers: Sequence[int] = (),
) -> None:
    """llama.cpp's quantizer (`edgellm.backends.llama_cpp.quantize.quantize_file`)."""
    from edgellm.backends.llama_cpp import quantize

    quantize.quantize_file(
        source,
        dest,
        ftype,
        threads=threads,
        imatrix=imatrix,
        dry_run=dry_run,
        only_copy=only_copy,
        prune_layers=prune_layers,
    )


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema by llama.cpp's converter; raises AssertionError, KeyError, ... on
    schemas it cannot translate (`edgellm.backends.llama_cpp.json_schema`)."""
    from edgellm.backends.llama_cpp.json_schema import json_schema_grammar as convert

    return convert(schema)
