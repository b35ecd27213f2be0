"""Watching for a client that goes away while its request is being worked on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def unless_disconnected(
    request: Request, on_gone: Callable[[], None], work: Callable[[], Awaitable[T]]
) -> T:
    """Await `work`; if the client goes away first, call `on_gone` (abort the generation,
    stop the embedding) and give up."""
    task = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            on_gone()
    if task.cancelled():
        raise asyncio.CancelledError  # the client is gone; nothing to answer
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
