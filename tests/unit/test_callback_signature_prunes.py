"""Seen callback signatures are pruned by one task at a time: a prune still under way when the
next is due is not joined by a second one (adapters.api.callback_signatures)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from adapters.api.callback_signatures import CallbackSignatures


def test_a_prune_due_while_the_last_one_is_still_under_way_waits_for_it() -> None:
    now = [0.0]
    done = asyncio.Event()
    prunes: list[float] = []

    async def deleting() -> int:
        await done.wait()
        return 0

    def prune() -> Coroutine[Any, Any, int]:
        prunes.append(now[0])  # when it was started
        return deleting()

    async def recorded(signature: str) -> bool:
        return True  # every signature fresh

    async def scenario() -> None:
        signatures = CallbackSignatures(None, every_s=60.0, clock=lambda: now[0])  # type: ignore[arg-type]
        signatures.prune = prune  # type: ignore[method-assign]
        signatures._recorded_together = recorded  # type: ignore[assignment]
        assert await signatures.first_use("a")
        first = signatures.pruning
        now[0] = 61.0  # due again, the first prune still deleting
        assert await signatures.first_use("b")
        assert signatures.pruning is first
        done.set()
        assert first is not None and await first == 0
        now[0] = 62.0
        assert await signatures.first_use("c")
        assert signatures.pruning is not first and await signatures.pruning == 0
        now[0] = 121.0  # under every_s since the last one began
        assert await signatures.first_use("d")
        assert prunes == [0.0, 62.0]

    asyncio.run(scenario())
