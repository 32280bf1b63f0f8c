"""PostgreSQL for coroutines: a few async connections of each event loop's own.

A request's short statement (an idempotency claim, a callback signature, a user's data key) on
the loop costs a third of the CPU it costs through a worker thread and a pooled blocking
connection (0.26-0.36 ms against 0.64-1.07 ms a statement, 2,000 statements 32 at a time), and
holds no thread. The connections of a loop are made on first use, at most ``size`` of them; one
whose statement failed is closed, not reused; ``close`` closes the running loop's idle ones (one in
use then is closed when its block ends), and those of a loop that ended are closed when another
loop first asks. ``Together`` runs the calls that arrive while one statement runs in the next
one, as the group committer saves commands: new users' data keys (``adapters.keyring``) and GPU
callback signatures (``adapters.api.callback_signatures``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from adapters.per_loop import of_running_loop

A = TypeVar("A")
R = TypeVar("R")


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
        ``timeout_s``, or when the block has not ended within ``timeout_s``: a server that stopped
        answering without closing the connection, frozen or behind a network dropping packets,
        would hold its statement, and its request, for as long; psycopg then tries to cancel
        the statement, for up to 10 s more, before the connection goes)."""
        here = self._here()
        conn = await here.take()
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                yield conn
        except BaseException as e:
            # A statement failed or was cancelled: the session's state is unknown, so it goes.
            broken = conn.broken
            await here.drop(conn)
            if broken:
                # The server went away (a restart, a failover): the idle ones died with this one,
                # and each would fail the next request that took it, long after the server is back.
                await here.drop_idle()
            if isinstance(e, TimeoutError) and deadline.expired():
                raise PoolTimeout(f"no answer within {self.timeout_s:g} s") from None
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


class Together(Generic[A, R]):
    """Calls made on an event loop, run together: one ``run`` (one statement) takes every call made
    on that loop while the one before ran, the oldest first, at most ``most`` of them, and answers
    each in the order of its arguments, as the group committer saves commands. Where each request
    ran its own statement (a round trip and a commit each), one does for all those that came
    meanwhile.

    ``run`` goes on a task of its own: a caller that goes away (its client disconnected) takes no
    other caller's answer with it. What ``run`` raises, each of its callers raises; an answer that
    is an exception, only its own caller."""

    def __init__(self, run: Callable[[list[A]], Awaitable[Sequence[R | Exception]]], most: int = 500,
                 timeout_s: float = 10.0) -> None:
        self.run = run
        self.most = most
        # A caller waits this long at most (then PoolTimeout, as for a connection that never frees
        # up), and a run runs this long at most: a statement stalled on a lock, or on a database
        # that stopped answering, would hold every call of its loop behind it.
        self.timeout_s = timeout_s
        self._by_loop: dict[asyncio.AbstractEventLoop, _Calls[A, R]] = {}

    async def __call__(self, arg: A) -> R:
        return await of_running_loop(self._by_loop, lambda: _Calls(self)).call(arg)


class _Calls(Generic[A, R]):
    def __init__(self, owner: Together[A, R]) -> None:
        self.owner = owner
        self.waiting: list[tuple[A, asyncio.Future[R]]] = []  # not in a run yet
        self.running: asyncio.Task[None] | None = None

    async def call(self, arg: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # its caller may have gone: no "never retrieved" line
        self.waiting.append((arg, future))
        if self.running is None:
            self.running = asyncio.create_task(self._run_all())
        try:  # shielded: cancelling the caller, or its deadline, leaves the call to its run
            return await asyncio.wait_for(asyncio.shield(future), self.owner.timeout_s)
        except TimeoutError:
            raise PoolTimeout(f"no answer within {self.owner.timeout_s:g} s") from None

    async def _run_all(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:self.owner.most], self.waiting[self.owner.most:]
                try:
                    # A run that never ends (a database that stopped answering without closing the
                    # socket) would hold every later call of this loop: it is given up at the
                    # callers' deadline (its connection is dropped), and the next run goes.
                    async with asyncio.timeout(self.owner.timeout_s):
                        answers = await self.owner.run([arg for arg, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"{len(answers)} answers to {len(batch)} calls")
                except Exception as e:  # noqa: BLE001 - each caller gets it, as its own statement would
                    for _, future in batch:
                        future.set_exception(e)
                    continue
                except BaseException:  # the loop is shutting down (or the run was cancelled)
                    # The waiting calls go too: left in the list, cancelled, the next call's run
                    # would fail on them (InvalidStateError) and leave its own caller waiting.
                    left, self.waiting = self.waiting, []
                    for _, future in (*batch, *left):
                        future.cancel()
                    raise
                for (_, future), answer in zip(batch, answers, strict=True):
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self.running = None


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
