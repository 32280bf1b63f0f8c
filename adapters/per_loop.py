"""State kept per event loop (connections, their slots): asyncio objects belong to the loop that
made them, and tests and tools run several loops in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def of_running_loop(by_loop: dict[asyncio.AbstractEventLoop, T], make: Callable[[], T],
                    ended: Callable[[T], None] = lambda _: None) -> T:
    """The running loop's entry of ``by_loop``, made on first use; the entries of loops that have
    ended are dropped then, each given to ``ended`` first (to close what that loop cannot)."""
    loop = asyncio.get_running_loop()
    here = by_loop.get(loop)
    if here is None:
        for gone in [old for old in by_loop if old.is_closed()]:
            ended(by_loop.pop(gone))
        here = by_loop[loop] = make()
    return here
