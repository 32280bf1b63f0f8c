"""PostgreSQL for coroutines: a few async connections of each event loop's own.

A request's short statement (an idempotency claim, a callback signature, a user's data key) on
the loop costs a third of the CPU it costs through a worker thread and a pooled blocking
connection (0.26-0.36 ms against 0.64-1.07 ms a statement, 2,000 statements 32 at a time), and
holds no thread. The connections of a loop are made on first use, at most ``size`` of them; one
whose statement failed is closed, not reused; ``close`` closes the running loop's idle ones (one in
use then is closed when its block ends), and those of a loop that ended are closed when another
loop first asks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from adapters.per_loop import of_running_loop


class LoopConnections:
    """Autocommit connections per event loop. ``flushed=False`` commits without waiting for the
    WAL flush (``synchronous_commit`` off for the whole session): for records a database crash
    may forget (see adapters.api.idempotency)."""

    def __init__(self, conninfo: str, size: int = 8, flushed: bool = True, timeout_s: float = 10.0) -> None:
        self.conninfo = conninfo
        self.size = size
        self.flushed = flushed
        self.timeout_s = timeout_s
        self._by_loop: dict[asyncio.AbstractEventLoop, _Connections] = {}

    def _here(self) -> _Connections:
        return of_running_loop(self._by_loop, lambda: _Connections(self), _Connections.finish)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the running loop for the block (PoolTimeout when none frees up within
        ``timeout_s``)."""
        here = self._here()
        conn = await here.take()
        try:
            yield conn
        except BaseException:
            # A statement failed or was cancelled: the session's state is unknown, so it goes.
            broken = conn.broken
            await here.drop(conn)
            if broken:
                # The server went away (a restart, a failover): the idle ones died with this one,
                # and each would fail the next request that took it, long after the server is back.
                await here.drop_idle()
            raise
        await here.give(conn)

    async def close(self) -> None:
        here = self._by_loop.pop(asyncio.get_running_loop(), None)
        if here is not None:
            await here.close()


class _Connections:
    def __init__(self, owner: LoopConnections) -> None:
        self.owner = owner
        self.slots = asyncio.Semaphore(owner.size)
        self.idle: list[psycopg.AsyncConnection[Any]] = []
        self.closed = False

    async def take(self) -> psycopg.AsyncConnection[Any]:
        try:
            async with asyncio.timeout(self.owner.timeout_s):
                await self.slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no connection free within {self.owner.timeout_s:g} s") from None
        try:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
            return await self._connect()
        except BaseException:
            self.slots.release()
            raise

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.owner.conninfo, autocommit=True, connect_timeout=max(1, round(self.owner.timeout_s)))
        if not self.owner.flushed:
            try:
                await conn.execute("SET synchronous_commit TO off")
            except BaseException:
                await conn.close()
                raise
        return conn

    async def give(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self.closed and not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            self.idle.append(conn)
            self.slots.release()
        else:  # closed meanwhile, or left inside a transaction (or broken): not reusable as it is
            await self.drop(conn)

    async def drop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.slots.release()
        with contextlib.suppress(Exception):
            await conn.close()

    async def drop_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()

    def finish(self) -> None:
        """Close the idle connections of a loop that has ended (it cannot await their close)."""
        for conn in self.idle:
            conn.pgconn.finish()

    async def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
