"""Evaluate models on a text file, the way llama.cpp's perplexity tool does.

The text is tokenized whole (BOS added when the model wants one) and cut into consecutive,
non-overlapping windows of `ctx` tokens; each window is decoded from an empty cache with its
first token replaced by BOS (when the model uses one), and only its second half is scored:
the logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1, so every scored token
has at least ctx/2 tokens of context. Perplexity is exp(mean negative log-likelihood). With a
reference model, each window is decoded by the reference and by every model in turn and the
two distributions are compared position by position (KL divergence, top-1, probability of
the correct token). All models stay loaded together: memory is the sum of their sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.backends import load_scorer
from edgellm.engine.runner import Scorer
from edgellm.errors import ValidationError
from edgellm.evaluate.scores import TokenScores
from edgellm.records import file_record, now

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass(slots=True)
class EvalResult:
    model: Path
    metrics: dict[str, float]  # ppl, nll, tokens; with a reference kl_*, top1, dp_*, ppl_ratio
    windows: int  # windows of ctx tokens scored
    ctx: int  # tokens per window
    seconds: float  # wall time spent decoding this model's windows
    ref_metrics: dict[str, float] | None = None  # the reference's own ppl on the same tokens
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. decode tokens/s (sweep)


def read_text(path: Path) -> str:
    """A data file's text; a clear error for a missing, binary or empty file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError(f"data file not found: {path}", param="data") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read {path} as UTF-8 text ({exc})", param="data") from exc
    if not text.strip():
        raise ValidationError(f"data file {path} is empty", param="data")
    return text


def split_windows(tokens: list[int], ctx: int, chunks: int | None, bos: int | None) -> list[Any]:
    """Consecutive windows of `ctx` tokens, at most `chunks` of them; the first token of each
    replaced by `bos` (llama.cpp's perplexity does this when the model adds a BOS)."""
    n = len(tokens) // ctx
    if chunks is not None:
        n = min(n, chunks)
    if n == 0:
        raise ValidationError(
            f"the data is {len(tokens)} tokens, fewer than one window of {ctx}; "
            "give a longer text or a smaller --ctx",
            param="data",
        )
    windows = np.asarray(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx).copy()
    if bos is not None:
        windows[:, 0] = bos
    return list(windows)


def evaluate(
    models: list[Path],
    data: Path,
    *,
    ref: Path | None,
    ctx: int,
    chunks: int | None,
    threads: int,
    progress: Progress | None = None,
) -> list[EvalResult]:
    """Perplexity of each model (and comparison with `ref`) on the windows of `data`."""
    if ctx < 8 or ctx % 2:
        raise ValidationError("--ctx must be an even number of tokens, at least 8", param="ctx")
    text = read_text(data)
    scorers: list[Scorer] = []
    try:
        for path in ([ref] if ref is not None else []) + models:
            scorers.append(load_scorer(path, ctx, threads))
        tokens = scorers[0].tokenize(text)
        _check_same_tokenizer(scorers, ([ref] if ref else []) + models, text, tokens)
        bos = scorers[0].bos if scorers[0].add_bos else None
        windows = split_windows(tokens, ctx, chunks, bos)
        return _score(scorers, models, ref is not None, windows, ctx, progress)
    finally:
        for scorer in scorers:
            scorer.close()


def _check_same_tokenizer(
    scorers: list[Scorer], paths: list[Path], text: str, tokens: list[int]
) -> None:
    for scorer, path in zip(scorers[1:], paths[1:], strict=True):
        if scorer.n_vocab != scorers[0].n_vocab or scorer.tokenize(text) != tokens:
            raise ValidationError(
                f"{path.name} and {paths[0].name} tokenize the text differently "
                f"({scorer.n_vocab} vs {scorers[0].n_vocab} tokens in their vocabularies): "
                "KL divergence and perplexity ratios need the same tokenizer",
                param="ref",
            )


def _score(
    scorers: list[Scorer],
    models: list[Path],
    has_ref: bool,
    windows: list[Any],
    ctx: int,
    progress: Progress | None,
) -> list[EvalResult]:
    first = ctx // 2
    scores = [TokenScores() for _ in scorers]
    seconds = [0.0] * len(scorers)
    for done, window in enumerate(windows, 1):
        targets = window[first + 1 :]  # [ctx/2 - 1]: what positions first .. ctx-2 predict
        ref_logits = None
        for i, scorer in enumerate(scorers):
            started = time.perf_counter()
            logits = scorer.window_logits(window.tolist(), first)[:-1]  # [ctx/2 - 1, V]
            seconds[i] += time.perf_counter() - started
            if has_ref and i == 0:
                ref_logits = logits
                scores[0].add(logits, targets, None)
            else:
                scores[i].add(logits, targets, ref_logits)
        if progress is not None:
            progress(done, len(windows))
    ref_summary = scores[0].summary() if has_ref else None
    offset = 1 if has_ref else 0
    return [
        EvalResult(
            model=path,
            metrics=scores[i + offset].summary(ref_summary["nll"] if ref_summary else None),
            windows=len(windows),
            ctx=ctx,
            seconds=seconds[i + offset],
            ref_metrics=ref_summary,
        )
        for i, path in enumerate(models)
    ]


def eval_record(result: EvalResult, data: Path, ref: Path | None) -> dict[str, Any]:
    """How a manifest stores one evaluation."""
    return {
        "at": now(),
        "method": "llama.cpp perplexity windows (second half scored)",
        "data": file_record(data),
        "ref": file_record(ref) if ref is not None else None,
        "ctx": result.ctx,
        "windows": result.windows,
        "metrics": result.metrics,
        "ref_metrics": result.ref_metrics,
    } | ({"extra": result.extra} if result.extra else {})
