"""Per-token scores of one window, and the summary of many (pure numpy, no model here).

Shapes: a window's logits are [n, V] float32 for n consecutive scored positions; `targets[i]`
is the token that follows position i. Log-probabilities are taken in float64: a 49k-way
log-softmax in float32 loses the small KL values a near-lossless type produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ROWS = 64  # rows per block: [64, V] float64 stays ~25 MB for a 49k vocabulary


def log_softmax(logits: Any) -> Any:
    """[n, V] logits -> [n, V] float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclass(slots=True)
class TokenScores:
    """Scores of one model's tokens, concatenated over windows."""

    nll: list[Any] = field(default_factory=list)  # -log p(target), float64 [n] per window
    kl: list[Any] = field(default_factory=list)  # KL(ref || model) per position, nats
    top1: list[Any] = field(default_factory=list)  # argmax equals the reference's, bool [n]
    dp: list[Any] = field(default_factory=list)  # p(target) - p_ref(target)

    def add(self, logits: Any, targets: Any, ref_logits: Any | None) -> None:
        for start in range(0, len(targets), _ROWS):
            rows = slice(start, start + _ROWS)
            logp = log_softmax(logits[rows])
            picked = np.arange(logp.shape[0]), targets[rows]
            self.nll.append(-logp[picked])
            if ref_logits is None:
                continue
            ref_logp = log_softmax(ref_logits[rows])
            self.kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=1))
            self.top1.append(logp.argmax(axis=1) == ref_logp.argmax(axis=1))
            self.dp.append(np.exp(logp[picked]) - np.exp(ref_logp[picked]))

    def summary(self, ref_nll: float | None = None) -> dict[str, float]:
        """ppl, and against a reference: ppl_ratio, kl_mean, kl_p99, top1 (share of positions
        whose most likely token is the reference's), dp_mean (signed mean change of the
        correct token's probability) and dp_p99 (99th percentile of its absolute change)."""
        nll = np.concatenate(self.nll)
        out = {
            "tokens": float(nll.size),
            "nll": float(nll.mean()),
            "ppl": float(np.exp(nll.mean())),
        }
        if not self.kl:
            return out
        kl, dp = np.concatenate(self.kl), np.concatenate(self.dp)
        out |= {
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "top1": float(np.concatenate(self.top1).mean()),
            "dp_mean": float(dp.mean()),
            "dp_p99": float(np.percentile(np.abs(dp), 99)),
        }
        if ref_nll is not None:
            out["ppl_ratio"] = float(np.exp(nll.mean() - ref_nll))
        return out
