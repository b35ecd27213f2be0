"""Distillation data, without torch: the teacher's own text, the training windows, the teacher's
top-k targets on them, and the check that evaluation text is held out.

The teacher writes text from a built-in prompt set through edgellm's engine (batched sampled
decoding on llama.cpp), so a box with no data set can still distil. Training text (files and
generated samples) is cut into windows of `seq` tokens the way evaluation cuts its windows
(first token BOS when the model uses one). The teacher decodes every window once through
llama.cpp; per position its top-k logits are kept, renormalised over those k (log-probabilities
in float16, ids in int32), and cached on disk so a resumed run does not decode again.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.engine.runner import Scorer
from edgellm.errors import ValidationError

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)
SHINGLE = 64  # tokens: a passage this long found in both texts means they overlap

# Openings for the teacher to continue: varied registers and subjects, plain text (no chat
# template), so the samples look like the running text an evaluation scores.
PROMPTS: tuple[str, ...] = (
    " = Battle of the Somme = \n\n The Battle of the Somme was",
    " = River Thames = \n\n The Thames is a river that",
    " = Photosynthesis = \n\n Photosynthesis is the process by which",
    " = Roman Empire = \n\n The Roman Empire was",
    " = Jazz = \n\n Jazz is a music genre that originated",
    " = Volcano = \n\n A volcano is a rupture in the crust of",
    " = Ada Lovelace = \n\n Augusta Ada King, Countess of Lovelace, was",
    " = Great Barrier Reef = \n\n The Great Barrier Reef is",
    " = The Beatles = \n\n The Beatles were an English rock band",
    " = Industrial Revolution = \n\n The Industrial Revolution was the transition to",
    "The history of the city begins in the twelfth century, when",
    "In 1998, the team won its first championship after",
    "The album was released to positive reviews. Critics praised",
    "The species is found in tropical forests, where it feeds on",
    "The novel follows a young woman who moves to London and",
    "After the war, the government introduced a series of reforms",
    "The church was built in the Gothic style between",
    "Scientists announced on Tuesday that a new study of",
    "The company reported quarterly earnings that",
    "Once upon a time, in a village at the edge of a forest,",
    "She opened the door slowly and saw",
    "It was raining when the train finally arrived in",
    "Dear Sir or Madam,\n\nI am writing to",
    "How to bake bread at home:\n1.",
    "Here are five tips for a good night's sleep:\n\n1.",
    "The main advantages of solar power are",
    "To solve the equation 3x + 7 = 22, we",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "A computer network is a set of computers that",
    "The human heart has four chambers:",
    "Question: Why is the sky blue?\nAnswer:",
    "Q: What causes the seasons on Earth?\nA:",
    "The stock market fell sharply on Monday as investors",
    "The film was directed by",
    "In mathematics, a prime number is",
    "The mountain is the highest peak in the range and",
    "The recipe calls for two cups of flour,",
    "During the eighteenth century, trade between Europe and Asia",
    "Climate change refers to long-term shifts in",
    "The school was founded in 1854 by",
)


@dataclass(slots=True)
class GenerateSpec:
    """How much text the teacher writes, and how."""

    tokens: int  # generated tokens wanted in all (prompt tokens not counted)
    seed: int  # sample i draws with seed + i
    sample_tokens: int = 256  # most tokens one sample generates
    parallel: int = 8  # samples decoded at once (one llama.cpp batch)
    temperature: float = 0.9
    top_p: float = 0.95


@dataclass(slots=True)
class TeacherTargets:
    """The training windows and the teacher's top-k next-token distribution at each position."""

    windows: np.ndarray[Any, Any]  # int32 [N, L] token ids
    ids: np.ndarray[Any, Any]  # int32 [N, L, k] top-k token ids at each position
    logprobs: np.ndarray[Any, Any]  # float16 [N, L, k] their log-probs renormalised over the k
    mass: float  # mean share of the teacher's full probability that the top-k holds


