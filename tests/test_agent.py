"""HAProxy's agent check, in process, over a real TCP socket: the line follows the free
capacity, says drain while draining and down once an engine died."""

from __future__ import annotations

import asyncio

import pytest

from edgellm.server import agent
from edgellm.server.drain import Drain
from edgellm.settings import ServerSettings
from tests.conftest import free_port
from tests.inprocess import TextRunner, scripted_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def ask(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = await reader.readline()
    assert await reader.read() == b""  # one line, then the agent closes
    writer.close()
    return line.decode()


async def test_the_agent_answers_free_capacity_drain_and_down() -> None:
    port = free_port()
    runner = TextRunner(n_ctx=2048, seq_cells=512, eos_at=None)
    runner.step_s = 0.05
    async with scripted_server(ServerSettings(agent_port=port), runner=runner, parallel=4) as srv:
        assert await ask(port) == "up ready 100%\n"
        busy = [asyncio.create_task(srv.chat(max_tokens=60)) for _ in range(3)]
        await asyncio.sleep(0.5)  # three of four sequences running
        assert await ask(port) == "up ready 25%\n"
        more = [asyncio.create_task(srv.chat(max_tokens=60)) for _ in range(3)]
        await asyncio.sleep(0.3)  # a queue: no slot free, a trickle still allowed
        assert await ask(port) == "up ready 1%\n"
        await asyncio.gather(*busy, *more)
        drain: Drain = srv.app.state.drain
        drain.begin()
        assert await ask(port) == "drain\n"
        drain.began = None
        runner.fail_with = RuntimeError("boom")
        await srv.chat()
        assert await ask(port) == "down\n"


async def test_ready_is_said_after_a_start_or_a_drain_and_not_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ready` ends a drain HAProxy holds from an earlier answer (a restart, a maintenance
    drain); said always, it would also end every drain an operator sets on HAProxy."""
    monkeypatch.setattr(agent, "READY_S", 0.3)
    port = free_port()
    async with scripted_server(ServerSettings(agent_port=port), parallel=4) as srv:
        assert await ask(port) == "up ready 100%\n"  # just started
        await asyncio.sleep(0.4)
        assert await ask(port) == "up 100%\n"
        drain: Drain = srv.app.state.drain
        drain.begin()
        assert await ask(port) == "drain\n"
        drain.began = None
        assert await ask(port) == "up ready 100%\n"  # HAProxy hears the drain is over
        await asyncio.sleep(0.4)
        assert await ask(port) == "up 100%\n"
