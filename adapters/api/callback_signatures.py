"""Signed GPU callbacks seen inside their window: the same signature twice is a replay."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from adapters.loop_pg import LoopConnections, Together
from domain.contracts.callback import CALLBACK_WINDOW_S

log = logging.getLogger("palette.api")

KEEP_S = 2 * CALLBACK_WINDOW_S  # a row older than two windows can never match a valid timestamp again
PRUNE_EVERY_S = 60.0  # per process: the table holds at most KEEP_S + PRUNE_EVERY_S of signatures
PRUNE_BATCH = 5_000  # rows one DELETE removes, at most: no statement holds locks on the whole table


class CallbackSignatures:
    """Records each verified signature once. Rows past KEEP_S are pruned at most once every
    ``every_s`` (a monotonic clock), by a task the first fresh signature after that starts: the
    callback that finds the prune due does not wait for it."""

    def __init__(self, connections: LoopConnections, every_s: float = PRUNE_EVERY_S,
                 batch: int = PRUNE_BATCH, clock: Callable[[], float] = time.monotonic) -> None:
        self.connections = connections
        self.every_s = every_s
        self.batch = batch
        self.clock = clock
        self.pruning: asyncio.Task[int] | None = None  # held, so the loop does not lose it
        self._recorded_together = Together(self._record)
        self._next_prune = -math.inf  # the first fresh signature prunes what a process before left

    async def first_use(self, signature: str) -> bool:
        """Record a verified signature; False when it was seen inside the window (a replay). Not
        flushed at commit: a signature a database crash forgets can be replayed once, and its
        result is then a repeat the job already recorded (results carry their idempotency key).
        The signatures of callbacks that arrive together go in with one statement (``Together``)."""
        fresh = await self._recorded_together(signature)
        if fresh:
            self._start_prune_if_due()
        return fresh

    async def _record(self, signatures: list[str]) -> list[bool]:
        """Whether each signature is new; of one repeated among them, only the first. In their
        sorted order, so that two processes recording a replay at once never wait on each other in
        a cycle."""
        async with self.connections.connection() as conn:
            new = {row[0] for row in await (await conn.execute(
                "INSERT INTO palette_api.callback_signatures (signature) SELECT DISTINCT s "
                "FROM unnest(%s::text[]) AS s ORDER BY s ON CONFLICT DO NOTHING RETURNING signature",
                [signatures])).fetchall()}
        fresh = []
        for signature in signatures:
            fresh.append(signature in new)
            new.discard(signature)
        return fresh

    def _start_prune_if_due(self) -> None:
        """Start ``prune`` in a task of its own once ``every_s`` has passed since the last one
        began, unless that one is still under way."""
        if (now := self.clock()) >= self._next_prune and (self.pruning is None or self.pruning.done()):
            self._next_prune = now + self.every_s
            self.pruning = asyncio.get_running_loop().create_task(self.prune())

    async def prune(self) -> int:
        """Delete the rows past KEEP_S, ``batch`` a statement until one deletes fewer; how many went.
        A failure is logged and left to the next prune (the rows only take room meanwhile)."""
        deleted = 0
        try:
            while True:
                async with self.connections.connection() as conn:
                    gone = (await conn.execute(
                        "DELETE FROM palette_api.callback_signatures WHERE signature IN (SELECT signature "
                        "FROM palette_api.callback_signatures WHERE seen_at < now() - %s * interval '1 second' "
                        "LIMIT %s)", [KEEP_S, self.batch])).rowcount
                deleted += gone
                if gone < self.batch:
                    return deleted
        except Exception as e:  # noqa: BLE001 - a background task's error has no one else to go to
            log.warning("pruning callback signatures failed: %s", type(e).__name__)
            return deleted

    async def close(self) -> None:
        """Cancel a prune under way (the server is stopping; the next process prunes)."""
        if self.pruning is not None and not self.pruning.done():
            self.pruning.cancel()
            await asyncio.gather(self.pruning, return_exceptions=True)
