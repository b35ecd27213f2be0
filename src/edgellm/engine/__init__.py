"""The engine: Request state, a pure Scheduler, the Runner seam, and Engine/AsyncEngine."""

from edgellm.engine.engine import AsyncEngine, Engine, RequestOutput, RequestStream
from edgellm.engine.request import Request, RequestStatus, SamplingParams
from edgellm.engine.runner import (
    Embedder,
    KvOp,
    Runner,
    RunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
    Scorer,
    Tokenizer,
)
from edgellm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerStats

__all__ = [
    "AsyncEngine",
    "Embedder",
    "Engine",
    "KvOp",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "RequestStream",
    "Runner",
    "RunnerOutput",
    "SamplingParams",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "Scorer",
    "Tokenizer",
]
