"""Quality gates: `"kl_mean<0.05,ppl_ratio<1.05"` -> checks against an evaluation's metrics.

A gate is a comma-separated list of `metric OP number`, OP one of < <= > >=; it passes when
every check holds. Metrics other than `ppl` compare with a reference, so they need `--ref`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ValidationError

# metric -> what it means (the help text lists these)
METRICS = {
    "ppl": "perplexity",
    "ppl_ratio": "perplexity / the reference's perplexity",
    "kl_mean": "mean KL divergence from the reference, nats per token",
    "kl_p99": "99th percentile of the KL divergence",
    "top1": "share of positions whose most likely token is the reference's",
    "dp_mean": "mean change of the correct token's probability",
    "dp_p99": "99th percentile of the absolute change of the correct token's probability",
}
NEEDS_REF = set(METRICS) - {"ppl"}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CHECK = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True, slots=True)
class Check:
    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


@dataclass(frozen=True, slots=True)
class Gate:
    expr: str
    checks: tuple[Check, ...]

    @property
    def needs_ref(self) -> bool:
        return any(c.metric in NEEDS_REF for c in self.checks)

    def verdict(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The gate applied to `metrics`: what the manifest records."""
        results = [
            {
                "metric": c.metric,
                "op": c.op,
                "threshold": c.threshold,
                "value": metrics[c.metric],
                "passed": c.holds(metrics[c.metric]),
            }
            for c in self.checks
        ]
        return {"expr": self.expr, "passed": all(r["passed"] for r in results), "checks": results}


def parse_gate(expr: str) -> Gate:
    checks = []
    for part in expr.split(","):
        match = _CHECK.match(part)
        if match is None:
            raise ValidationError(
                f"cannot read gate check {part.strip()!r}: write metric<number, e.g. kl_mean<0.05",
                param="gate",
            )
        metric, op, number = match.groups()
        if metric not in METRICS:
            raise ValidationError(
                f"unknown gate metric {metric!r}; known: {', '.join(METRICS)}", param="gate"
            )
        try:
            threshold = float(number)
        except ValueError:
            raise ValidationError(f"{number!r} is not a number", param="gate") from None
        checks.append(Check(metric, op, threshold))
    return Gate(expr=expr.strip(), checks=tuple(checks))
