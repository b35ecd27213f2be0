"""Engines take turns: the core policy when one process holds several loaded models.

Each engine runs llama.cpp with every thread it was given (`--threads`, all cores by default).
Two engines stepping at once would ask for twice the cores and both run slower than one at a
time (threads spinning on a busy core). So engines that share a `StepTurns` take turns, one
step each, first come first served: at most one engine computes at any moment, with all the
threads, and an engine with nothing to do takes no turn. A step is one batched decode (tens of
milliseconds), so a model whose neighbour is busy waits at most about one step for its turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StepTurns:
    """A fair (ticket) lock around engine steps."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the ticket the next caller gets
        self._serving = 0  # the ticket whose turn it is

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()
