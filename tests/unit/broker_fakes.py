"""Stand-ins for kafka-python's consumer records and a consumer that hands out fixed polls
(pure code paths of the worker loops; the real broker is in the integration suites)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    value: bytes | None
    key: bytes | None = None
    offset: int = 0
    partition: int = 0
    topic: str = "palette.events"


class FakeConsumer:
    """Hands out one list of records per poll, then nothing; counts commits."""

    def __init__(self, *polls: list[Record]) -> None:
        self.polls = deque(polls)
        self.commits = 0
        self.last: list[Record] = []

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
        if not self.polls:
            return {}
        self.last = records = self.polls.popleft()
        return {(records[0].topic if records else "", 0): records}

    def seek(self, tp: Any, offset: int) -> None:
        """The last poll's records from ``offset`` on come again in the next poll."""
        self.polls.appendleft([r for r in self.last if r.offset >= offset])

    def commit(self) -> None:
        self.commits += 1

    def close(self) -> None:
        pass
