"""GET /rules waits for the caller's own writes to be folded (read-your-writes), and for at most
its timeout: a projector stopped, or away, costs each list that long, never a request held open.
Time is the test's own (a clock that sleeping moves), so no bound depends on the host's speed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import pytest

from projections import queries


class Waits:
    """``_check`` answering folded from its ``folded_on``-th call on (None: never), and a clock that
    moves only by what the wait sleeps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folded_on: int | None) -> None:
        self.now = 100.0
        self.checks = 0
        self.slept: list[float] = []
        self.folded_on = folded_on
        monkeypatch.setattr(queries, "_check", self.check)
        monkeypatch.setattr(queries, "time", SimpleNamespace(monotonic=lambda: self.now))
        monkeypatch.setattr(queries.anyio, "sleep", self.sleep)

    def check(self, pool: Any, model: str, versions: Any) -> bool:
        self.checks += 1
        return self.folded_on is not None and self.checks >= self.folded_on

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def wait(self, timeout_s: float, versions: dict[Any, int]) -> bool:
        async def waited() -> bool:  # a wait that never ends fails here rather than hanging the suite
            return await asyncio.wait_for(queries.wait_for_streams(None, "rules", versions, timeout_s=timeout_s), 10)

        return asyncio.run(waited())


def test_a_write_never_folded_is_waited_for_its_timeout_and_no_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = Waits(monkeypatch, folded_on=None)
    assert waits.wait(1.0, {uuid4(): 3}) is False
    assert sum(waits.slept) == pytest.approx(1.0)
    # 5 ms, doubling up to 50 ms: a write folded meanwhile ends the wait within 50 ms of it, not
    # up to the deadline later. 0.075 s in the first four, then 18 of 50 ms, then the 25 ms left.
    assert waits.slept[:23] == pytest.approx([0.005, 0.01, 0.02, 0.04] + [0.05] * 18 + [0.025])
    assert sum(waits.slept[23:]) == pytest.approx(0.0, abs=1e-9)  # at most a float's residue
    assert waits.checks == len(waits.slept) + 1  # checked after every sleep, the last one too


def test_a_write_folded_on_a_later_check_ends_the_wait_then(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = Waits(monkeypatch, folded_on=3)
    assert waits.wait(5.0, {uuid4(): 3}) is True
    assert waits.checks == 3 and waits.slept == pytest.approx([0.005, 0.01])


def test_nothing_written_is_nothing_to_wait_for(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = Waits(monkeypatch, folded_on=None)
    assert waits.wait(5.0, {}) is True and waits.checks == 0 and waits.slept == []
