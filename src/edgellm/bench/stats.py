"""Per-request records and the statistics a serving benchmark reports.

Definitions follow the field (vLLM's `bench serve`, llama.cpp's server bench):
- TTFT: request sent -> first chunk carrying generated text.
- ITL: the gaps between successive chunks carrying text (one token per chunk on the servers
  we measure; a server that packs several tokens into a chunk shows fewer, longer gaps).
- TPOT: (E2E - TTFT) / (output tokens - 1), the mean decode time per token after the first;
  undefined for a one-token output.
- E2E: request sent -> last byte of the response.
Percentiles interpolate linearly between order statistics (numpy's default method).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.errors import ValidationError

SLO_METRICS = ("ttft", "tpot", "e2e")
_UNITS = {"ms": 1e-3, "s": 1.0, "us": 1e-6}


@dataclass(slots=True)
class RequestRecord:
    """What one request did, times in seconds."""

    index: int  # order of issue within its level
    start: float  # when it was sent, seconds after the level began
    ttft: float | None = None  # None when no text arrived
    e2e: float | None = None  # None when the request failed
    itls: list[float] = field(default_factory=list)  # gaps between text chunks
    input_tokens: int | None = None  # from the server's usage, when it reports one
    cached_tokens: int | None = None  # of those, reused from a prompt cache (usage details)
    output_tokens: int = 0  # usage.completion_tokens, else the number of text chunks
    error: str | None = None  # kind: connect, timeout, http_404, stream, server_error, empty
    detail: str | None = None  # the server's message or the exception, for the report
    conversation: int | None = None  # chat workload: which conversation, which turn
    turn: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        return tpot(self.e2e, self.ttft, self.output_tokens)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot": self.tpot}


def tpot(e2e: float | None, ttft: float | None, output_tokens: int) -> float | None:
    if e2e is None or ttft is None or output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(slots=True, frozen=True)
class Distribution:
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> Distribution:
        mean = sum(values) / len(values) if values else None
        return cls(mean, percentile(values, 50), percentile(values, 90), percentile(values, 99))


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=500ms,tpot=50ms,e2e=10s` -> {metric: seconds}; a bare number means ms."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValidationError(
                f"bad SLO {part!r}: expected METRIC=VALUE with METRIC one of "
                f"{', '.join(SLO_METRICS)}, e.g. ttft=500ms,tpot=50ms",
                param="slo",
            )
        slo[name] = _seconds(value.strip(), part)
    return slo


def _seconds(value: str, part: str) -> float:
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            number, scale = value[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = value, 1e-3
    try:
        seconds = float(number) * scale
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValidationError(f"bad SLO {part!r}: give a positive time such as 500ms", param="slo")
    return seconds


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.ok:
        return False
    measured = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    # A one-token output has no TPOT; it cannot miss a TPOT target.
    return all(measured[m] is None or measured[m] <= limit for m, limit in slo.items())  # type: ignore[operator]


@dataclass(slots=True, frozen=True)
class Summary:
    """One load level, as the report prints it."""

    requests: int
    completed: int
    failed: int
    errors: dict[str, int]  # kind -> count
    duration: float  # seconds from the first send to the last answer
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s, all requests
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests / s meeting every SLO; None without SLOs
    input_tokens: int
    cached_tokens: int | None  # input tokens the server reused; None when it does not say
    output_tokens: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    decode_tokens_per_s: float | None  # per stream: 1 / mean TPOT

    @classmethod
    def of(
        cls, records: list[RequestRecord], duration: float, slo: dict[str, float] | None = None
    ) -> Summary:
        done = [r for r in records if r.ok]
        errors = Counter(r.error for r in records if r.error is not None)
        input_tokens = sum(r.input_tokens or 0 for r in done)
        reported = [r.cached_tokens for r in done if r.cached_tokens is not None]
        output_tokens = sum(r.output_tokens for r in done)
        per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
        tpots = [t for r in done if (t := r.tpot) is not None]
        tpot_dist = Distribution.of(tpots)
        return cls(
            requests=len(records),
            completed=len(done),
            failed=len(records) - len(done),
            errors=dict(errors.most_common()),
            duration=duration,
            request_throughput=per_s(len(done)),
            output_throughput=per_s(output_tokens),
            total_token_throughput=per_s(input_tokens + output_tokens),
            goodput=per_s(sum(meets_slo(r, slo) for r in records)) if slo else None,
            input_tokens=input_tokens,
            cached_tokens=sum(reported) if reported else None,
            output_tokens=output_tokens,
            ttft=Distribution.of([r.ttft for r in done if r.ttft is not None]),
            tpot=tpot_dist,
            itl=Distribution.of([gap for r in done for gap in r.itls]),
            e2e=Distribution.of([r.e2e for r in done if r.e2e is not None]),
            decode_tokens_per_s=1.0 / tpot_dist.mean if tpot_dist.mean else None,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
