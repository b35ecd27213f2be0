"""Model backends, built through the loaders here; the engine and tools see only Protocols.

`load_backend` gives what serving needs (the engine's `Runner` and `Tokenizer`, and embedders
on the same weights); `load_scorer` what evaluate, compress and plan need. The Protocols live in
`edgellm.engine.runner`. Importing this module imports no backend: each loader imports its
implementation (and with it `llama_cpp`) when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgellm.engine.runner import Embedder, Runner, Scorer, Tokenizer
    from edgellm.settings import EngineSettings

__all__ = [
    "ActivationSums",
    "Backend",
    "json_schema_grammar",
    "load_backend",
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


def quantize_file(
    source: Path,
    dest: Path,
    ftype: int,
    *,
    threads: int,
    imatrix: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> None:
    """llama.cpp's quantizer (`edgellm.backends.llama_cpp.quantize.quantize_file`)."""
    from edgellm.backends.llama_cpp import quantize

    quantize.quantize_file(source, dest, ftype, threads=threads, imatrix=imatrix, dry_run=dry_run)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema by llama.cpp's converter; raises AssertionError, KeyError, ... on
    schemas it cannot translate (`edgellm.backends.llama_cpp.json_schema`)."""
    from edgellm.backends.llama_cpp.json_schema import json_schema_grammar as convert

    return convert(schema)
