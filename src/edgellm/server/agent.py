"""HAProxy's agent check (`agent-check agent-port PORT` on a server line): HAProxy connects,
this answers one line and closes. The line says how much of the box is free, so HAProxy's
weights follow load rather than guess it:

    up NN%         serving; NN is the free capacity (below). For READY_S after the agent
                   starts and after its last `drain` or `down`, `up ready NN%`: HAProxy keeps
                   an agent's drain until it hears `ready`, so without it a worker once
                   drained would stay so. Only then: `ready` also ends a drain an operator set
                   on HAProxy's stats socket, which therefore holds at any other time
    drain          shutting down, in a maintenance drain (`edgellm fleet` swapping this
                   worker), or a hot swap is retiring a version to make room: no new sessions
    down           an engine stopped after an internal error, or a model failed to load

Free capacity, over the loaded engines (a box with nothing loaded is all free):

    slots = 1 - (running + waiting) / parallel     requests it can start at once
    kv    = 1 - kv_cells_used / kv_cells_total     KV cache it has left
    NN    = round(100 x min(slots, kv)), at least 1

A queue longer than the slots makes `slots` 0, hence 1%: HAProxy keeps a trickle going to a
busy box (0% would stop it as a drain does) and sends the rest where there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from edgellm.server.drain import Drain
from edgellm.server.lifecycle import ModelTable

log = logging.getLogger("edgellm.server")


@dataclass(frozen=True, slots=True)
class Load:
    """What the loaded engines are doing now, summed over them (ready engines only)."""

    parallel: int  # sequences they can run at once
    running: int  # requests decoding or prefilling
    waiting: int  # requests queued for a sequence
    kv_cells_used: int
    kv_cells_total: int


def load_of(table: ModelTable) -> Load:
    parallel = running = waiting = used = total = 0
    for instance in table.loaded():
        engine = instance.model.engine
        stats = engine.stats() if engine.ready else None
        if stats is None:
            continue
        parallel += engine.engine.scheduler.config.max_running
        running, waiting = running + stats.running, waiting + stats.waiting
        used, total = used + stats.cells_used, total + stats.n_ctx
    return Load(parallel, running, waiting, used, total)


def problem_of(table: ModelTable) -> str | None:
    """Why the box cannot serve (an engine died, a model failed to load); None: it can."""
    for instance in table.loaded():
        engine = instance.model.engine
        if engine.failure is not None:
            return f"{instance.model.model_id}: {engine.failure}"
        if engine.load_error is not None:
            return f"{instance.model.model_id}: {engine.load_error}"
    for name, why in table.failures.items():
        return f"{name}: {why}"
    return None


def agent_line(table: ModelTable, drain: Drain) -> str:
    """What the agent answers now (without the newline)."""
    if problem_of(table) is not None:
        return "down"
    swapping = any(s.problem and s.pending for s in table.slots())
    if drain.draining or drain.maintenance or swapping:
        return "drain"
    load = load_of(table)
    if not load.parallel:
        return "up 100%"
    slots = max(0.0, 1 - (load.running + load.waiting) / load.parallel)
    kv = 1 - load.kv_cells_used / load.kv_cells_total if load.kv_cells_total else 1.0
    return f"up {max(1, round(100 * min(slots, kv)))}%"


READY_S = 30.0  # HAProxy asks every 2 s: 15 chances to hear `ready`


class AgentServer:
    """The agent-check listener, started and stopped with the app."""

    def __init__(self, table: ModelTable, drain: Drain, host: str, port: int):
        self.table, self.drain = table, drain
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        # a drain HAProxy still holds from this worker's previous process ends at start
        self._ready_until = time.monotonic() + READY_S

    def line(self) -> str:
        """The answer now, `ready` added while a drain of ours may still hold in HAProxy."""
        line = agent_line(self.table, self.drain)
        now = time.monotonic()
        if not line.startswith("up"):
            self._ready_until = now + READY_S
        elif now < self._ready_until:
            line = "up ready" + line[2:]
        return line

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        log.info("HAProxy agent check on %s:%d", self.host, self.port)

    async def _answer(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write((self.line() + "\n").encode())
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