def generate(
    teacher: Path, spec: GenerateSpec, threads: int, progress: StageProgress | None
) -> list[list[int]]:
    """Samples of the teacher's own text: each the prompt's tokens then what it generated."""
    from edgellm.backends import load_backend
    from edgellm.engine import Engine, Request, SchedulerConfig
    from edgellm.settings import EngineSettings

    cells = 512 * ((96 + spec.sample_tokens) // 512 + 1)  # per sequence: a prompt + a sample
    settings = EngineSettings.model_validate(  # these values only: no environment, no file
        {
            "ctx": cells * spec.parallel,
            "parallel": spec.parallel,
            "batch": 256,
            "threads": threads,
            "prefix_cache": False,
            "kv_layout": "split",
        }
    )
    backend = load_backend(teacher, settings)
    config = SchedulerConfig(
        n_ctx=backend.runner.n_ctx,
        max_running=spec.parallel,
        max_batch_tokens=settings.batch,
        max_queue=1 << 20,
        seq_cells=backend.runner.n_ctx // spec.parallel,
        prefix_cache=False,
    )
    engine = Engine(backend.runner, backend.tokenizer, config)
    samples: list[Request] = []
    try:
        made = 0
        while made < spec.tokens:
            batch = _sample_requests(backend.tokenizer, spec, len(samples), spec.tokens - made)
            for request in batch:
                engine.add_request(request)
            while engine.has_work():
                engine.step()
                if progress is not None:
                    done = made + sum(len(r.output_tokens) for r in batch)
                    progress("generate", min(done, spec.tokens), spec.tokens)
            samples += batch
            made += sum(len(r.output_tokens) for r in batch)
    finally:
        engine.close()
    return [r.prompt_tokens + r.output_tokens for r in samples if r.output_tokens]


def _sample_requests(tokenizer: Any, spec: GenerateSpec, first: int, wanted: int) -> list[Any]:
    """Up to `parallel` samples, numbered from `first`, enough for `wanted` more tokens."""
    from edgellm.engine import Request, SamplingParams

    length = min(spec.sample_tokens, wanted)
    count = min(spec.parallel, -(-wanted // length))
    requests = []
    for i in range(first, first + count):
        sampling = SamplingParams(
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed + i,
            max_tokens=length,
        )
        prompt = tokenizer.tokenize(
            PROMPTS[i % len(PROMPTS)], add_special=True, parse_special=False
        )
        requests.append(Request(f"distill-{i}", prompt, sampling, arrival_time=time.monotonic()))
    return requests


def make_windows(
    streams: Sequence[Sequence[int]], seq: int, bos: int | None
) -> np.ndarray[Any, Any]:
    """Consecutive windows of `seq` tokens from each stream (the rest of a stream dropped);
    int32 [N, seq], the first token of each replaced by `bos` (evaluation does the same)."""
    rows = []
    for stream in streams:
        n = len(stream) // seq
        if n:
            rows.append(np.asarray(stream[: n * seq], dtype=np.int32).reshape(n, seq))
    if not rows:
        longest = max((len(s) for s in streams), default=0)
        raise ValidationError(
            f"the training text is too short: its longest part is {longest} tokens, fewer than "
            f"one window of --seq {seq}; give more text (or --generate more tokens)",
            param="data",
        )
    windows = np.concatenate(rows)
    if bos is not None:
        windows[:, 0] = bos
    return windows


def teacher_targets(
    scorer: Scorer, windows: np.ndarray[Any, Any], top_k: int, progress: StageProgress | None
) -> TeacherTargets:
    """The teacher's top-k at every position of every window, by one llama.cpp decode each."""
    n, seq = windows.shape
    ids = np.empty((n, seq, top_k), dtype=np.int32)
    logprobs = np.empty((n, seq, top_k), dtype=np.float16)
    mass = 0.0
    for i, window in enumerate(windows):
        logits = scorer.window_logits(window.tolist(), 0)  # float32 [L, V]
        top = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]  # [L, k], unordered
        values = np.take_along_axis(logits, top, axis=1)
        order = np.argsort(-values, axis=1)  # largest first, for readable caches
        top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
        top_lse = _logsumexp(values)  # [L, 1]
        ids[i], logprobs[i] = top, values - top_lse
        mass += float(np.exp(top_lse - _logsumexp(logits)).mean())
        if progress is not None:
            progress("teacher top-k", i + 1, n)
    return TeacherTargets(windows, ids, logprobs, mass / n)


def _logsumexp(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    peak = x.max(axis=1, keepdims=True)
    out: np.ndarray[Any, Any] = peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True))
    return out


def save_targets(path: Path, targets: TeacherTargets) -> None:
    """Atomically (temporary file + rename in the same directory)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                windows=targets.windows,
                ids=targets.ids,
                logprobs=targets.logprobs,
                mass=np.float64(targets.mass),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_targets(path: Path) -> TeacherTargets:
    with np.load(path) as data:
        return TeacherTargets(data["windows"], data["ids"], data["logprobs"], float(data["mass"]))


def overlap(train: Sequence[Sequence[int]], held_out: Sequence[int]) -> tuple[int, int]:
    """(passages of SHINGLE tokens of `held_out` that also occur in `train`, how many passages
    `held_out` has). Passages are compared by a 64-bit polynomial hash of their tokens."""
    seen = np.unique(np.concatenate([_shingles(s) for s in train] or [np.empty(0, np.uint64)]))
    mine = _shingles(held_out)
    return int(np.isin(mine, seen).sum()), len(mine)


def _shingles(tokens: Sequence[int]) -> np.ndarray[Any, Any]:
    """uint64 [len - SHINGLE + 1]: the hash of the passage starting at each token."""
    if len(tokens) < SHINGLE:
        return np.empty(0, dtype=np.uint64)
    values = np.asarray(tokens, dtype=np.uint64)
    powers = np.array([pow(1_000_003, j, 1 << 64) for j in range(SHINGLE)], dtype=np.uint64)
    out = []
    view = np.lib.stride_tricks.sliding_window_view(values, SHINGLE)  # [n, SHINGLE], no copy
    for start in range(0, len(view), 1 << 16):  # bounded memory: 64k passages at a time
        out.append((view[start : start + (1 << 16)] * powers).sum(axis=1, dtype=np.uint64))
    return np.concatenate(out)
