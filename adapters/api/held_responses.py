"""Responses a client holds open (a job's event stream, an analyst's replay) and the slots that
bound them per process: each holds the event loop's attention, a buffer, and for some a poll of
the event store, for as long as its client keeps it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any
from uuid import UUID

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from adapters.api.rate_limit import RateLimited

RETRY_AFTER_S = 5.0  # what a stream refused for want of a slot is told to wait


class StreamSlots:
    """Open streams of one kind in this process: at most ``per_user`` a holder (a user, a staff
    role), ``per_address`` a client address and ``total`` in all. Unbounded, one client, or many
    anonymous ones, could make the process do nothing else (a job's stream polls the event store
    every SSE_POLL_S); bounded in all only, one client registering users enough would take every
    stream for everyone else."""

    def __init__(self, per_user: int, total: int | None = None, per_address: int | None = None) -> None:
        self.per_user = per_user
        self.per_address = per_address
        self.total = total
        self._open: Counter[UUID | str] = Counter()  # only users and addresses with a stream open
        self._count = 0
        self._lock = threading.Lock()

    def take(self, holder: UUID | str, address: str = "") -> Callable[[], None]:
        """A slot for ``holder`` from ``address`` (RateLimited when all are taken); call the result
        to give it back."""
        with self._lock:
            if (self._open[holder] >= self.per_user
                    or (self.per_address is not None and self._open[address] >= self.per_address)
                    or (self.total is not None and self._count >= self.total)):
                raise RateLimited(RETRY_AFTER_S)
            self._open[holder] += 1
            self._open[address] += 1
            self._count += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self._lock:
                if given_back:
                    return
                given_back = True
                self._count -= 1
                for key in (holder, address):
                    self._open[key] -= 1
                    if self._open[key] <= 0:
                        del self._open[key]

        return give_back

    def open_streams(self, key: UUID | str) -> int:
        """A user's (or an address's) open streams."""
        with self._lock:
            return self._open.get(key, 0)


class SlotStream(StreamingResponse):
    """A streaming response that gives its stream slot back however it ends (job done, client
    gone, server stopping, an error)."""

    def __init__(self, content: AsyncIterable[bytes] | Iterable[bytes], give_back: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._give_back()
