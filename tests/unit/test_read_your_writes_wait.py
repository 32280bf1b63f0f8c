"""GET /rules waits for the caller's own writes to be folded (read-your-writes), and for at most
its timeout: a projector stopped, or away, costs each list that long, never a request held open."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from typing import Any
from uuid import uuid4

import pytest

from projections import queries


def _folded_after(monkeypatch: pytest.MonkeyPatch, checks: int | None) -> list[float]:
    """``_check`` answering folded from its ``checks``-th call on (None: never); when each was made."""
    calls: list[float] = []

    def check(pool: Any, model: str, versions: Any) -> bool:
        calls.append(time.monotonic())
        return checks is not None and len(calls) >= checks

    monkeypatch.setattr(queries, "_check", check)
    return calls


def _wait(timeout_s: float, versions: dict[Any, int]) -> tuple[bool, float]:
    async def waited() -> bool:
        return await asyncio.wait_for(queries.wait_for_streams(None, "rules", versions, timeout_s=timeout_s), 10)

    start = time.monotonic()
    return asyncio.run(waited()), time.monotonic() - start


def test_a_write_never_folded_is_waited_for_its_timeout_and_no_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _folded_after(monkeypatch, None)
    folded, took = _wait(1.0, {uuid4(): 3})
    assert folded is False and 1.0 <= took < 1.5
    # Checked again every 50 ms at most while it waited: a write folded meanwhile ends the wait
    # then, not up to the deadline later.
    assert max(later - earlier for earlier, later in pairwise(calls)) < 0.3


def test_a_write_folded_on_a_later_check_ends_the_wait_then(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _folded_after(monkeypatch, 3)
    folded, took = _wait(5.0, {uuid4(): 3})
    assert folded is True and len(calls) == 3 and took < 2.0


def test_nothing_written_is_nothing_to_wait_for(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _folded_after(monkeypatch, None)
    assert _wait(5.0, {})[0] is True and calls == []
