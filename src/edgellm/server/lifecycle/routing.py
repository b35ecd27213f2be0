"""Which version of a served name takes a request: canary buckets and the SLO fallback.

A canary's share is decided per conversation, not per request, so that every turn of a chat
sees one version: the conversation's key (the OpenAI `user` field, an `X-Session-Id` header,
else a hash of the system prompt and the first user message) hashes to a point in [0, 100);
points below the weight go to the candidate. The hash is salted with the candidate's digest,
so each new canary draws a different set of conversations.

The fallback watches the p99 time to first token of the primary's requests over a sliding
window. It switches on when that p99 exceeds the objective, and off only when, after at least
one window on, the p99 of the last window is under 80% of the objective: the gap between the
two thresholds and the one-window dwell keep it from flapping. While it is on, the primary gets
no client traffic, so one request at a time is copied to it in the background (a probe) to see
whether it has recovered.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

RECOVERY = 0.8  # of the objective: the primary must stay under this for a window
MIN_SAMPLES = 5  # a window with fewer decides nothing


def conversation_point(key: str, salt: str) -> float:
    """Where a conversation falls in [0, 100): the same key and salt, the same point."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank (with fewer than 100 values: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Fallback:
    """The state of one served name's SLO fallback."""

    objective_s: float  # p99 TTFT the primary must meet
    window_s: float
    active: bool = False
    since: float = field(default_factory=time.monotonic)  # of the last transition
    transitions: int = 0
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (when, ttft)
    probing: bool = False  # a probe is on the primary now

    def add(self, ttft_s: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, ttft_s))

    def window_p99(self, now: float) -> float | None:
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        if len(self.samples) < MIN_SAMPLES:
            return None
        return p99([ttft for _, ttft in self.samples])

    def update(self, now: float | None = None) -> bool:
        """Switch on or off as the window says; True when it switched."""
        now = time.monotonic() if now is None else now
        latency = self.window_p99(now)
        if latency is None:
            return False
        if not self.active and latency > self.objective_s:
            self.active = True
        elif (
            self.active
            and now - self.since >= self.window_s
            and latency < RECOVERY * self.objective_s
        ):
            self.active = False
        else:
            return False
        self.since, self.transitions = now, self.transitions + 1
        return True

    def describe(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        latency = self.window_p99(now)
        return {
            "active": self.active,
            "ttft_p99_objective_s": self.objective_s,
            "window_s": self.window_s,
            "primary_ttft_p99_s": None if latency is None else round(latency, 4),
            "samples": len(self.samples),
            "transitions": self.transitions,
            "for_s": round(now - self.since, 1),
        }
