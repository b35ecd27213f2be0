"""Progress bars for long byte-counting work (hashing, copying, downloading, encrypting): on
stderr, with size, rate and time left, and only when stderr is a terminal or the caller asks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Advance = Callable[[int], None]  # told how many more bytes were done


@contextlib.contextmanager
def byte_progress(what: str, total: int | None, *, done: int = 0) -> Iterator[Advance]:
    """A bar titled `what` over `total` bytes (None: unknown), `done` of them already."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from edgellm.cli.console import err

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(what, total=total, completed=done)
        yield lambda n: bar.advance(task, n)
