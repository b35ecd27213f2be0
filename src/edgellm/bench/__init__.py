"""Serving benchmark: load generation, per-request timing and the statistics the field reports."""

from edgellm.bench.runner import LevelResult, LoadConfig, run_level
from edgellm.bench.stats import Distribution, RequestRecord, Summary, parse_slo, percentile

__all__ = [
    "Distribution",
    "LevelResult",
    "LoadConfig",
    "RequestRecord",
    "Summary",
    "parse_slo",
    "percentile",
    "run_level",
]
