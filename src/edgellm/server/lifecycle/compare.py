"""Versions of one served name side by side, from a server's Prometheus exposition: what
`edgellm models compare` prints. Quantiles come from the histograms' buckets, interpolated
linearly inside a bucket as Prometheus' `histogram_quantile` does."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class VersionSummary:
    version: str
    requests: float = 0.0  # client requests (both APIs)
    mirrored: float = 0.0  # copies it took as a mirror candidate
    errors: float = 0.0  # client requests answered 5xx
    tokens: float = 0.0  # generated, mirror copies included
    busy_s: float = 0.0  # summed end-to-end seconds of its requests
    ttft: dict[float, float] = field(default_factory=dict)  # bucket bound -> cumulative count
    e2e: dict[float, float] = field(default_factory=dict)
    mirror: dict[str, float] = field(default_factory=dict)  # result -> count

    def quantile(self, which: str, q: float) -> float | None:
        return histogram_quantile(q, self.ttft if which == "ttft" else self.e2e)

    @property
    def tokens_per_s(self) -> float | None:
        """Generated tokens per second of request time: one stream's decode rate."""
        return self.tokens / self.busy_s if self.busy_s else None

    @property
    def agreement(self) -> float | None:
        done = self.mirror.get("match", 0.0) + self.mirror.get("differ", 0.0)
        return self.mirror.get("match", 0.0) / done if done else None

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "mirrored": self.mirrored,
            "errors": self.errors,
            "ttft_p50_s": self.quantile("ttft", 0.5),
            "ttft_p99_s": self.quantile("ttft", 0.99),
            "e2e_p50_s": self.quantile("e2e", 0.5),
            "e2e_p99_s": self.quantile("e2e", 0.99),
            "tokens_per_s": self.tokens_per_s,
            "mirror_agreement": self.agreement,
            "mirror": dict(self.mirror),
        }


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative `buckets` (upper bound -> count), or None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bound: its bound, as Prometheus says
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return None  # pragma: no cover


def summarize(exposition: str, model: str) -> list[VersionSummary]:
    """Every version of served name `model` that the exposition counts, most requests first."""
    found: dict[str, VersionSummary] = {}

    def of(labels: dict[str, str]) -> VersionSummary | None:
        if labels.get("model") != model or not labels.get("version"):
            return None
        version = labels["version"]
        return found.setdefault(version, VersionSummary(version))

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            summary = of(sample.labels)
            if summary is None:
                continue
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "edgellm_requests_total":
                if labels.get("api") == "mirror":
                    summary.mirrored += value
                elif labels.get("api") in ("openai", "ollama", "cli"):
                    summary.requests += value
                    if labels.get("status", "").startswith("5"):
                        summary.errors += value
            elif name == "edgellm_generation_tokens_total":
                summary.tokens += value
            elif name == "edgellm_e2e_request_latency_seconds_sum":
                summary.busy_s += value
            elif name == "edgellm_time_to_first_token_seconds_bucket":
                bound = float(labels["le"])
                summary.ttft[bound] = summary.ttft.get(bound, 0.0) + value
            elif name == "edgellm_e2e_request_latency_seconds_bucket":
                bound = float(labels["le"])
                summary.e2e[bound] = summary.e2e.get(bound, 0.0) + value
            elif name == "edgellm_mirror_requests_total":
                result = labels.get("result", "unknown")
                summary.mirror[result] = summary.mirror.get(result, 0.0) + value
    return sorted(found.values(), key=lambda s: -(s.requests + s.mirrored))
